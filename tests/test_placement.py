"""Placement from the graph: where Q/DQ nodes land, and that ORT then runs the layers with integer kernels.

Each pattern is a tiny generated graph; the check reads the graph ORT actually executes (the optimized model
it writes with `optimized_model_filepath`), not speeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration.errors import RqInputError
from quantize.backends.ort import count_quantized, quantize_with_ort
from quantize.calibrate import calibrate
from quantize.graph.placement import HEAD_REASON, NothingToQuantize, place, require_something
from quantize.graph.prepare import prepare_model
from quantize.recipe import LEGACY_OP_TYPES, QuantRecipe
from tests.helpers.tiny_models import CLASSES, _Weights, conv_strides, random_inputs

HW = 32
CALIB = random_inputs(16, seed=21)
TEST = random_inputs(8, seed=22)


def _model(nodes, w: _Weights, path: Path, extra_inits=()) -> Path:
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, HW, HW])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=w.initializers + list(extra_inits),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _head(w: _Weights, src: str, channels: int) -> list:
    fcw, fcb = w.gemm("fc", CLASSES, channels)
    return [
        helper.make_node("GlobalAveragePool", [src], ["gap_out"], name="gap"),
        helper.make_node("Flatten", ["gap_out"], ["flat_out"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat_out", fcw, fcb], ["logits"], name="fc", transB=1),
    ]


def _clip(name: str, src: str, w: _Weights) -> object:
    low, high = w.add(f"{name}_min", np.array(0.0)), w.add(f"{name}_max", np.array(6.0))
    return helper.make_node("Clip", [src, low, high], [f"{name}_out"], name=name)


def conv_clip(path: Path) -> Path:
    """Conv → Clip(0, 6) → Conv → Clip → GAP → Flatten → Gemm (ReLU6 as exported by torch)."""
    w = _Weights(1)
    c1w, c1b = w.conv("conv1", 8, 3)
    c2w, c2b = w.conv("conv2", 16, 8)
    nodes = [
        helper.make_node("Conv", ["input", c1w, c1b], ["conv1_out"], name="conv1", pads=[1, 1, 1, 1]),
        _clip("clip1", "conv1_out", w),
        helper.make_node("Conv", ["clip1_out", c2w, c2b], ["conv2_out"], name="conv2", pads=[1, 1, 1, 1]),
        _clip("clip2", "conv2_out", w),
        *_head(w, "clip2_out", 16),
    ]
    return _model(nodes, w, path)


def conv_relu_add(path: Path) -> Path:
    """A residual block: Conv → Relu = a; Conv(a) → Relu → Conv = b; Add(a, b) → Relu → head."""
    w = _Weights(2)
    c1w, c1b = w.conv("conv1", 8, 3)
    c2w, c2b = w.conv("conv2", 8, 8)
    c3w, c3b = w.conv("conv3", 8, 8)
    nodes = [
        helper.make_node("Conv", ["input", c1w, c1b], ["conv1_out"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1_out"], ["a"], name="relu1"),
        helper.make_node("Conv", ["a", c2w, c2b], ["conv2_out"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv2_out"], ["relu2_out"], name="relu2"),
        helper.make_node("Conv", ["relu2_out", c3w, c3b], ["b"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["a", "b"], ["sum"], name="add"),
        helper.make_node("Relu", ["sum"], ["relu3_out"], name="relu3"),
        *_head(w, "relu3_out", 8),
    ]
    return _model(nodes, w, path)


def depthwise(path: Path) -> Path:
    """Conv → Clip → depthwise Conv (group 8) → Clip → pointwise Conv → head (a MobileNet block)."""
    w = _Weights(3)
    c1w, c1b = w.conv("conv1", 8, 3)
    dww, dwb = w.conv("dw", 8, 1)
    pww, pwb = w.conv("pw", 16, 8, k=1)
    nodes = [
        helper.make_node("Conv", ["input", c1w, c1b], ["conv1_out"], name="conv1", pads=[1, 1, 1, 1]),
        _clip("clip1", "conv1_out", w),
        helper.make_node("Conv", ["clip1_out", dww, dwb], ["dw_out"], name="dw", pads=[1, 1, 1, 1], group=8),
        _clip("clip2", "dw_out", w),
        helper.make_node("Conv", ["clip2_out", pww, pwb], ["pw_out"], name="pw"),
        *_head(w, "pw_out", 16),
    ]
    return _model(nodes, w, path)


def concat(path: Path) -> Path:
    """Two Conv → Relu branches from the input, Concat on channels, Conv → Relu → head."""
    w = _Weights(4)
    c1w, c1b = w.conv("conv1", 4, 3)
    c2w, c2b = w.conv("conv2", 4, 3, k=1)
    c3w, c3b = w.conv("conv3", 8, 8)
    nodes = [
        helper.make_node("Conv", ["input", c1w, c1b], ["conv1_out"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1_out"], ["a"], name="relu1"),
        helper.make_node("Conv", ["input", c2w, c2b], ["conv2_out"], name="conv2"),
        helper.make_node("Relu", ["conv2_out"], ["b"], name="relu2"),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", c3w, c3b], ["conv3_out"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv3_out"], ["relu3_out"], name="relu3"),
        *_head(w, "relu3_out", 8),
    ]
    return _model(nodes, w, path)


def reshape_to_gemm(path: Path) -> Path:
    """Conv (stride 8) → Relu → Reshape [N, 8·4·4] → Gemm "hidden" → Relu → Gemm "fc" (the head): the
    Reshape carries uint8 from Conv to Gemm."""
    w = _Weights(5)
    c1w, c1b = w.conv("conv1", 8, 3)
    hw, hb = w.gemm("hidden", 32, 8 * 4 * 4)
    fcw, fcb = w.gemm("fc", CLASSES, 32)
    shape = numpy_helper.from_array(np.array([-1, 8 * 4 * 4], np.int64), "shape")
    nodes = [
        helper.make_node(
            "Conv", ["input", c1w, c1b], ["conv1_out"], name="conv1", pads=[1, 1, 1, 1], strides=[8, 8]
        ),
        helper.make_node("Relu", ["conv1_out"], ["relu1_out"], name="relu1"),
        helper.make_node("Reshape", ["relu1_out", "shape"], ["flat"], name="reshape"),
        helper.make_node("Gemm", ["flat", hw, hb], ["hidden_out"], name="hidden", transB=1),
        helper.make_node("Relu", ["hidden_out"], ["hidden_relu"], name="relu2"),
        helper.make_node("Gemm", ["hidden_relu", fcw, fcb], ["logits"], name="fc", transB=1),
    ]
    return _model(nodes, w, path, [shape])


def no_compute(path: Path) -> Path:
    """Only pooling and a Softmax: nothing placement can quantize."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["gap_out"], name="gap"),
        helper.make_node("Flatten", ["gap_out"], ["flat"], name="flatten", axis=1),
        helper.make_node("Softmax", ["flat"], ["logits"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "no_compute",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, HW, HW])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.save(model, str(path))
    return path


def quantize(builder, tmp_path: Path, **changes):
    """Prepare, calibrate (minmax) and quantize with placement from the graph; return paths and graphs."""
    prepared = prepare_model(builder(tmp_path / f"{builder.__name__}.onnx"), tmp_path)
    recipe = QuantRecipe(calibration="minmax", reduce_range=False).with_changes(**changes)
    name = prepared.signature.input_name
    batches = (CALIB[i : i + 8] for i in range(0, len(CALIB), 8))
    ranges = calibrate(prepared.path, name, batches, recipe, tmp_path)
    out = tmp_path / "int8.onnx"
    quantize_with_ort(prepared.path, ranges, recipe, out, tmp_path)
    fp32, int8 = onnx.load(str(prepared.path)), onnx.load(str(out))
    return prepared.path, out, fp32, int8, recipe


def executed_ops(path: Path, tmp_path: Path) -> list[str]:
    """The op types of the graph ONNX Runtime executes after its QDQ fusions."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def q_range(int8: onnx.ModelProto, tensor: str) -> tuple[float, float]:
    """The float range [lo, hi] of the QuantizeLinear reading `tensor`."""
    inits = {i.name: numpy_helper.to_array(i) for i in int8.graph.initializer}
    q = next(n for n in int8.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    scale, zero = float(inits[q.input[1]]), int(inits[q.input[2]])
    return (0 - zero) * scale, (255 - zero) * scale


def producer_of(int8: onnx.ModelProto, node_name: str) -> onnx.NodeProto:
    node = next(n for n in int8.graph.node if n.name == node_name)
    return node


def test_conv_clip_quantizes_after_the_activation(tmp_path):
    prepared, out, fp32, int8, recipe = quantize(conv_clip, tmp_path)
    kinds = [n.op_type for n in int8.graph.node]
    assert "Clip" not in kinds  # folded into the quantize range
    # The quantize node after conv1 carries Clip's range [0, ≤6], not the pre-activation one.
    conv1_out = producer_of(int8, "conv1").output[0]
    low, high = q_range(int8, conv1_out)
    assert low == pytest.approx(0.0, abs=1e-6) and 0 < high <= 6.0 + 1e-4
    ops = count_quantized(fp32, int8, recipe)
    assert ops.fused == {"Clip": 2} and ops.by_type["Clip"] == [2, 2]
    assert ops.by_type["Conv"] == [2, 2] and ops.by_type["GlobalAveragePool"] == [1, 1]
    executed = executed_ops(out, tmp_path)
    assert executed.count("QLinearConv") == 2 and "Conv" not in executed and "Clip" not in executed
    assert "QLinearGlobalAveragePool" in executed
    assert np.corrcoef(run(out, TEST).ravel(), run(prepared, TEST).ravel())[0, 1] > 0.95


def test_conv_relu_add_is_a_quantized_residual(tmp_path):
    prepared, out, fp32, int8, recipe = quantize(conv_relu_add, tmp_path)
    placement = place(fp32, recipe)
    assert {"add", "relu1", "relu2", "relu3", "gap"} <= placement.node_set()
    assert "Relu" not in [n.op_type for n in int8.graph.node]
    add = producer_of(int8, "add")
    assert all(
        any(p.op_type == "DequantizeLinear" and i in p.output for p in int8.graph.node) for i in add.input
    )
    executed = executed_ops(out, tmp_path)
    assert executed.count("QLinearConv") == 3 and "QLinearAdd" in executed
    assert "Conv" not in executed and "Add" not in executed and "Relu" not in executed
    assert np.corrcoef(run(out, TEST).ravel(), run(prepared, TEST).ravel())[0, 1] > 0.95


def test_depthwise_conv_runs_integer(tmp_path):
    _prepared, out, fp32, int8, recipe = quantize(depthwise, tmp_path)
    dw = producer_of(int8, "dw")
    inits = {i.name for i in int8.graph.initializer}
    assert dw.op_type == "Conv" and not any(i in inits for i in dw.input[:2])  # weight read through DQ
    executed = executed_ops(out, tmp_path)
    assert executed.count("QLinearConv") == 3 and "Conv" not in executed and "Clip" not in executed
    assert count_quantized(fp32, int8, recipe).fp32 == {
        "fc": ["Gemm", HEAD_REASON],
        "flatten": ["Flatten", "its output feeds only FP32 nodes"],
    }


def test_concat_of_quantized_branches(tmp_path):
    _prepared, out, fp32, _int8, recipe = quantize(concat, tmp_path)
    assert "concat" in place(fp32, recipe).node_set()
    executed = executed_ops(out, tmp_path)
    assert "QLinearConcat" in executed and "Concat" not in executed
    assert executed.count("QLinearConv") == 3 and "Conv" not in executed


def test_reshape_between_conv_and_gemm_carries_uint8(tmp_path):
    _prepared, out, fp32, _int8, recipe = quantize(reshape_to_gemm, tmp_path)
    placement = place(fp32, recipe)
    assert {"conv1", "relu1", "reshape", "hidden", "relu2"} <= placement.node_set()
    assert placement.fp32["fc"] == HEAD_REASON
    executed = executed_ops(out, tmp_path)
    assert "QLinearConv" in executed and "Conv" not in executed
    # ORT drops the Q/DQ pair around the Reshape: QLinearConv → Reshape → (Gemm's DQ or QGemm), no float
    # round trip between them.
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    reshape = next(n for n in optimized.graph.node if n.op_type == "Reshape")
    producer = next(n for n in optimized.graph.node if reshape.input[0] in n.output)
    assert producer.op_type == "QLinearConv"


def test_legacy_override_quantizes_before_the_activation(tmp_path):
    """`--op-types Conv,Gemm,MatMul` stays an override: Clip stays float, the Q range is pre-activation."""
    _, _out, fp32, int8, recipe = quantize(conv_clip, tmp_path, op_types=LEGACY_OP_TYPES)
    assert [n.op_type for n in int8.graph.node].count("Clip") == 2
    ops = count_quantized(fp32, int8, recipe)
    assert "Clip" not in ops.by_type and ops.quantized == 3


def test_excluded_conv_keeps_its_activation_fp32_without_dangling_pairs(tmp_path):
    _, out, fp32, int8, recipe = quantize(conv_clip, tmp_path, exclude_nodes=("conv2",))
    placement = place(fp32, recipe)
    assert "conv2" not in placement.node_set() and "clip2" not in placement.node_set()
    assert placement.fp32["conv2"] == "excluded by the user"
    ops = count_quantized(fp32, int8, recipe)
    assert ops.fp32["conv2"] == ["Conv", "excluded by the user"]
    assert placement.fp32["gap"] == "its input comes from a node left in FP32"
    executed = executed_ops(out, tmp_path)
    assert executed.count("Conv") + executed.count("FusedConv") == 1 and executed.count("QLinearConv") == 1
    # conv2 and the pooling after it run in float, with no quantize/dequantize pair between them.
    assert "GlobalAveragePool" in executed and "QLinearGlobalAveragePool" not in executed
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    gap = next(n for n in optimized.graph.node if n.op_type == "GlobalAveragePool")
    assert next(n for n in optimized.graph.node if gap.input[0] in n.output).op_type in ("Conv", "FusedConv")
    assert run(out, TEST).shape == (len(TEST), CLASSES)


def test_tuning_fallbacks_are_named(tmp_path):
    _, _, fp32, int8, recipe = quantize(conv_clip, tmp_path, exclude_nodes=("conv2", "fc"))
    ops = count_quantized(fp32, int8, recipe, tuning_fallback=("fc",))
    assert ops.fp32["fc"] == ["Gemm", "fell back in tuning"]
    assert ops.fp32["conv2"] == ["Conv", "excluded by the user"]
    assert "1 fell back in tuning" in ops.describe() and "1 excluded by the user" in ops.describe()


def test_nothing_to_quantize_is_exit_code_3(tmp_path):
    prepared = prepare_model(no_compute(tmp_path / "pool.onnx"), tmp_path)
    model = onnx.load(str(prepared.path))
    recipe = QuantRecipe()
    with pytest.raises(NothingToQuantize, match="no Conv/Gemm/MatMul node") as info:
        require_something(model, place(model, recipe), recipe)
    assert info.value.exit_code == 3


def _cli(*args, cwd: Path):
    from typer.testing import CliRunner

    from quantize.cli import app

    env = {"COLUMNS": "200", "RQ_CPU_FLAGS": "avx2", "RQ_DEBUG": None, "NO_COLOR": "1"}
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def test_cli_nothing_to_quantize_exits_3_and_writes_nothing(tmp_path, calib_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "pool-int8.onnx"
    model = no_compute(tmp_path / "pool.onnx")
    result = _cli(
        "quantize", model, "--calib", calib_dir, "--out", out, "--resize", "36", "--crop", "32", cwd=tmp_path
    )
    assert result.exit_code == 3, result.output
    assert "nothing to quantize" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_cli_op_type_ort_cannot_quantize_is_bad_input(tmp_path, tiny_model, calib_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _cli(
        "quantize", tiny_model, "--calib", calib_dir, "--op-types", "Conv,BatchNormalization", cwd=tmp_path
    )
    assert result.exit_code == 2
    assert "cannot quantize op type(s) BatchNormalization" in result.output


def test_reshape_feeding_an_excluded_gemm_is_not_counted_quantized(tmp_path):
    """With fc excluded, the Flatten before it has no quantized reader: placement leaves it FP32, and the
    count (read from the INT8 graph) says so."""
    _, out, fp32, int8, recipe = quantize(conv_clip, tmp_path, exclude_nodes=("fc",))
    placement = place(fp32, recipe)
    assert placement.fp32["flatten"] == "its output feeds only FP32 nodes"
    ops = count_quantized(fp32, int8, recipe)
    assert ops.by_type["Flatten"] == [0, 1] and ops.by_type["Gemm"] == [0, 1]
    assert ops.fp32["flatten"] == ["Flatten", "its output feeds only FP32 nodes"]
    executed = executed_ops(out, tmp_path)
    assert "QLinearGlobalAveragePool" in executed and "Gemm" in executed


def _graph(nodes, inits, out_shape):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, HW, HW])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_head_behind_a_softmax_stays_fp32_and_a_lone_gemm_is_quantized():
    w = _Weights(6)
    c1w, c1b = w.conv("conv1", 4, 3)
    fcw, fcb = w.gemm("fc", CLASSES, 4)
    softmax_head = _graph(
        [
            helper.make_node("Conv", ["input", c1w, c1b], ["c"], name="conv1", pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
            helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", fcw, fcb], ["z"], name="fc", transB=1),
            helper.make_node("Softmax", ["z"], ["logits"], name="softmax", axis=1),
        ],
        w.initializers,
        ["N", CLASSES],
    )
    placement = place(softmax_head, QuantRecipe())
    assert placement.fp32["fc"] == HEAD_REASON and "conv1" in placement.node_set()
    # With nothing else to quantize, the only Gemm is quantized rather than leaving nothing.
    w = _Weights(7)
    fcw, fcb = w.gemm("fc", CLASSES, 3)
    lone = _graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["g"], name="gap"),
            helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", fcw, fcb], ["logits"], name="fc", transB=1),
        ],
        w.initializers,
        ["N", CLASSES],
    )
    assert place(lone, QuantRecipe()).nodes == ["fc"]


def test_head_behind_a_background_column_stays_fp32_with_its_tail():
    """1001 classes made from 1000 (the r50_bg1001 shape): logits = Concat(Slice(z)[:, :1] + c, z). The Gemm
    writing z is the head (kept FP32), and the Slice/Add/Concat behind it stay FP32 too: the logits never go
    through a Q/DQ pair."""
    w = _Weights(8)
    c1w, c1b = w.conv("conv1", 4, 3)
    fcw, fcb = w.gemm("fc", CLASSES - 1, 4)
    starts = w.add("starts", np.array([0], np.int64))
    ends = w.add("ends", np.array([1], np.int64))
    axes = w.add("axes", np.array([1], np.int64))
    shift = w.add("shift", np.array([-5.0], np.float32))
    model = _graph(
        [
            helper.make_node("Conv", ["input", c1w, c1b], ["c"], name="conv1", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
            helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", fcw, fcb], ["z"], name="fc", transB=1),
            helper.make_node("Slice", ["z", starts, ends, axes], ["first"], name="slice"),
            helper.make_node("Add", ["first", shift], ["bg"], name="add_bg"),
            helper.make_node("Concat", ["bg", "z"], ["logits"], name="concat", axis=1),
        ],
        w.initializers,
        ["N", CLASSES],
    )
    placement = place(model, QuantRecipe())
    assert placement.fp32["fc"] == HEAD_REASON
    assert {"slice", "concat"}.isdisjoint(placement.node_set())
    assert {"conv1", "relu", "gap"} <= placement.node_set()


def test_swish_sigmoid_feeding_a_float_mul_stays_fp32():
    """Conv → Sigmoid → Mul(conv, sigmoid): Mul stays FP32, so quantizing the Sigmoid would only add a Q/DQ
    pair in front of it."""
    w = _Weights(8)
    c1w, c1b = w.conv("conv1", 4, 3)
    c2w, c2b = w.conv("conv2", 4, 4)
    fcw, fcb = w.gemm("fc", CLASSES, 4)
    model = _graph(
        [
            helper.make_node("Conv", ["input", c1w, c1b], ["c"], name="conv1", pads=[1, 1, 1, 1]),
            helper.make_node("Sigmoid", ["c"], ["s"], name="sigmoid"),
            helper.make_node("Mul", ["c", "s"], ["m"], name="mul"),
            helper.make_node("Conv", ["m", c2w, c2b], ["d"], name="conv2", pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["d"], ["g"], name="gap"),
            helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", fcw, fcb], ["logits"], name="fc", transB=1),
        ],
        w.initializers,
        ["N", CLASSES],
    )
    placement = place(model, QuantRecipe())
    assert placement.fp32["sigmoid"] == "its output feeds only FP32 nodes"
    assert {"conv1", "conv2", "gap"} <= placement.node_set() and "mul" not in placement.node_set()


def strided_pointwise(path: Path) -> Path:
    """A ResNet-50 v1 down-sampling block: Conv → Relu = a; a → 1×1 stride-2 Conv → Relu → Conv = y and
    a → 1×1 stride-2 projection = sc; Add(y, sc) → Relu → head. Both strided 1×1 Convs read the same tensor."""
    w = _Weights(6)
    c1w, c1b = w.conv("conv1", 8, 3)
    aw, ab = w.conv("conv_a", 8, 8, k=1)
    bw, bb = w.conv("conv_b", 16, 8)
    pw, pb = w.conv("proj", 16, 8, k=1)
    nodes = [
        helper.make_node("Conv", ["input", c1w, c1b], ["conv1_out"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1_out"], ["a"], name="relu1"),
        helper.make_node("Conv", ["a", aw, ab], ["conv_a_out"], name="conv_a", strides=[2, 2]),
        helper.make_node("Relu", ["conv_a_out"], ["relu_a_out"], name="relu_a"),
        helper.make_node("Conv", ["relu_a_out", bw, bb], ["y"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", pw, pb], ["sc"], name="proj", strides=[2, 2]),
        helper.make_node("Add", ["y", "sc"], ["sum"], name="add"),
        helper.make_node("Relu", ["sum"], ["relu_out"], name="relu2"),
        *_head(w, "relu_out", 16),
    ]
    return _model(nodes, w, path)


def strided_after_pool(path: Path) -> Path:
    """`strided_pointwise` with a MaxPool (3×3, stride 1) making `a`: the subsampling cannot move into it."""
    w = _Weights(7)
    c1w, c1b = w.conv("conv1", 8, 3)
    aw, ab = w.conv("conv_a", 16, 8, k=1)
    pw, pb = w.conv("proj", 16, 8, k=1)
    nodes = [
        helper.make_node("Conv", ["input", c1w, c1b], ["conv1_out"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1_out"], ["relu1_out"], name="relu1"),
        helper.make_node(
            "MaxPool", ["relu1_out"], ["a"], name="pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
        ),
        helper.make_node("Conv", ["a", aw, ab], ["y"], name="conv_a", strides=[2, 2]),
        helper.make_node("Conv", ["a", pw, pb], ["sc"], name="proj", strides=[2, 2]),
        helper.make_node("Add", ["y", "sc"], ["sum"], name="add"),
        helper.make_node("Relu", ["sum"], ["relu_out"], name="relu2"),
        *_head(w, "relu_out", 16),
    ]
    return _model(nodes, w, path)


def test_strided_pointwise_block_computes_only_the_pixels_read(tmp_path):
    prepared, out, fp32, _int8, _recipe = quantize(strided_pointwise, tmp_path)
    # Preparation: `a` is read only by the two strided 1×1 Convs, so conv1 makes it at stride 2 and they run
    # with stride 1; no Slice is needed.
    assert conv_strides(fp32) == {"conv1": [2, 2], "conv_a": [1, 1], "conv_b": [1, 1], "proj": [1, 1]}
    assert "Slice" not in {n.op_type for n in fp32.graph.node}
    types = executed_ops(out, tmp_path)
    assert types.count("QLinearConv") == 4 and "QLinearAdd" in types
    assert not {"Conv", "Add", "Relu"} & set(types)
    assert np.corrcoef(run(out, TEST).ravel(), run(prepared, TEST).ravel())[0, 1] > 0.95


def test_a_slice_that_cannot_move_up_is_carried_in_uint8(tmp_path):
    prepared, out, fp32, _int8, recipe = quantize(strided_after_pool, tmp_path)
    (slice_node,) = [n for n in fp32.graph.node if n.op_type == "Slice"]
    assert slice_node.input[0] == "a"
    for name in ("conv_a", "proj"):
        conv = next(n for n in fp32.graph.node if n.name == name)
        assert conv.input[0] == slice_node.output[0]
    assert conv_strides(fp32) == {"conv1": [1, 1], "conv_a": [1, 1], "proj": [1, 1]}
    # Placement carries the Slice in uint8: ORT runs it between integer kernels, no float op around it.
    assert slice_node.name in place(fp32, recipe).node_set()
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    executed = list(onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    types = [n.op_type for n in executed]
    assert types.count("QLinearConv") == 3 and "QLinearAdd" in types
    assert not {"Conv", "Add", "Relu"} & set(types)
    # Only the head's input is dequantized (GAP → DQ → Flatten → FP32 Gemm).
    assert types.count("DequantizeLinear") == 1 and types.count("QuantizeLinear") == 1
    (ran,) = [n for n in executed if n.op_type == "Slice"]
    readers = [n.op_type for n in executed if ran.output[0] in n.input]
    assert readers == ["QLinearConv", "QLinearConv"]
    assert np.corrcoef(run(out, TEST).ravel(), run(prepared, TEST).ravel())[0, 1] > 0.95


def _openvino_conv_precisions(path: Path) -> dict[str, str]:
    """Convolution name → the precision OpenVINO's CPU plugin runs it in (its runtime model)."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({model.inputs[0].get_any_name(): [1, 3, HW, HW]})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    found = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "Convolution":
            found[op.get_friendly_name()] = info["runtimePrecision"].astype(str)
    return found


@pytest.mark.openvino
def test_openvino_runs_every_strided_pointwise_conv_in_int8(tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    import quantize.graph.rewrite as rewrite

    (tmp_path / "with").mkdir()
    _prepared, out, *_ = quantize(strided_pointwise, tmp_path / "with")
    precisions = _openvino_conv_precisions(out)
    assert len(precisions) == 4 and set(precisions.values()) == {"u8"}, precisions
    # Without the rewrite OpenVINO's strides optimization leaves the strided 1×1 Convs in f32: the check above
    # can fail.
    monkeypatch.setattr(rewrite, "rewrite_strided_pointwise", lambda model: rewrite.Subsampled())
    (tmp_path / "without").mkdir()
    _prepared, plain, *_ = quantize(strided_pointwise, tmp_path / "without")
    assert "f32" in _openvino_conv_precisions(plain).values()


def test_openvino_placement_quantizes_the_head(tmp_path):
    """placement_runtime="openvino": the classifier head (and the Flatten feeding it) is quantized as well; ORT
    then runs it as an integer Gemm. The default ("ort") keeps it FP32."""
    recipe = QuantRecipe(placement_runtime="openvino")
    assert recipe.to_dict()["placement_runtime"] == "openvino"
    assert "placement_runtime" not in QuantRecipe().to_dict()  # the default leaves earlier digests alone
    assert QuantRecipe.from_json(recipe.to_json()) == recipe
    with pytest.raises(RqInputError, match="placement_runtime must be one of ort, openvino"):
        QuantRecipe(placement_runtime="tensorrt")
    _prepared, out, fp32, _int8, _recipe = quantize(strided_pointwise, tmp_path, placement_runtime="openvino")
    placement = place(fp32, recipe)
    assert {"fc", "flatten", "gap"} <= placement.node_set() and "fc" not in placement.fp32
    assert "fc" in place(fp32, QuantRecipe()).fp32
    executed = executed_ops(out, tmp_path)
    assert "Gemm" not in executed and "DequantizeLinear" in executed  # the logits are dequantized
    assert {"QGemm", "QLinearMatMul", "MatMulInteger"} & set(executed), executed
