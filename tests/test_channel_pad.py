"""Convolution inputs padded to a multiple of 4 channels (quantize.graph.channel_pad): exact, fused by ONNX
Runtime into its integer convolution, applied to published files laid out for ONNX Runtime only."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from quantize.backends.ort import quantize_with_ort
from quantize.calibrate import calibrate
from quantize.graph.channel_pad import ChannelPad, describe_channel_pads, pad_conv_input_channels
from quantize.graph.inspection import weight_errors
from quantize.graph.prepare import prepare_model
from quantize.recipe import QuantRecipe
from tests.helpers.cli import SMALL
from tests.helpers.tiny_models import SMALL_SPEC, random_inputs, rgb_stem_cnn, tiny_cnn

CALIB = random_inputs(16, seed=41)
TEST = random_inputs(8, seed=42)


def _quantized(fp32: Path, tmp_path: Path, **recipe) -> tuple[Path, onnx.ModelProto]:
    prepared = prepare_model(fp32, tmp_path)
    # 7-bit weights: no u8×s8 pair can saturate on a CPU without VNNI, so both kernels compute the same sums.
    recipe = QuantRecipe(calibration="minmax", **{"reduce_range": True, **recipe})
    batches = (CALIB[i : i + 8] for i in range(0, len(CALIB), 8))
    ranges = calibrate(prepared.path, prepared.signature.input_name, batches, recipe, tmp_path)
    out = tmp_path / "int8.onnx"
    quantize_with_ort(prepared.path, ranges, recipe, out, tmp_path)
    return prepared.path, onnx.load(str(out))


def _session(model: onnx.ModelProto, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _logits(model: onnx.ModelProto) -> np.ndarray:
    session = _session(model)
    return session.run(None, {session.get_inputs()[0].name: TEST})[0]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def test_the_rgb_stem_is_padded_and_computes_the_same(tmp_path):
    _fp32, int8 = _quantized(rgb_stem_cnn(tmp_path / "stem.onnx"), tmp_path)
    padded = _copy(int8)
    assert pad_conv_input_channels(padded) == [ChannelPad("conv1", 3, 4)]
    onnx.checker.check_model(padded)
    nodes = {n.name: n for n in padded.graph.node}
    producer = {o: n for n in padded.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in padded.graph.initializer}
    dq = producer[nodes["conv1"].input[0]]
    pad = producer[dq.input[0]]
    # The pad fills the new channel with the input's zero point, so it dequantizes to 0.0 ...
    assert pad.op_type == "Pad" and pad.input[2] == dq.input[2]
    assert list(inits[pad.input[1]]) == [0, 0, 0, 0, 0, 1, 0, 0]
    # ... and the new weight channel is zero; the model's own three are unchanged.
    weight = inits[producer[nodes["conv1"].input[1]].input[0]]
    original = {i.name: numpy_helper.to_array(i) for i in int8.graph.initializer}
    assert weight.shape[:2] == (16, 4) and not weight[:, 3].any()
    assert np.array_equal(weight[:, :3], original[producer[nodes["conv1"].input[1]].input[0]])
    # No DequantizeLinear left that nobody reads (ONNX Runtime would still run it).
    readers = {name for n in padded.graph.node for name in n.input}
    assert all(o in readers for n in padded.graph.node if n.op_type == "DequantizeLinear" for o in n.output)
    np.testing.assert_array_equal(_logits(padded), _logits(int8))


def test_onnx_runtime_fuses_the_padded_convolution(tmp_path):
    """ORT's optimized graph: still one QLinearConv per quantized Conv, the stem's now reading 4 channels through
    a uint8 Pad; the float Conv is gone."""
    _fp32, int8 = _quantized(rgb_stem_cnn(tmp_path / "stem.onnx"), tmp_path)
    pad_conv_input_channels(int8)
    optimized = tmp_path / "optimized.onnx"
    _session(int8, optimized)
    graph = onnx.load(str(optimized)).graph
    types = [n.op_type for n in graph.node]
    assert types.count("QLinearConv") == 1 and "Conv" not in types and "Pad" in types
    conv = next(n for n in graph.node if n.op_type == "QLinearConv")
    weight = next(i for i in graph.initializer if i.name == conv.input[3])
    assert list(weight.dims)[:2] == [16, 4]


def test_convolutions_the_direct_kernel_cannot_take_are_left_alone(tmp_path):
    # Too few output channels (8 < 16): ONNX Runtime would run it through im2col anyway.
    _fp32, few = _quantized(rgb_stem_cnn(tmp_path / "few.onnx", stem_out=8), tmp_path)
    before = few.SerializeToString()
    assert pad_conv_input_channels(few) == [] and few.SerializeToString() == before
    # Signed (int8) activations: the x86 direct kernel is u8×s8.
    _fp32, signed = _quantized(rgb_stem_cnn(tmp_path / "signed.onnx"), tmp_path, activation_type="int8")
    assert pad_conv_input_channels(signed) == []
    # Inputs already a multiple of 4 (tiny_cnn's conv2 reads 8 channels; its 3-channel conv1 has 8 outputs).
    _fp32, tiny = _quantized(tiny_cnn(tmp_path / "tiny.onnx"), tmp_path)
    assert pad_conv_input_channels(tiny) == []


def test_weight_sqnr_reads_the_models_own_channels(tmp_path):
    fp32, int8 = _quantized(rgb_stem_cnn(tmp_path / "stem.onnx"), tmp_path)
    plain, padded = tmp_path / "plain.onnx", tmp_path / "padded.onnx"
    onnx.save(int8, str(plain))
    pad_conv_input_channels(int8)
    onnx.save(int8, str(padded))
    assert weight_errors(fp32, padded) == weight_errors(fp32, plain)


def test_describe():
    text = describe_channel_pads([ChannelPad("conv0", 3, 4)])
    assert text.startswith("1 convolution input(s) padded") and "conv0 3→4" in text


def test_cli_pads_files_for_onnx_runtime_only(cli, calib_dir, tmp_path):
    model = rgb_stem_cnn(tmp_path / "stem.onnx")
    common = ("--calib", calib_dir, "--samples", "8", "--workers", "2", "--json", *SMALL)
    out = tmp_path / "stem-int8.onnx"
    result = cli("quantize", model, "--out", out, "--report-dir", tmp_path / "reports", *common)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["channel_pads"] == [{"node": "conv1", "channels": 3, "padded": 4}]
    report = json.loads(next((tmp_path / "reports").glob("*/report.json")).read_text())
    assert any("padded to a multiple of 4" in note for note in report["notes"])
    assert any(n.op_type == "Pad" for n in onnx.load(str(out)).graph.node)
    # Laid out for OpenVINO: no pad (OpenVINO picks its own kernel for the stem).
    ov_out = tmp_path / "stem-ov.onnx"
    result = cli(
        "quantize", model, "--out", ov_out, "--placement-runtime", "openvino",
        "--report-dir", tmp_path / "reports-ov", *common,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "channel_pads" not in json.loads(result.stdout) or not json.loads(result.stdout)["channel_pads"]
    assert not any(n.op_type == "Pad" for n in onnx.load(str(ov_out)).graph.node)


def test_the_fallback_tuner_measures_unpadded_step_models(monkeypatch, calib_dir, tmp_path):
    """The tuner matches a step model's tensors to the FP32 graph's by name, so its step models are not padded;
    the file published after tuning is (it is quantized again)."""
    from quantize import pipeline
    from quantize.tune import TuneRequest

    steps: list[onnx.ModelProto] = []

    def tune_fallback(*, quantize_to, recipe, **_kwargs):
        quantize_to(recipe, tmp_path / "step.onnx")
        steps.append(onnx.load(str(tmp_path / "step.onnx")))
        return recipe, SimpleNamespace(seconds=0.0)  # no fallback: the recipe as it came

    monkeypatch.setattr(pipeline, "tune_fallback", tune_fallback)
    out = tmp_path / "tuned.onnx"
    result = pipeline.quantize_model(
        rgb_stem_cnn(tmp_path / "stem.onnx"),
        calib_dir,
        output=out,
        recipe=QuantRecipe(calibration="minmax", reduce_range=True),
        spec=SMALL_SPEC,
        workers=2,
        tune=TuneRequest(max_drop_pt=1.0, tune_samples=()),
    )
    (step,) = steps
    assert not any(n.op_type == "Pad" for n in step.graph.node)
    assert result.channel_pads == [ChannelPad("conv1", 3, 4)]
    assert any(n.op_type == "Pad" for n in onnx.load(str(out)).graph.node)


def _qdq_stem(then_reads_x: bool) -> onnx.ModelProto:
    """input → QuantizeLinear → DequantizeLinear (x) → Conv(3 → 16, int8 weights); with `then_reads_x`, an If
    whose branches read x too (a tensor read only inside a subgraph)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(np.float32(0.02), "x_scale"),
        numpy_helper.from_array(np.uint8(128), "x_zero"),
        numpy_helper.from_array(rng.integers(-127, 128, (16, 3, 3, 3)).astype(np.int8), "w_q"),
        numpy_helper.from_array(np.full(16, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(16, np.int8), "w_zero"),
        numpy_helper.from_array(np.array(True), "cond"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "x_scale", "x_zero"], ["x_q"], name="q"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x"], name="dq"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], name="w_dq", axis=0),
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1] * 4),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])]
    if then_reads_x:
        branch = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["x_copy"])],
            "branch",
            [],
            [helper.make_tensor_value_info("x_copy", TensorProto.FLOAT, [1, 3, 8, 8])],
        )
        nodes.append(
            helper.make_node("If", ["cond"], ["x_out"], name="if", then_branch=branch, else_branch=branch)
        )
        outputs.append(helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [1, 3, 8, 8]))
    graph = helper.make_graph(
        nodes, "qdq_stem", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])], outputs,
        initializer=inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_a_dequantize_read_inside_a_subgraph_is_kept():
    x = np.random.default_rng(8).standard_normal((1, 3, 8, 8)).astype(np.float32)
    for then_reads_x in (False, True):
        model = _qdq_stem(then_reads_x)
        before = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})
        assert pad_conv_input_channels(model) == [ChannelPad("conv", 3, 4)]
        onnx.checker.check_model(model)
        assert any(n.name == "dq" for n in model.graph.node) == then_reads_x
        after = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})
        for a, b in zip(before, after, strict=True):
            np.testing.assert_array_equal(a, b)
