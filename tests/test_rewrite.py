"""Preparation's BatchNormalization rewrite: every placement becomes an exact affine (or is folded), verified
against the original FP32 graph; after quantization ORT runs the v2 blocks without float BN/Add."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import quantize.graph.rewrite as rewrite
from quantize.graph.prepare import prepare_model
from quantize.graph.rewrite import rewrite_batchnorms
from quantize.pipeline import quantize_model
from quantize.recipe import QuantRecipe
from tests.helpers.tiny_models import HW, SMALL_SPEC, conv_strides, random_inputs

#: Q/DQ on Add, Relu and pooling too (until the placement-from-the-graph recipe is the default).
FULL_OPS = ("Conv", "Gemm", "MatMul", "Add", "Relu", "MaxPool", "GlobalAveragePool")


def run(model: onnx.ModelProto | Path, x: np.ndarray, *, optimize: bool = False) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def _bn(rng, name: str, x: str, c: int, inits: list) -> onnx.NodeProto:
    params = {
        "gamma": rng.uniform(0.5, 1.5, c),
        "beta": rng.standard_normal(c) * 0.3,
        "mean": rng.standard_normal(c) * 0.3,
        "var": rng.uniform(0.2, 2.0, c),
    }
    names = []
    for key, value in params.items():
        inits.append(numpy_helper.from_array(value.astype(np.float32), f"{name}_{key}"))
        names.append(f"{name}_{key}")
    return helper.make_node("BatchNormalization", [x, *names], [f"{name}_out"], name=name, epsilon=1e-3)


def _conv(rng, name: str, x: str, cout: int, cin: int, inits: list, *, bias: bool = True) -> onnx.NodeProto:
    inits.append(
        numpy_helper.from_array(
            (rng.standard_normal((cout, cin, 3, 3)) * 0.3).astype(np.float32), f"{name}_W"
        )
    )
    inputs = [x, f"{name}_W"]
    if bias:
        inits.append(
            numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32), f"{name}_B")
        )
        inputs.append(f"{name}_B")
    return helper.make_node("Conv", inputs, [f"{name}_out"], name=name, pads=[1, 1, 1, 1])


def every_placement() -> onnx.ModelProto:
    """BN at the graph input; after a Conv with one consumer (foldable, no bias); after a Conv whose output has
    two consumers; after an Add; a BN whose output feeds two consumers; a BN on a 2-D tensor (left alone)."""
    rng = np.random.default_rng(7)
    inits: list = []
    nodes = [
        _bn(rng, "bn_in", "x", 3, inits),  # graph input
        _conv(rng, "c1", "bn_in_out", 8, 3, inits, bias=False),
        _bn(rng, "bn_c1", "c1_out", 8, inits),  # after a Conv it may be folded into
        _conv(rng, "c2", "bn_c1_out", 8, 8, inits),
        _bn(rng, "bn_c2", "c2_out", 8, inits),  # c2_out also feeds the Add: not foldable
        helper.make_node("Add", ["bn_c2_out", "c2_out"], ["add_out"], name="add"),
        _bn(rng, "bn_add", "add_out", 8, inits),  # after an Add; feeds two consumers
        helper.make_node("Relu", ["bn_add_out"], ["relu_out"], name="relu"),
        helper.make_node("Add", ["relu_out", "bn_add_out"], ["add2_out"], name="add2"),
        helper.make_node("GlobalAveragePool", ["add2_out"], ["gap_out"], name="gap"),
        helper.make_node("Flatten", ["gap_out"], ["flat_out"], name="flatten"),
        _bn(rng, "bn_flat", "flat_out", 8, inits),  # 2-D: no Conv form, left as it is
    ]
    graph = helper.make_graph(
        nodes,
        "every_placement",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, HW, HW])],
        [helper.make_tensor_value_info("bn_flat_out", TensorProto.FLOAT, ["N", 8])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def test_every_placement_is_rewritten_exactly():
    original = every_placement()
    model = onnx.ModelProto()
    model.CopyFrom(original)
    result = rewrite_batchnorms(model)
    assert sorted(result.depthwise) == ["bn_add", "bn_c2"]
    assert result.folded == ["bn_c1"]
    assert result.skipped == [
        f"bn_in: {rewrite.INPUT_REASON}",
        "bn_flat: input rank 2 (needs [N, C, spatial…])",
    ]
    onnx.checker.check_model(model, full_check=True)

    ops = Counter(n.op_type for n in model.graph.node)
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert [n.name for n in bns] == ["bn_in", "bn_flat"]  # the input normalization and the 2-D one
    assert bns[0].input[0] == "x"
    depthwise = {n.name: n for n in model.graph.node if n.op_type == "Conv" and n.name.startswith("bn_")}
    assert set(depthwise) == {"bn_c2", "bn_add"}
    for node in depthwise.values():
        assert next(a.i for a in node.attribute if a.name == "group") == 8
    assert ops["Conv"] == 4
    # The replaced BN parameters are gone, the kept ones are not.
    names = {i.name for i in model.graph.initializer}
    assert not any(n.startswith("bn_add_") and n.endswith(("_gamma", "_var")) for n in names)
    assert {"bn_in_gamma", "bn_in_var"} <= names

    x = random_inputs(3, seed=5)
    for a, b in zip(run(original, x), run(model, x), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_model_without_batchnorm_is_untouched(tiny_model):
    model = onnx.load(str(tiny_model))
    for node in model.graph.node:  # drop the BN: conv1 → relu1 directly
        if node.op_type == "Relu" and node.input[0] == "bn1_out":
            node.input[0] = "conv1_out"
    keep = [n for n in model.graph.node if n.op_type != "BatchNormalization"]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    before = model.SerializeToString()
    assert rewrite_batchnorms(model).changed == 0
    assert model.SerializeToString() == before


def test_prepare_rewrites_v2_and_keeps_outputs(v2_model, tmp_path):
    prepared = prepare_model(v2_model, tmp_path)
    step = next(s for s in prepared.steps if "depthwise 1×1 Conv" in s)
    assert "FP32 outputs checked" in step
    assert "1 left as they are (bn_data: it normalizes the graph input" in step
    model = onnx.load(str(prepared.path))
    # Only the data normalization in front of the first quantize stays a BatchNormalization.
    assert [(n.name, n.input[0]) for n in model.graph.node if n.op_type == "BatchNormalization"] == [
        ("bn_data", "data")
    ]
    x = random_inputs(4, seed=11)
    np.testing.assert_allclose(run(prepared.path, x)[0], run(v2_model, x)[0], rtol=1e-4, atol=1e-4)


def test_prepare_keeps_the_original_when_the_rewrite_changes_outputs(v2_model, tmp_path, monkeypatch):
    real = rewrite.rewrite_batchnorms

    def wrong(model):
        result = real(model)
        for init in model.graph.initializer:  # a bias twice too large: no longer the same function
            if init.name.endswith("_affine_B"):
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 2 + 1, init.name))
        return result

    monkeypatch.setattr(rewrite, "rewrite_batchnorms", wrong)
    prepared = prepare_model(v2_model, tmp_path)
    assert not any("depthwise" in s for s in prepared.steps)
    assert any("not applied: FP32 outputs changed" in w for w in prepared.warnings)
    model = onnx.load(str(prepared.path))
    assert [n for n in model.graph.node if n.op_type == "BatchNormalization"]


def _optimized_ops(int8: Path, tmp_path: Path) -> list[onnx.NodeProto]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    return list(onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


@pytest.mark.parametrize("ops", [FULL_OPS])
def test_int8_v2_runs_without_float_batchnorm_or_add(ops, v2_model, calib_dir, tmp_path, vnni_cpu):
    output = tmp_path / "v2-int8.onnx"
    recipe = QuantRecipe(samples=16, batch_size=4, op_types=ops)
    quantize_model(
        v2_model, calib_dir, output=output, recipe=recipe, spec=SMALL_SPEC, cpu=vnni_cpu, workers=2
    )
    nodes = _optimized_ops(output, tmp_path)
    types = Counter(n.op_type for n in nodes)
    # The data normalization runs in float on the graph input, and feeds the first (only) quantize.
    (bn,) = [n for n in nodes if n.op_type == "BatchNormalization"]
    assert bn.input[0] == "data"
    assert [n.op_type for n in nodes if bn.output[0] in n.input] == ["QuantizeLinear"]
    assert types["QuantizeLinear"] == 1
    assert types["Add"] == 0, "a residual Add still runs in float"
    assert types["QLinearAdd"] == 2
    # Every convolution, the 3 rewritten BNs (bn1, bn3, bn_final) included, runs as QLinearConv.
    assert types["QLinearConv"] == 8
    # No float arithmetic between the integer convolutions (Transpose/NhwcMaxPool are layout ops on uint8).
    float_math = {"Add", "Relu", "Conv", "FusedConv", "Mul", "Sum", "MaxPool"}
    assert not float_math & set(types), types
    x = random_inputs(2, seed=1)
    assert np.isfinite(run(output, x, optimize=True)[0]).all()


def _strided_graph(nodes, inits, outputs: dict[str, list], hw: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "strided",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, hw, hw])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs.items()],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _same_outputs(original: onnx.ModelProto, model: onnx.ModelProto, hw: int = 17) -> None:
    x = np.random.default_rng(4).standard_normal((2, 3, hw, hw)).astype(np.float32)
    for a, b in zip(run(original, x), run(model, x), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def _conv_factory(seed: int, inits: list):
    rng = np.random.default_rng(seed)

    def conv(name, x, cout, cin, k, **attrs):
        w = (rng.standard_normal((cout, cin, k, k)) * 0.3).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{name}_W"))
        return helper.make_node("Conv", [x, f"{name}_W"], [f"{name}_out"], name=name, **attrs)

    return conv


def test_a_downsampling_block_computes_only_the_pixels_its_strided_convs_read():
    """ResNet-50 v1's down-sampling: t = Relu(Add(conv_c(Relu(conv_b(h))), h)), read only by two 1×1 stride-2
    Convs. The subsampling moves up through the Relu, the Add, the 1×1 conv_c and the Relu into the 3×3 conv_b
    (now stride 2); the shortcut h has another reader (conv_b), so it gets a Slice."""
    inits: list = []
    conv = _conv_factory(3, inits)
    nodes = [
        conv("stem", "x", 4, 3, 3, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["stem_out"], ["h"], name="relu_h"),
        conv("conv_b", "h", 4, 4, 3, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv_b_out"], ["b"], name="relu_b"),
        conv("conv_c", "b", 4, 4, 1),
        helper.make_node("Add", ["conv_c_out", "h"], ["sum"], name="add"),
        helper.make_node("Relu", ["sum"], ["t"], name="relu_t"),
        conv("next_a", "t", 8, 4, 1, strides=[2, 2]),
        conv("next_proj", "t", 8, 4, 1, strides=[2, 2]),
    ]
    original = _strided_graph(nodes, inits, {"next_a_out": ["N", 8, 9, 9], "next_proj_out": ["N", 8, 9, 9]})
    model = onnx.ModelProto()
    model.CopyFrom(original)
    done = rewrite.rewrite_strided_pointwise(model)
    onnx.checker.check_model(model)
    assert done.convs == ["next_a", "next_proj"] and done.slices == 1
    assert set(done.lowered) == {"relu_t", "add", "conv_c", "relu_b", "conv_b"}
    assert conv_strides(model) == {
        "stem": [1, 1],
        "conv_b": [2, 2],
        "conv_c": [1, 1],
        "next_a": [1, 1],
        "next_proj": [1, 1],
    }
    (slice_node,) = [n for n in model.graph.node if n.op_type == "Slice"]
    assert slice_node.input[0] == "h"  # the shortcut, which conv_b reads at full resolution
    assert "1 Slice" in done.describe() and "5 node(s)" in done.describe()
    _same_outputs(original, model)


def test_strided_convs_of_a_graph_input_read_a_slice_and_other_strides_are_left_alone():
    """Left as they are: a strided 1×1 Conv whose input has a stride-1 reader too (ResNet v2's projection), a
    padded one, a 3×3 stride 2. A graph input read only by 1×1 stride-2 Convs: one shared Slice."""
    inits: list = []
    conv = _conv_factory(5, inits)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        conv("v2_proj", "r", 4, 3, 1, strides=[2, 2]),
        conv("v2_conv1", "r", 4, 3, 1),
        conv("padded", "r", 4, 3, 1, strides=[2, 2], pads=[1, 1, 1, 1]),
        conv("k3", "r", 4, 3, 3, strides=[2, 2], pads=[1, 1, 1, 1]),
    ]
    outputs = {f"{n}_out": ["N", 4, None, None] for n in ("v2_proj", "v2_conv1", "padded", "k3")}
    original = _strided_graph(nodes, inits, outputs)
    model = onnx.ModelProto()
    model.CopyFrom(original)
    assert rewrite.rewrite_strided_pointwise(model).convs == []
    assert model == original

    inits = []
    conv = _conv_factory(6, inits)
    nodes = [conv("s2a", "x", 4, 3, 1, strides=[2, 2]), conv("s2b", "x", 4, 3, 1, strides=[2, 2])]
    original = _strided_graph(nodes, inits, {"s2a_out": ["N", 4, 9, 9], "s2b_out": ["N", 4, 9, 9]})
    model = onnx.ModelProto()
    model.CopyFrom(original)
    done = rewrite.rewrite_strided_pointwise(model)
    onnx.checker.check_model(model)
    assert done.convs == ["s2a", "s2b"] and done.slices == 1 and done.lowered == []
    (slice_node,) = [n for n in model.graph.node if n.op_type == "Slice"]
    assert slice_node.input[0] == "x"
    assert conv_strides(model) == {"s2a": [1, 1], "s2b": [1, 1]}
    _same_outputs(original, model)
    # Opset 9 has no Slice steps: nothing changes.
    old = onnx.ModelProto()
    old.CopyFrom(original)
    old.opset_import[0].version = 9
    assert rewrite.rewrite_strided_pointwise(old).convs == []
