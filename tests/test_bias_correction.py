"""Bias correction: the shift INT8 causes in each output channel's mean, folded back into the bias."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantize.bias_correction import NO_BIAS_REASON, correct_biases

W = np.array([[0.334, -0.171], [0.515, 0.262]], np.float32)
B = np.array([0.5, -0.3], np.float32)
X_SCALE = 0.1  # uint8, zero point 0: the input range is [0, 25.5]
W_SCALES = np.array([0.01, 0.02], np.float32)  # per output channel
IMAGES = np.array([[1.0, 2.0], [3.0, 31.0]], np.float32)  # 31.0 is clipped to 25.5 by the quantizer


def _gemm_models(with_bias: bool = True) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    fp32_inputs = ["x", "W", "B"] if with_bias else ["x", "W"]
    fp32 = helper.make_model(
        helper.make_graph(
            [helper.make_node("Gemm", fp32_inputs, ["y"], name="fc", transB=1)],
            "fp32",
            [x],
            [y],
            [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")][: 2 if with_bias else 1],
        ),
        opset_imports=[helper.make_opsetid("", 13)],
        ir_version=8,
    )
    w_q = np.rint(W / W_SCALES[:, None]).astype(np.int8)  # [[33, -17], [26, 13]]
    b_scale = (X_SCALE * W_SCALES).astype(np.float32)
    b_q = np.rint(B / b_scale).astype(np.int32)  # [500, -150]
    inits = [
        numpy_helper.from_array(np.array(X_SCALE, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
        numpy_helper.from_array(w_q, "W_q"),
        numpy_helper.from_array(W_SCALES, "W_scale"),
        numpy_helper.from_array(b_q, "B_q"),
        numpy_helper.from_array(b_scale, "B_scale"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], name="x_Q"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], name="x_DQ"),
        helper.make_node("DequantizeLinear", ["W_q", "W_scale"], ["W_dq"], name="W_DQ", axis=0),
    ]
    gemm_inputs = ["x_dq", "W_dq"]
    if with_bias:
        nodes.append(helper.make_node("DequantizeLinear", ["B_q", "B_scale"], ["B_dq"], name="B_DQ", axis=0))
        gemm_inputs.append("B_dq")
    nodes.append(helper.make_node("Gemm", gemm_inputs, ["y"], name="fc", transB=1))
    int8 = helper.make_model(
        helper.make_graph(nodes, "int8", [x], [y], inits if with_bias else inits[:4]),
        opset_imports=[helper.make_opsetid("", 13)],
        ir_version=8,
    )
    return fp32, int8


def _mean_output(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": images})[0].mean(axis=0)


def test_gemm_correction_matches_the_hand_computation():
    fp32, int8 = _gemm_models()
    report = correct_biases(fp32, int8, "x", [IMAGES[:1], IMAGES[1:]])
    # By hand: mean x = [2, 16.5]; mean of its quantize→dequantize = [2, 13.75] (31 clips to 25.5);
    # W_dq = [[0.33, -0.17], [0.52, 0.26]].
    # channel 0: (2·0.33 − 13.75·0.17) − (2·0.334 − 16.5·0.171) = −1.6775 + 2.1535 = 0.476 → 476 bias steps
    # channel 1: (2·0.52 + 13.75·0.26) − (2·0.515 + 16.5·0.262) = 4.615 − 5.353 = −0.738 → −369 bias steps
    b_q = numpy_helper.to_array(next(i for i in int8.graph.initializer if i.name == "B_q"))
    assert b_q.tolist() == [500 - 476, -150 + 369]
    assert b_q.dtype == np.int32
    assert report.corrected == ["fc"] and report.images == 2 and report.created == []
    assert report.max_shift == pytest.approx(0.738, abs=1e-6)
    # And so the INT8 model's mean output is the FP32 one, to within one bias step.
    assert np.abs(_mean_output(int8, IMAGES) - _mean_output(fp32, IMAGES)).max() <= 0.002


def test_layer_without_bias_gets_one():
    fp32, int8 = _gemm_models(with_bias=False)
    before = np.abs(_mean_output(int8, IMAGES) - _mean_output(fp32, IMAGES)).max()
    report = correct_biases(fp32, int8, "x", [IMAGES])
    assert report.created == ["fc"] and report.corrected == ["fc"]
    gemm = next(n for n in int8.graph.node if n.op_type == "Gemm")
    assert len(gemm.input) == 3 and gemm.input[2]
    onnx.checker.check_model(int8)
    after = np.abs(_mean_output(int8, IMAGES) - _mean_output(fp32, IMAGES)).max()
    assert before > 0.4 and after <= 0.002


def test_layer_without_bias_is_left_alone_when_no_bias_may_be_given():
    """The OpenVINO form (`give_bias=False`): a bias-less layer keeps no bias, and the report says why."""
    fp32, int8 = _gemm_models(with_bias=False)
    before = int8.SerializeToString()
    report = correct_biases(fp32, int8, "x", [IMAGES], give_bias=False)
    assert report.created == [] and report.corrected == []
    assert report.skipped == {"fc": NO_BIAS_REASON}
    assert int8.SerializeToString() == before


def test_model_without_quantized_layers_is_left_alone():
    fp32, _ = _gemm_models()
    copy = onnx.ModelProto()
    copy.CopyFrom(fp32)
    report = correct_biases(fp32, copy, "x", [IMAGES])
    assert report.corrected == [] and report.images == 0 and report.note.startswith("skipped")
    assert copy == fp32


def test_conv_with_padding_mean_matches_fp32(tmp_path):
    """A padded 3×3 Conv quantized by ORT: after correction, per-channel output means agree with FP32."""
    from quantize.backends.ort import quantize_with_ort
    from quantize.calibrate import calibrate
    from quantize.recipe import QuantRecipe
    from tests.helpers.tiny_models import random_inputs

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(4) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    path = tmp_path / "conv.onnx"
    onnx.save(model, str(path))
    images = random_inputs(16, seed=3)[:, :, :8, :8] + 1.0  # positive mean: weight rounding shows in the mean
    # Per-tensor 7-bit weights and a clipping percentile: a visible shift to correct.
    recipe = QuantRecipe(calibration="percentile", percentile=99.0, reduce_range=True, per_channel=False)
    ranges = calibrate(path, "input", [images], recipe, tmp_path)
    quantize_with_ort(path, ranges, recipe, tmp_path / "int8.onnx", tmp_path)
    fp32, int8 = onnx.load(str(path)), onnx.load(str(tmp_path / "int8.onnx"))

    def channel_means(model):
        """Means of the Conv's own output (before the quantize node ORT puts on the graph output)."""
        m = onnx.ModelProto()
        m.CopyFrom(model)
        conv = next(n for n in m.graph.node if n.op_type == "Conv")
        del m.graph.output[:]
        m.graph.output.append(helper.make_tensor_value_info(conv.output[0], TensorProto.FLOAT, None))
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"input": images})[0].mean(axis=(0, 2, 3))

    reference = channel_means(fp32)
    before = np.abs(channel_means(int8) - reference).max()
    report = correct_biases(fp32, int8, "input", [images[:8], images[8:]])
    after = np.abs(channel_means(int8) - reference).max()
    assert report.corrected == ["conv"]
    assert before > 0.005 and after < before / 20


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_pipeline_corrects_and_records_it(tiny_model, calib_dir, tmp_path, avx2_cpu, fmt):
    import json

    from quantize.pipeline import quantize_model, read_model_metadata
    from quantize.recipe import METADATA_KEY, QuantRecipe
    from tests.helpers.tiny_models import SMALL_SPEC

    out = tmp_path / "int8.onnx"
    recipe = QuantRecipe(bias_correction=True, samples=8, format=fmt)
    result = quantize_model(tiny_model, calib_dir, output=out, recipe=recipe, spec=SMALL_SPEC, cpu=avx2_cpu)
    report = result.to_dict()["bias_correction"]
    if fmt == "qdq":
        # conv1 and conv2 (the head, fc, stays FP32)
        assert report["corrected"] == 2 and report["images"] == 8 and report["note"] == ""
    else:
        assert report["corrected"] == 0 and "QOperator" in report["note"]
    assert json.loads(read_model_metadata(out)[METADATA_KEY])["bias_correction"] is True
    plain = quantize_model(
        tiny_model,
        calib_dir,
        output=tmp_path / "plain.onnx",
        recipe=recipe.with_changes(bias_correction=False),
        spec=SMALL_SPEC,
        cpu=avx2_cpu,
    )
    assert plain.bias_correction is None
    assert plain.recipe.digest() != result.recipe.digest()


def test_cached_statistics_give_the_same_correction_without_images():
    fp32, first = _gemm_models()
    cache: dict = {}
    correct_biases(fp32, first, "x", [IMAGES], cache=cache)
    _, second = _gemm_models()
    report = correct_biases(fp32, second, "x", iter(()), cache=cache)  # no images: all from the cache
    assert report.corrected == ["fc"] and report.images == 2
    values = [
        {i.name: numpy_helper.to_array(i).tolist() for i in m.graph.initializer} for m in (first, second)
    ]
    assert values[0] == values[1]


@pytest.mark.parametrize("flag", ["--bias-correction", "--no-bias-correction"])
def test_cli_flag_reaches_the_recipe(tiny_model, calib_dir, tmp_path, monkeypatch, flag):
    import json

    from typer.testing import CliRunner

    from quantize.cli import app

    monkeypatch.chdir(tmp_path)
    args = [
        "quantize",
        str(tiny_model),
        "--calib",
        str(calib_dir),
        "--out",
        str(tmp_path / "o.onnx"),
        "--json",
    ]
    args += ["--resize", "36", "--crop", "32", "--samples", "8", flag]
    env = {"COLUMNS": "200", "RQ_CPU_FLAGS": "avx2", "RQ_DEBUG": None, "NO_COLOR": "1"}
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    on = flag == "--bias-correction"
    assert data["variants"][1]["recipe"]["bias_correction"] is on
    assert ("bias_correction" in data) is on
    assert any(n.startswith("bias correction: 2 layer(s) corrected") for n in data["notes"]) is on
