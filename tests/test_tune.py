"""Accuracy-aware tuning (`quantize.tune`, through `quantize.pipeline.quantize_model`) on a model with one
deliberately sensitive node.

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

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import x86_cpu
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from test_cli_quantize import ENV, all_output
from tiny_models import SMALL_SPEC
from typer.testing import CliRunner

from calibration import Sample, load_image, load_synsets
from calibration.errors import RqInputError
from quantize.cli import app
from quantize.measure.validate import validation_samples
from quantize.pipeline import quantize_model, read_model_metadata
from quantize.recipe import METADATA_KEY, QuantRecipe
from quantize.tune import TuneRequest, split_for_tuning

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


@pytest.fixture(scope="module")
def sensitive(tmp_path_factory) -> Path:
    return sensitive_model(tmp_path_factory.mktemp("tune-models") / "sensitive.onnx")


@pytest.fixture(scope="module")
def sensitive_val(tmp_path_factory, sensitive) -> Path:
    """About 18 images labelled with the FP32 model's own (confident) predictions, of at least 2 classes."""
    base = tmp_path_factory.mktemp("tune-val")
    center_fc_bias(sensitive, colored_images(base / "staging", 36))
    counts = labelled_by_fp32(sensitive, base / "val", base / "staging")
    assert len(counts) >= 2 and sum(counts.values()) >= 12, counts
    return base / "val"


@pytest.fixture(scope="module")
def tune_calib(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tune-calib")
    colored_images(root, 16, start=500)
    return root


def _tune_split(val: Path, fraction: float = 0.5):
    _dataset, samples = validation_samples(val, None, None)
    return split_for_tuning(samples, fraction)


def test_sensitive_node_is_found_and_falls_back_alone(sensitive, sensitive_val, tune_calib, tmp_path):
    tune, _confirm = _tune_split(sensitive_val)
    out = tmp_path / "tuned-int8.onnx"
    result = quantize_model(
        sensitive,
        tune_calib,
        output=out,
        recipe=PER_TENSOR,
        spec=SMALL_SPEC,
        cpu=x86_cpu("avx2"),
        workers=2,
        tune=TuneRequest(max_drop_pt=0.0, tune_samples=tuple(tune), bench_runs=1),
    )
    t = result.tuning
    assert t is not None and t.backend == "ort"
    assert t.fp32_top1 == 100.0 and t.tune_images == len(tune)
    # step 0 (everything quantized) breaks the model: every prediction collapses onto one class
    assert t.steps[0].fallback == [] and t.steps[0].drop_pt > 0
    ranked = [node for node, _ in t.sensitivity]
    assert sorted(ranked) == ["conv_a", "conv_c", "conv_sensitive", "fc"]
    assert ranked[0] == "conv_sensitive"
    sqnr = dict(t.sensitivity)
    assert all(sqnr["conv_sensitive"] < sqnr[n] - 10 for n in ("conv_a", "conv_c", "fc")), t.sensitivity
    assert t.fallback_nodes == ["conv_sensitive"]
    assert t.goal_met is True and t.chosen == 1 and len(t.steps) == 2
    assert t.steps[1].added == "conv_sensitive" and t.steps[1].drop_pt <= 0.0
    # the published model is the chosen step
    assert out.is_file() and result.output == out
    assert result.recipe.exclude_nodes == ("conv_sensitive",)
    stored = json.loads(read_model_metadata(out)[METADATA_KEY])
    assert stored["exclude_nodes"] == ["conv_sensitive"]
    assert stored["per_channel"] is False and stored["calibration"] == "minmax"
    ops = result.quantized_ops
    assert (ops.quantized, ops.candidates) == (3, 4)
    assert ops.by_type == {"Conv": [2, 3], "Gemm": [1, 1]}
    assert ops.fp32 == {"conv_sensitive": ["Conv", "fell back in tuning"]}
    # every step was benchmarked against FP32 (batch 1); no speed figure is asserted
    assert all(s.speed_ratio and set(s.speed_ratio) == {"1"} for s in t.steps)
    data = t.to_dict()
    assert data["fallback_nodes"] == ["conv_sensitive"] and data["sensitivity"][0]["node"] == "conv_sensitive"


def test_tuned_model_keeps_fp32_predictions_on_held_out_images(
    sensitive, sensitive_val, tune_calib, tmp_path
):
    """The confirmation images (never seen by the tuner) agree with FP32 once conv_sensitive is FP32."""
    tune, confirm = _tune_split(sensitive_val)
    out = tmp_path / "tuned-int8.onnx"
    quantize_model(
        sensitive,
        tune_calib,
        output=out,
        recipe=PER_TENSOR,
        spec=SMALL_SPEC,
        cpu=x86_cpu("avx2"),
        workers=2,
        tune=TuneRequest(max_drop_pt=0.0, tune_samples=tuple(tune), bench_runs=0),
    )
    paths = [s.path for s in confirm]
    labels = np.array([s.label for s in confirm])
    assert (fp32_logits(out, paths).argmax(axis=1) == labels).all()


def test_goal_not_reachable_keeps_the_best_step(tmp_path, tune_calib):
    """Two sensitive nodes, one trial: falling back one of them cannot meet the goal; a model is still
    written, the goal is reported NOT met, and a note names the step kept."""
    model = sensitive_model(tmp_path / "two.onnx", n_sensitive=2, seed=0)
    center_fc_bias(model, colored_images(tmp_path / "staging", 36))
    counts = labelled_by_fp32(model, tmp_path / "val", tmp_path / "staging")
    assert len(counts) >= 2, counts
    tune, _confirm = _tune_split(tmp_path / "val")
    out = tmp_path / "two-int8.onnx"
    result = quantize_model(
        model,
        tune_calib,
        output=out,
        recipe=PER_TENSOR,
        spec=SMALL_SPEC,
        cpu=x86_cpu("avx2"),
        workers=2,
        tune=TuneRequest(max_drop_pt=0.0, tune_samples=tuple(tune), max_trials=1, bench_runs=0),
    )
    t = result.tuning
    assert out.is_file()
    assert t.goal_met is False
    assert len(t.steps) == 2  # step 0 and the one trial allowed
    assert t.steps[1].added in ("conv_sensitive1", "conv_sensitive2")
    assert all(s.drop_pt > 0 for s in t.steps)
    # no step meets the goal: the most faithful one (top-1 agreement with FP32, then softmax KL) is kept
    best = max(t.steps, key=lambda s: (s.agreement_pct, -s.softmax_kl, -len(s.fallback)))
    assert t.chosen == best.step
    assert len(t.notes) == 1 and f"kept the most faithful: step {best.step}" in t.notes[0]
    stored = json.loads(read_model_metadata(out)[METADATA_KEY])
    assert stored["exclude_nodes"] == list(best.fallback)


def _samples(n: int) -> list[Sample]:
    return [Sample(Path(f"/val/img_{i:03d}.JPEG"), i % 7) for i in range(n)]


def test_split_for_tuning_is_deterministic_and_disjoint():
    samples = _samples(41)
    tune, confirm = split_for_tuning(samples, 0.5)
    assert (tune, confirm) == split_for_tuning(samples, 0.5, seed=0)
    assert not {s.path for s in tune} & {s.path for s in confirm}
    assert sorted(tune + confirm, key=lambda s: s.path) == samples
    assert len(tune) == round(41 * 0.5)
    assert tune == sorted(tune, key=lambda s: s.path)
    other_tune, _ = split_for_tuning(samples, 0.5, seed=1)
    assert other_tune != tune  # the seed matters
    small_tune, small_confirm = split_for_tuning(samples, 0.1)
    assert len(small_tune) == 4 and len(small_confirm) == 37


def test_split_for_tuning_keeps_one_image_on_each_side():
    tune, confirm = split_for_tuning(_samples(2), 0.01)
    assert len(tune) == len(confirm) == 1
    tune, confirm = split_for_tuning(_samples(3), 0.99)
    assert len(tune) == 2 and len(confirm) == 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 1.5])
def test_split_for_tuning_fraction_must_be_inside_0_1(fraction):
    with pytest.raises(RqInputError, match="--tune-fraction"):
        split_for_tuning(_samples(10), fraction)


def test_split_for_tuning_needs_two_images():
    with pytest.raises(RqInputError, match="at least 2"):
        split_for_tuning(_samples(1), 0.5)


def test_cli_tune_falls_back_the_sensitive_node_and_gates_on_held_out_images(
    sensitive, sensitive_val, tune_calib, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "tuned-int8.onnx"
    reports = tmp_path / "reports"
    args = [
        sensitive,
        "--calib",
        tune_calib,
        "--val",
        sensitive_val,
        "--max-drop",
        "0",
        "--tune",
        "--out",
        out,
    ]
    args += ["--report-dir", reports, "--per-tensor", "--calibration", "minmax", "--reduce-range"]
    args += ["--samples", "16", "--workers", "2", "--resize", "36", "--crop", "32", "--json"]
    args += ["--op-types", "Conv,Gemm,MatMul"]  # as PER_TENSOR: see there
    result = CliRunner().invoke(app, ["quantize", *[str(a) for a in args]], env=ENV)
    assert result.exit_code == 0, all_output(result)
    data = json.loads(result.stdout)
    tuning = data["tuning"]
    assert tuning["fallback_nodes"] == ["conv_sensitive"] and tuning["goal_met"] is True
    assert tuning["sensitivity"][0]["node"] == "conv_sensitive"
    _dataset, samples = validation_samples(sensitive_val, None, None)
    tune, confirm = split_for_tuning(samples, 0.5)
    # tuned on one half, validated and gated on the other
    assert tuning["tune_images"] == len(tune)
    assert data["validation"]["images"] == len(confirm)
    assert data["gate"]["passed"] is True and data["variants"][1]["drop"]["drop_pt"] == 0.0
    assert data["variants"][1]["recipe"]["exclude_nodes"] == ["conv_sensitive"]
    assert any("tuning" in note for note in data["notes"])
    (run,) = [p for p in reports.iterdir() if p.is_dir()]
    assert "## Tuning" in (run / "report.md").read_text()
    assert json.loads(read_model_metadata(out)[METADATA_KEY])["exclude_nodes"] == ["conv_sensitive"]


def test_cli_eval_batch_reaches_the_tuning_passes(
    sensitive, sensitive_val, tune_calib, tmp_path, monkeypatch
):
    """`--eval-batch` is the batch size of tuning's validation passes too, not only of the confirmation."""
    import quantize.tune as tune_module

    batches: list[int] = []
    real_pool = tune_module.run_pool

    def recording_pool(path, samples, spec, batch, workers, ray=None):
        batches.append(batch)
        return real_pool(path, samples, spec, batch, workers, ray)

    monkeypatch.setattr(tune_module, "run_pool", recording_pool)
    monkeypatch.chdir(tmp_path)
    args = [sensitive, "--calib", tune_calib, "--val", sensitive_val, "--max-drop", "0", "--tune"]
    args += ["--out", tmp_path / "int8.onnx", "--report-dir", tmp_path / "reports", "--per-tensor"]
    args += ["--calibration", "minmax", "--reduce-range", "--samples", "16", "--workers", "2"]
    args += ["--resize", "36", "--crop", "32", "--op-types", "Conv,Gemm,MatMul", "--eval-batch", "3"]
    result = CliRunner().invoke(app, ["quantize", *[str(a) for a in args]], env=ENV)
    assert result.exit_code == 0, all_output(result)
    assert len(batches) >= 2 and set(batches) == {3}
