"""The OpenVINO form (recipe placement_runtime="openvino"): the quantized graph re-expressed the way OpenVINO
fuses it, checked on the graph and on what ONNX Runtime computes with it (OpenVINO itself: the last test, in
CI's openvino venv)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from calibration.errors import RqInputError
from quantize.backends.ort import quantize_with_ort
from quantize.calibrate import calibrate
from quantize.graph import openvino_form
from quantize.graph.openvino_form import AFFINE_REASON, to_openvino_form
from quantize.graph.prepare import prepare_model
from quantize.recipe import QuantRecipe
from tests.helpers.cli import SMALL
from tests.helpers.tiny_models import random_inputs

CALIB = random_inputs(16, seed=31)
TEST = random_inputs(8, seed=32)
AFFINES = {"bn1", "bn3", "bn_final"}  # the v2-shaped model's BNs that became depthwise 1×1 Convs


def _quantized_v2(v2_model: Path, tmp_path: Path) -> tuple[Path, onnx.ModelProto]:
    prepared = prepare_model(v2_model, tmp_path)
    recipe = QuantRecipe(calibration="minmax", reduce_range=False, placement_runtime="openvino")
    batches = (CALIB[i : i + 8] for i in range(0, len(CALIB), 8))
    ranges = calibrate(prepared.path, prepared.signature.input_name, batches, recipe, tmp_path)
    out = tmp_path / "int8.onnx"
    quantize_with_ort(prepared.path, ranges, recipe, out, tmp_path)
    return prepared.path, onnx.load(str(out))


def _run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_v2_form_graph(v2_model, tmp_path):
    fp32, int8 = _quantized_v2(v2_model, tmp_path)
    form_model = onnx.ModelProto()
    form_model.CopyFrom(int8)
    form = to_openvino_form(form_model)
    onnx.checker.check_model(form_model)
    nodes = {n.name: n for n in form_model.graph.node}
    # 1. The logits come out of the Gemm in float.
    assert form.float_outputs == ["logits"]
    assert next(n for n in form_model.graph.node if "logits" in n.output).op_type == "Gemm"
    # 2. The rewritten BNs are float Mul + Add (the Mul keeps the name), no depthwise Conv is left.
    assert set(form.affines) == AFFINES
    assert all(nodes[name].op_type == "Mul" for name in AFFINES)
    groups = [
        a.i for n in form_model.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"
    ]
    assert all(g == 1 for g in groups)
    # 3. Every activation is quantized with zero point 0: int8 where it holds negative values, uint8 after a Relu.
    inits = _inits(form_model)
    kinds = set()
    for q in (n for n in form_model.graph.node if n.op_type == "QuantizeLinear"):
        zero = inits[q.input[2]]
        assert int(zero) == 0, q.name
        kinds.add(zero.dtype)
        assert (zero.dtype == np.int8) == (q.input[0] in form.symmetric)
    assert kinds == {np.dtype(np.int8), np.dtype(np.uint8)} and "add1_out" in form.symmetric
    # The int32 bias of a layer reading a re-quantized tensor has the scale x_scale · w_scale.
    assert form.biases
    producer = {o: n for n in form_model.graph.node for o in n.output}
    for name in form.biases:
        layer = nodes[name]
        x_scale = inits[producer[layer.input[0]].input[1]]
        w_scale = inits[producer[layer.input[1]].input[1]]
        np.testing.assert_allclose(inits[producer[layer.input[2]].input[1]], x_scale * w_scale, rtol=1e-6)
    # ONNX Runtime computes the same network: close to the plain INT8 model and to FP32.
    plain, formed, reference = _run(int8, TEST), _run(form_model, TEST), _run(fp32, TEST)
    assert np.corrcoef(formed.ravel(), plain.ravel())[0, 1] > 0.99
    assert np.corrcoef(formed.ravel(), reference.ravel())[0, 1] > 0.95
    assert "OpenVINO form: 3 per-channel affine(s)" in form.describe()


def test_the_affine_step_alone_is_the_depthwise_conv_in_float(v2_model, tmp_path):
    """Mul + Add with the dequantized weight and bias computes what the int8 depthwise Conv computes."""
    _fp32, int8 = _quantized_v2(v2_model, tmp_path)
    affine = onnx.ModelProto()
    affine.CopyFrom(int8)
    form = openvino_form.OpenVinoForm()
    openvino_form._affines_as_mul_add(affine, form)
    onnx.checker.check_model(affine)
    assert set(form.affines) == AFFINES
    a, b = _run(int8, TEST), _run(affine, TEST)
    # Identical arithmetic but for float rounding; a rounding tie may move one quantized value by one step.
    assert np.abs(a - b).max() <= 0.02 * np.abs(a).max()


def test_a_model_without_qdq_outputs_or_affines_changes_only_its_signed_tensors(tmp_path):
    """ResNet v1-like: no depthwise affines, logits already float; only zero points change."""
    from tests.helpers.tiny_models import tiny_cnn

    prepared = prepare_model(tiny_cnn(tmp_path / "tiny.onnx"), tmp_path)
    recipe = QuantRecipe(calibration="minmax", reduce_range=False)
    ranges = calibrate(prepared.path, prepared.signature.input_name, [CALIB], recipe, tmp_path)
    out = tmp_path / "int8.onnx"
    quantize_with_ort(prepared.path, ranges, recipe, out, tmp_path)
    model = onnx.load(str(out))
    form = to_openvino_form(model)
    assert form.affines == [] and form.float_outputs == []
    assert form.symmetric  # the normalized input holds negative values
    onnx.checker.check_model(model)
    assert np.corrcoef(_run(model, TEST).ravel(), _run(out, TEST).ravel())[0, 1] > 0.99


def test_openvino_form_needs_qdq():
    with pytest.raises(
        RqInputError,
        match=r"placement_runtime openvino \(--placement-runtime\) rewrites a QDQ model: it needs format qdq \(--format qdq\)",
    ):
        QuantRecipe(placement_runtime="openvino", format="qoperator")


def test_cli_reports_the_form(cli, v2_model, calib_dir, tmp_path):
    out = tmp_path / "v2-ov.onnx"
    result = cli(
        "quantize", v2_model, "--calib", calib_dir, "--samples", "8", "--workers", "2", "--out", out,
        "--placement-runtime", "openvino", "--report-dir", tmp_path / "reports", "--json", *SMALL,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    form = data["runtime_form"]
    assert set(form["affines"]) == AFFINES and form["float_outputs"] == ["logits"]
    (ops,) = [v["quantized_ops"] for v in data["variants"] if v["quantized_ops"]]
    fp32_reasons = ops["fp32"]
    assert {name: fp32_reasons[name] for name in AFFINES} == {
        name: ["Conv", AFFINE_REASON] for name in AFFINES
    }
    report = json.loads(next((tmp_path / "reports").glob("*/report.json")).read_text())
    assert report["runtime_form"]["affines"] and any("OpenVINO form" in n for n in report["notes"])
    int8 = onnx.load(str(out))
    assert not [
        n
        for n in int8.graph.node
        if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
    ]


@pytest.mark.openvino
def test_openvino_fuses_the_form(v2_model, tmp_path):
    """In OpenVINO the form leaves no depthwise convolution and every convolution in int8; without it the
    BNs run as int8 depthwise convolutions (the check can fail)."""
    ov = pytest.importorskip("openvino")
    _fp32, int8 = _quantized_v2(v2_model, tmp_path)
    plain = tmp_path / "plain.onnx"
    onnx.save(int8, str(plain))
    to_openvino_form(int8)
    formed = tmp_path / "formed.onnx"
    onnx.save(int8, str(formed))

    def layers(path: Path) -> list[tuple[str, str]]:
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        found = []
        for op in compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            found.append((info["layerType"].astype(str), info["runtimePrecision"].astype(str)))
        return found

    skip = {"Input", "Output", "Const", "Reorder", "Reshape"}
    before = [x for x in layers(plain) if x[0] not in skip]
    after = [x for x in layers(formed) if x[0] not in skip]
    convs_before = [p for t, p in before if t == "Convolution"]
    convs_after = [p for t, p in after if t == "Convolution"]
    # The 3 BNs ran as int8 (depthwise) convolutions; now 2 are fused BN+ReLU+quantize kernels and the last
    # one (its sum has no other reader) is fused into the convolution before it.
    assert len(convs_before) == len(convs_after) + len(AFFINES)
    assert set(convs_after) == {"u8"} and "f32" not in convs_before
    assert ("FakeQuantize", "u8") in after
    # The logits: dequantized by an f32 eltwise before, written by the FullyConnected itself now.
    assert before[-1] == ("Eltwise", "f32") and after[-1][0] == "FullyConnected"
