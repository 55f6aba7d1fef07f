"""Builders of tiny ONNX classifiers (onnx.helper, seeded weights) for the quantization tests.

Every builder writes the model to ``path`` and returns ``path``. Inputs are ``[N, 3, 32, 32]`` float32 so that
``SMALL_SPEC`` (resize 36, crop 32) feeds them; outputs are ``[N, 10]`` logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibration import PreprocessSpec

HW = 32
CLASSES = 10
#: Preprocessing that produces the tiny models' 32×32 inputs from small generated images.
SMALL_SPEC = PreprocessSpec(resize=36, crop=32)


class _Weights:
    """Collects seeded random initializers."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.initializers: list[onnx.TensorProto] = []

    def add(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def conv(self, name: str, cout: int, cin: int, k: int = 3) -> tuple[str, str]:
        fan_in = cin * k * k
        w = self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / fan_in)
        b = self.rng.standard_normal(cout) * 0.05
        return self.add(f"{name}_W", w), self.add(f"{name}_B", b)

    def bn(self, name: str, c: int) -> list[str]:
        return [
            self.add(f"{name}_gamma", self.rng.uniform(0.5, 1.5, c)),
            self.add(f"{name}_beta", self.rng.standard_normal(c) * 0.1),
            self.add(f"{name}_mean", self.rng.standard_normal(c) * 0.1),
            self.add(f"{name}_var", self.rng.uniform(0.5, 1.5, c)),
        ]

    def gemm(self, name: str, cout: int, cin: int) -> tuple[str, str]:
        w = self.rng.standard_normal((cout, cin)) * np.sqrt(1.0 / cin)
        b = self.rng.standard_normal(cout) * 0.05
        return self.add(f"{name}_W", w), self.add(f"{name}_B", b)


def _save(model: onnx.ModelProto, path: Path | str) -> Path:
    path = Path(path)
    onnx.save(model, str(path))
    return path


def tiny_cnn(path: Path | str, opset: int = 13, *, batch: int | str = "N", seed: int = 0) -> Path:
    """``[N,3,32,32]`` → Conv(8) → BatchNormalization → Relu → Conv(16) → Relu → GlobalAveragePool → Flatten
    → Gemm(10). Node names: conv1, bn1, relu1, conv2, relu2, gap, flatten, fc."""
    w = _Weights(seed)
    c1w, c1b = w.conv("conv1", 8, 3)
    bn1 = w.bn("bn1", 8)
    c2w, c2b = w.conv("conv2", 16, 8)
    fcw, fcb = w.gemm("fc", CLASSES, 16)
    nodes = [
        helper.make_node("Conv", ["input", c1w, c1b], ["conv1_out"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv1_out", *bn1], ["bn1_out"], name="bn1", epsilon=1e-5),
        helper.make_node("Relu", ["bn1_out"], ["relu1_out"], name="relu1"),
        helper.make_node(
            "Conv", ["relu1_out", c2w, c2b], ["conv2_out"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]
        ),
        helper.make_node("Relu", ["conv2_out"], ["relu2_out"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["relu2_out"], ["gap_out"], name="gap"),
        helper.make_node("Flatten", ["gap_out"], ["flat_out"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat_out", fcw, fcb], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, HW, HW])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, CLASSES])],
        initializer=w.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    return _save(model, path)


def fixed_batch1(path: Path | str, seed: int = 0) -> Path:
    """`tiny_cnn` with its batch dimension fixed to 1 (``[1,3,32,32]`` → ``[1,10]``)."""
    return tiny_cnn(path, batch=1, seed=seed)


def v2_shaped_opset7(path: Path | str, seed: int = 1) -> Path:
    """A ResNet-v2-shaped (pre-activation) classifier stored like the zoo's ``resnet50-v2-7.onnx``.

    Opset 7, IR version 3, every initializer also listed as a graph input, BatchNormalization nodes carrying
    ``spatial=1``, ``momentum`` and ``epsilon``. The data BN and the BNs after the residual Add and in front of
    each block read a non-Conv tensor, so they cannot be folded into a preceding Conv:

        data → bn_data → conv0 → bn0 → relu0 → MaxPool
          ├→ bn1 → relu1 ─┬→ conv1 → bn2 → relu2 → conv2 ─┐
          │               └→ conv_sc (projection shortcut) ─┴→ Add
        Add → bn3 → relu3 → conv3 → Add(residual with the first Add) → bn_final → relu_final
          → GlobalAveragePool → Flatten → Gemm(10)
    """
    w = _Weights(seed)

    def bn(name: str, x: str, c: int) -> onnx.NodeProto:
        return helper.make_node(
            "BatchNormalization",
            [x, *w.bn(name, c)],
            [f"{name}_out"],
            name=name,
            epsilon=2e-5,
            momentum=0.9,
            spatial=1,
        )

    def conv(name: str, x: str, cout: int, cin: int, k: int = 3, stride: int = 1) -> onnx.NodeProto:
        cw, cb = w.conv(name, cout, cin, k)
        pad = k // 2
        return helper.make_node(
            "Conv",
            [x, cw, cb],
            [f"{name}_out"],
            name=name,
            kernel_shape=[k, k],
            pads=[pad] * 4,
            strides=[stride, stride],
        )

    def relu(name: str, x: str) -> onnx.NodeProto:
        return helper.make_node("Relu", [x], [f"{name}_out"], name=name)

    nodes = [
        bn("bn_data", "data", 3),
        conv("conv0", "bn_data_out", 8, 3, k=3),
        bn("bn0", "conv0_out", 8),
        relu("relu0", "bn0_out"),
        helper.make_node(
            "MaxPool", ["relu0_out"], ["pool0_out"], name="pool0", kernel_shape=[2, 2], strides=[2, 2]
        ),
        # block 1 (projection shortcut from the pre-activated input, as in ResNet v2)
        bn("bn1", "pool0_out", 8),
        relu("relu1", "bn1_out"),
        conv("conv1", "relu1_out", 16, 8),
        bn("bn2", "conv1_out", 16),
        relu("relu2", "bn2_out"),
        conv("conv2", "relu2_out", 16, 16),
        conv("conv_sc", "relu1_out", 16, 8, k=1),
        helper.make_node("Add", ["conv2_out", "conv_sc_out"], ["add1_out"], name="add1"),
        # block 2 (identity shortcut): the BN directly after an Add
        bn("bn3", "add1_out", 16),
        relu("relu3", "bn3_out"),
        conv("conv3", "relu3_out", 16, 16),
        helper.make_node("Add", ["conv3_out", "add1_out"], ["add2_out"], name="add2"),
        bn("bn_final", "add2_out", 16),
        relu("relu_final", "bn_final_out"),
        helper.make_node("GlobalAveragePool", ["relu_final_out"], ["gap_out"], name="gap"),
        helper.make_node("Flatten", ["gap_out"], ["flat_out"], name="flatten", axis=1),
    ]
    fcw, fcb = w.gemm("fc", CLASSES, 16)
    nodes.append(helper.make_node("Gemm", ["flat_out", fcw, fcb], ["logits"], name="fc", transB=1))
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, HW, HW])]
    # IR 3: every initializer is also a graph input.
    inputs += [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in w.initializers]
    graph = helper.make_graph(
        nodes,
        "v2_shaped_opset7",
        inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=w.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=3)
    model.producer_name = "rq-tests (zoo-style opset 7)"
    return _save(model, path)


def two_inputs(path: Path | str) -> Path:
    """Two image inputs added together, then a classifier head."""
    w = _Weights(2)
    fcw, fcb = w.gemm("fc", CLASSES, 3)
    nodes = [
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("GlobalAveragePool", ["s"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", fcw, fcb], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3, HW, HW]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3, HW, HW]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=w.initializers,
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)


def non4d_input(path: Path | str) -> Path:
    """A 2-D input ``[N, 16]`` → Gemm(10): not an image classifier."""
    w = _Weights(3)
    fcw, fcb = w.gemm("fc", CLASSES, 16)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", fcw, fcb], ["logits"], transB=1)],
        "non4d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=w.initializers,
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)


def bad_output_rank(path: Path | str) -> Path:
    """An image input whose output is a 4-D feature map ``[N, 8, 32, 32]``, not ``[N, classes]``."""
    w = _Weights(4)
    cw, cb = w.conv("conv", 8, 3)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", cw, cb], ["y"], pads=[1, 1, 1, 1])],
        "bad_output_rank",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, HW, HW])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, HW, HW])],
        initializer=w.initializers,
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)


def conv_channel_mismatch(path: Path | str) -> Path:
    """`tiny_cnn` whose first Conv weight expects 4 input channels while the image has 3.

    The file passes ``onnx.checker`` but ONNX Runtime cannot run it (the Conv's channel count does not match):
    an FP32 model that is broken, i.e. bad input. Its head has 1000 classes, so every rq command gets as far
    as running it.
    """
    return _save(_conv_gap_gemm("conv_channel_mismatch", 5, conv_in=4, features=8, classes=1000), path)


def gemm_feature_mismatch(path: Path | str) -> Path:
    """`tiny_cnn` whose classifier Gemm takes 24 features while the pooled tensor has 16.

    ORT's symbolic shape inference cannot complete on it (and, left alone, saves scratch files into the
    current directory); ONNX Runtime cannot run it either.
    """
    return _save(_conv_gap_gemm("gemm_feature_mismatch", 6, conv_out=16, features=24), path)


def rgb_stem_cnn(path: Path | str, *, stem_out: int = 16, seed: int = 5) -> Path:
    """Conv(3 → stem_out) → Relu → GlobalAveragePool → Flatten → Gemm(10): a first convolution on the RGB image
    (3 input channels, like every ImageNet CNN's stem) with enough output channels for ONNX Runtime's direct
    int8 kernel once its input is padded to 4 channels (quantize.graph.channel_pad)."""
    return _save(_conv_gap_gemm("rgb_stem_cnn", seed, conv_out=stem_out, features=stem_out), path)


def _conv_gap_gemm(
    name: str, seed: int, *, conv_in: int = 3, conv_out: int = 8, features: int = 8, classes: int = CLASSES
) -> onnx.ModelProto:
    """Conv(conv_in → conv_out) → Relu → GlobalAveragePool → Flatten → Gemm(features → classes) on the usual
    [N, 3, HW, HW] input: channel counts that disagree make a model ONNX Runtime cannot run."""
    w = _Weights(seed)
    c1w, c1b = w.conv("conv1", conv_out, conv_in)
    fcw, fcb = w.gemm("fc", classes, features)
    nodes = [
        helper.make_node("Conv", ["input", c1w, c1b], ["conv1_out"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1_out"], ["relu1_out"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["relu1_out"], ["gap_out"], name="gap"),
        helper.make_node("Flatten", ["gap_out"], ["flat_out"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat_out", fcw, fcb], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, HW, HW])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=w.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def tiny_imagenet_cnn(path: Path | str, seed: int = 0) -> Path:
    """`tiny_cnn` with a 1000-class head (``[N, 1000]`` logits), so that rq can validate it on ImageNet folders."""
    model = onnx.load(str(tiny_cnn(path, seed=seed)))
    rng = np.random.default_rng(seed + 1)
    for init in model.graph.initializer:
        if init.name == "fc_W":
            init.CopyFrom(
                numpy_helper.from_array((rng.standard_normal((1000, 16)) * 0.25).astype(np.float32), "fc_W")
            )
        elif init.name == "fc_B":
            init.CopyFrom(numpy_helper.from_array(np.zeros(1000, np.float32), "fc_B"))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 1000
    onnx.checker.check_model(model)
    return _save(model, path)


def random_inputs(n: int, seed: int = 0) -> np.ndarray:
    """Inputs that look like normalised images: ``[n, 3, 32, 32]`` float32, roughly N(0, 1)."""
    return np.random.default_rng(seed).standard_normal((n, 3, HW, HW)).astype(np.float32)


__all__ = [
    "CLASSES",
    "HW",
    "SMALL_SPEC",
    "bad_output_rank",
    "conv_channel_mismatch",
    "fixed_batch1",
    "gemm_feature_mismatch",
    "non4d_input",
    "random_inputs",
    "tiny_cnn",
    "tiny_imagenet_cnn",
    "two_inputs",
    "v2_shaped_opset7",
]


def conv_strides(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Conv name → its strides (1 per axis when the attribute is absent)."""
    return {
        n.name: next((list(a.ints) for a in n.attribute if a.name == "strides"), [1, 1])
        for n in model.graph.node
        if n.op_type == "Conv"
    }
