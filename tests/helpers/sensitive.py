"""A tiny 1000-class model with one deliberately sensitive node, and images labelled by its FP32 answers.

``sensitive_model``: ``[N,3,32,32]`` → conv_a → Relu → conv_sensitive → Relu → conv_c → Relu →
GlobalAveragePool → Flatten → Gemm(1000) "fc". conv_a's output channel 0 is dead (zero weights, negative bias)
and conv_sensitive carries one weight of 1000 that reads that dead channel, so the outlier does nothing in
FP32 (conv_sensitive's own output channel 0 is dead too, so two of them can be chained). Its other weights
have magnitudes 1…3.5. With a per-tensor (`per_channel=False`) symmetric scale of 1000/127 (1000/63 with
reduce_range) those all round to 0: quantizing conv_sensitive turns its output into its bias, the logits
become constant, and INT8 predicts one class for every image. (Magnitudes of 1…3.5 instead of ~1e-2 also make
its *weight* SQNR the lowest of the model: with ~1e-2 the outlier, which int8 represents exactly, would
carry almost all of the weight energy and the weight SQNR would be the highest.)

The validation images are noise textures in six dominant colours, labelled by the FP32 model itself (wnid
folders named after its predictions; the fc biases are centred on them so the predictions spread over
several classes) and kept only when FP32's top-1 margin is several times the INT8 error of the other nodes:
FP32 top-1 is 100% and only conv_sensitive can flip a prediction.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from calibration import load_image, load_synsets
from quantize.measure.validate import validation_samples
from quantize.recipe import QuantRecipe
from quantize.tune import split_for_tuning
from tests.helpers.tiny_models import SMALL_SPEC

HW = 32
#: Per-tensor MinMax: the recipe under which conv_sensitive breaks. 7-bit weights (reduce_range) keep the
#: other nodes' error the same on CPUs with and without VNNI (no int16 saturation on AVX2); the weight
#: scale 1000/63 still rounds every small weight of conv_sensitive to 0.
# The op types are pinned to the compute nodes: the model is built so that only conv_sensitive can flip a
# prediction when exactly those are quantized (placement from the graph adds pooling and folded activations).
PER_TENSOR = QuantRecipe(
    per_channel=False,
    calibration="minmax",
    reduce_range=True,
    samples=16,
    batch_size=8,
    op_types=("Conv", "Gemm", "MatMul"),
    bias_correction=False,  # it would restore conv_sensitive's output mean, which this model must not have
)
#: The classes the "fc" layer can predict (every other class has a bias of -50).
ACTIVE = (0, 1, 2, 3, 4)


def _init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def sensitive_node_names(n_sensitive: int) -> list[str]:
    return ["conv_sensitive"] if n_sensitive == 1 else [f"conv_sensitive{i + 1}" for i in range(n_sensitive)]


def sensitive_model(path: Path | str, *, n_sensitive: int = 1, hw: int = HW, seed: int = 3) -> Path:
    """See the module docstring. `n_sensitive` = 0 gives a well-behaved 1000-class model (conv_a, conv_c,
    fc); 2 chains two sensitive convolutions (conv_sensitive1, conv_sensitive2)."""
    rng = np.random.default_rng(seed)
    c = 8
    wa = rng.standard_normal((c, 3, 3, 3)) * np.sqrt(2 / 27)
    ba = rng.standard_normal(c) * 0.05
    wa[0], ba[0] = 0.0, -1.0  # channel 0 is always 0 after the Relu
    inits = [_init("conv_a_W", wa), _init("conv_a_B", ba)]
    nodes = [
        helper.make_node("Conv", ["input", "conv_a_W", "conv_a_B"], ["a"], name="conv_a", pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
    ]
    x = "ra"
    for name in sensitive_node_names(n_sensitive) if n_sensitive else []:
        w = rng.uniform(1.0, 3.5, (c, c, 3, 3)) * rng.choice([-1.0, 1.0], (c, c, 3, 3))
        w[:, 0] = 0.0
        w[0] = 0.0
        w[0, 0, 1, 1] = 1000.0  # the outlier, on the dead input channel
        b = np.zeros(c)
        b[0] = -1.0  # output channel 0 is dead too, so a second sensitive node is as harmless in FP32
        inits += [_init(f"{name}_W", w), _init(f"{name}_B", b)]
        nodes += [
            helper.make_node("Conv", [x, f"{name}_W", f"{name}_B"], [f"{name}_out"], name=name, pads=[1] * 4),
            helper.make_node("Relu", [f"{name}_out"], [f"{name}_relu"], name=f"relu_{name}"),
        ]
        x = f"{name}_relu"
    wc = rng.standard_normal((16, c, 3, 3)) * np.sqrt(2 / 72)
    inits += [_init("conv_c_W", wc), _init("conv_c_B", rng.standard_normal(16) * 0.05)]
    wf = np.zeros((1000, 16))
    bf = np.full(1000, -50.0)
    for k in ACTIVE:
        wf[k], bf[k] = rng.standard_normal(16), 0.0
    inits += [_init("fc_W", wf), _init("fc_B", bf)]
    nodes += [
        helper.make_node(
            "Conv", [x, "conv_c_W", "conv_c_B"], ["c"], name="conv_c", pads=[1] * 4, strides=[2, 2]
        ),
        helper.make_node("Relu", ["c"], ["rc"], name="relu_c"),
        helper.make_node("GlobalAveragePool", ["rc"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc_W", "fc_B"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "sensitive",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, hw, hw])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def center_fc_bias(model: Path, paths: list[Path], spec=SMALL_SPEC) -> None:
    """Set the active classes' fc biases so that each class's logit averages 0 over `paths`: the FP32
    predictions then spread over several classes instead of one dominant class (rewrites `model`)."""
    proto = onnx.load(str(model))
    proto.graph.output.append(helper.make_tensor_value_info("f", TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.stack([load_image(p, spec) for p in paths])
    features = session.run(["f"], {"input": x})[0]
    del proto.graph.output[-1]
    inits = {i.name: i for i in proto.graph.initializer}
    weights = numpy_helper.to_array(inits["fc_W"])
    bias = numpy_helper.to_array(inits["fc_B"]).copy()
    for k in ACTIVE:
        bias[k] = -float((features @ weights[k]).mean())
    inits["fc_B"].CopyFrom(numpy_helper.from_array(bias.astype(np.float32), "fc_B"))
    onnx.save(proto, str(model))


#: Dominant colours of the generated images: the tiny models' features differ strongly between them, so
#: their predictions differ by much more than the quantization error of the well-behaved nodes.
TINTS = np.array(
    [[1, 0.15, 0.15], [0.15, 1, 0.15], [0.15, 0.15, 1], [1, 1, 0.15], [1, 0.15, 1], [0.15, 1, 1]]
)


def colored_images(folder: Path, count: int, *, size=(48, 40), start: int = 0) -> list[Path]:
    """Noise textures in one of six dominant colours (image i gets colour i % 6), seeded by `start`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1000 + start)
    paths = []
    for i in range(start, start + count):
        pixels = rng.uniform(0, 255, (size[1], size[0], 3)) * TINTS[i % len(TINTS)] * rng.uniform(0.7, 1.0)
        path = folder / f"img_{i:03d}.png"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def fp32_logits(model: Path, paths: list[Path], spec=SMALL_SPEC) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = np.stack([load_image(p, spec) for p in paths])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def labelled_by_fp32(model: Path, root: Path, staging: Path, *, min_margin: float = 0.1) -> dict[int, int]:
    """Move the staged images into `root/<wnid of the FP32 prediction>/`, keeping only those whose top-1
    logit leads the runner-up by `min_margin` × the largest logit magnitude (several times the INT8 error
    of the well-behaved nodes). Returns {class index: images}."""
    paths = sorted(staging.glob("*.png"))
    logits = fp32_logits(model, paths)
    top2 = np.sort(logits, axis=1)[:, -2:]
    min_margin *= float(np.abs(logits[:, list(ACTIVE)]).max())
    synsets = load_synsets()
    counts: dict[int, int] = {}
    for path, row, (second, first) in zip(paths, logits, top2, strict=True):
        if first - second < min_margin:
            continue
        k = int(row.argmax())
        dest = root / synsets[k].wnid / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, dest)
        counts[k] = counts.get(k, 0) + 1
    return counts


def tune_split(val: Path, fraction: float = 0.5):
    """The (tuning, held-out) halves of the validation folder `val`."""
    _dataset, samples = validation_samples(val, None, None)
    return split_for_tuning(samples, fraction)


# The recipe under which conv_sensitive breaks, as `rq quantize` options (PER_TENSOR, also for the pinned
# op types).
BREAKING = [
    "--op-types",
    "Conv,Gemm,MatMul",
    "--per-tensor",
    "--calibration",
    "minmax",
    "--reduce-range",
    "--samples",
    "16",
    "--batch-size",
    "8",
    "--workers",
    "2",
    "--resize",
    "36",
    "--crop",
    "32",
]
