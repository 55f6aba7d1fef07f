"""ONNX Runtime's OpenVINO execution provider (`--runtime ort-openvino`). Skipped where the installed onnxruntime
has no OpenVINOExecutionProvider (the main venv); CI runs it in .venv-ort-openvino, where the
onnxruntime-openvino distribution (1.24: it cannot share rq's venv, whose quantizer needs onnxruntime ≥ 1.32)
replaces onnxruntime. rq's quantizer does not run there, so the INT8 file is made with that onnxruntime's own
`quantize_static`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from quantize.measure import runtimes
from tests.helpers.calib_images import make_class_folders
from tests.helpers.cli import SMALL, all_output, assert_one_line_error
from tests.helpers.onehot import top1_60_percent, wnid
from tests.helpers.tiny_models import random_inputs, tiny_cnn

PROVIDER = "OpenVINOExecutionProvider"
if PROVIDER not in ort.get_available_providers():
    pytest.skip(f"onnxruntime {ort.__version__} here has no {PROVIDER}", allow_module_level=True)
pytestmark = pytest.mark.ort_openvino


@pytest.fixture(scope="module")
def fp32_int8(tmp_path_factory) -> tuple[Path, Path]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    base = tmp_path_factory.mktemp("ort-ov")
    fp32 = tiny_cnn(base / "tiny.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": random_inputs(8, seed=s)} for s in range(2)])

        def get_next(self):
            return next(self.batches, None)

    int8 = base / "tiny-int8.onnx"
    quantize_static(
        str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    return fp32, int8


def test_the_provider_runs_fp32_like_onnx_runtime_and_int8_close_to_it(fp32_int8):
    fp32, int8 = fp32_int8
    x = random_inputs(4, seed=5)
    session = runtimes.get("ort-openvino").open(fp32, threads=1)
    assert session.device == PROVIDER and session.precision == "f32"
    reference = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(session.run(x), reference, rtol=1e-4, atol=1e-4)
    int8_session = runtimes.get("ort-openvino").open(int8, threads=1)
    assert int8_session.device == PROVIDER and int8_session.precision == "int8+f32"
    # integer arithmetic differs between runtimes, but the INT8 model still tracks the FP32 one
    assert (int8_session.run(x).argmax(1) == reference.argmax(1)).mean() >= 3 / 4


def test_bench_in_ort_and_ort_openvino(cli, fp32_int8):
    result = cli(
        "bench", *fp32_int8, "--runtime", "ort,ort-openvino", "--runs", "2", "--batch", "1,2", "--json"
    )
    assert result.exit_code == 0, all_output(result)
    data = json.loads(result.stdout)
    assert data["errors"] == [] and data["runtime_versions"]["ort-openvino"].endswith(f"with {PROVIDER}")
    rows = {(r["runtime"], r["model_index"], r["batch"]): r for r in data["rows"]}
    assert len(rows) == 8
    assert rows[("ort-openvino", 1, 2)]["precision"] == "int8+f32"
    assert rows[("ort-openvino", 1, 1)]["ratio_to_ort_first"] > 0


def test_eval_top1_in_ort_openvino(cli, tmp_path):
    model, val = top1_60_percent(tmp_path)
    result = cli("eval", model, "--data", val, "--runtime", "ort,ort-openvino", "--json", *SMALL)
    assert result.exit_code == 0, all_output(result)
    found = json.loads(result.stdout)["runtimes"]
    assert found["ort-openvino"]["models"][0]["top1"] == found["ort"]["models"][0]["top1"] == 60.0


def test_quantize_says_in_one_line_that_it_needs_onnxruntime(cli, fp32_int8, tmp_path):
    calib = tmp_path / "calib"
    make_class_folders(calib, {wnid(0): 4, wnid(1): 4}, size=(48, 40))
    out = tmp_path / "int8.onnx"
    result = cli("quantize", fp32_int8[0], "--calib", calib, "--samples", "8", "--out", out, *SMALL)
    assert_one_line_error(result, "needs onnxruntime >= 1.32")
    assert not out.exists()
