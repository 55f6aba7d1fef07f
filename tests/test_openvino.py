"""The real OpenVINO runtime (the `openvino` extra). Skipped in the main venv; CI runs it in .venv-openvino."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from quantize.measure import runtimes
from tests.helpers.calib_images import make_class_folders
from tests.helpers.cli import SMALL, all_output, assert_one_line_error
from tests.helpers.onehot import top1_60_percent, wnid
from tests.helpers.tiny_models import random_inputs

pytest.importorskip("openvino")
pytestmark = pytest.mark.openvino


def test_fp32_runs_in_f32_and_matches_onnxruntime(tiny_pair):
    fp32, int8 = tiny_pair
    x = random_inputs(3, seed=2)
    session = runtimes.get("openvino").open(fp32, threads=1)
    got = session.run(x)
    # Forced f32 even on CPUs with AVX512_BF16/AMX, where OpenVINO's default would be bf16.
    assert session.precision == "f32"
    reference = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4)
    int8_session = runtimes.get("openvino").open(int8, threads=1)
    out = int8_session.run(x)
    assert int8_session.precision == "int8+f32" and out.shape == reference.shape
    # integer arithmetic differs between runtimes, but the INT8 model still tracks the FP32 one
    assert (out.argmax(1) == reference.argmax(1)).mean() >= 2 / 3


def test_bench_in_ort_and_openvino(cli, tiny_pair):
    result = cli("bench", *tiny_pair, "--runtime", "ort,openvino", "--runs", "2", "--batch", "1,2", "--json")
    assert result.exit_code == 0, all_output(result)
    data = json.loads(result.stdout)
    assert data["errors"] == [] and data["runtime_versions"]["openvino"].startswith("openvino 20")
    rows = {(r["runtime"], r["model_index"], r["batch"]): r for r in data["rows"]}
    assert len(rows) == 8
    assert rows[("openvino", 0, 1)]["precision"] == "f32"
    assert rows[("openvino", 1, 2)]["precision"] == "int8+f32"


def test_precision_is_what_openvino_ran_not_what_the_file_says(cli, tiny_pair, tmp_path):
    """OpenVINO's CPU plugin has no u8-weight convolution: a U8U8 file runs its convs in float (measured on
    ResNet-50 v1: FP32's speed). Its label says so; the u8s8 file's convs run in integers."""
    fp32, int8 = tiny_pair
    calib = tmp_path / "calib"
    make_class_folders(calib, {wnid(0): 4, wnid(1): 4}, size=(48, 40))
    u8u8 = tmp_path / "tiny-u8u8.onnx"
    result = cli(
        "quantize", fp32, "--calib", calib, "--samples", "8", "--out", u8u8, "--weight-type", "uint8",
        "--no-reduce-range", "--report-dir", tmp_path / "reports", *SMALL,
    )  # fmt: skip
    assert result.exit_code == 0, all_output(result)
    x = random_inputs(2, seed=3)
    emulated = runtimes.get("openvino").open(u8u8, threads=1)
    emulated.run(x)
    assert emulated.precision == "f32 (Q/DQ emulated)"
    integer = runtimes.get("openvino").open(int8, threads=1)
    integer.run(x)
    assert integer.precision == "int8+f32"


def test_executed_precision_counts_the_compute_layers():
    class Info(dict):
        def __getitem__(self, key):
            value = dict.__getitem__(self, key)
            return type("Any", (), {"astype": lambda _self, _t: value})()

    class Op:
        def __init__(self, layer, precision):
            self.info = Info(layerType=layer, runtimePrecision=precision)

        def get_rt_info(self):
            return self.info

    def compiled(*ops):
        graph = type("G", (), {"get_ordered_ops": lambda _self: [Op(*o) for o in ops]})()
        return type("C", (), {"get_runtime_model": lambda _self: graph})()

    mixed = compiled(
        ("Convolution", "u8"), ("Convolution", "f32"), ("Eltwise", "f32"), ("FullyConnected", "i8")
    )
    assert runtimes.executed_precision(mixed, "f32", True) == "int8+f32"
    assert runtimes.executed_precision(mixed, "f32", False) == "f32"
    assert (
        runtimes.executed_precision(compiled(("Convolution", "f32")), "bf16", True) == "bf16 (Q/DQ emulated)"
    )
    broken = type("C", (), {"get_runtime_model": lambda _self: 1 / 0})()
    assert runtimes.executed_precision(broken, "f32", True) == "int8+f32"


def test_eval_top1_in_openvino(cli, tmp_path):
    model, val = top1_60_percent(tmp_path)
    result = cli("eval", model, "--data", val, "--runtime", "openvino", "--json", *SMALL)
    assert result.exit_code == 0, all_output(result)
    assert json.loads(result.stdout)["runtimes"]["openvino"]["models"][0]["top1"] == 60.0


def _unreadable_by_openvino(source, odd):
    """`source` plus com.microsoft.Inverse, which runs in ONNX Runtime but OpenVINO has no conversion rule
    for (added as zero to the 2-D output, so the outputs are unchanged)."""
    model = onnx.load(str(source))
    last = model.graph.output[0].name
    producer = next(n for n in model.graph.node if last in n.output)
    producer.output[list(producer.output).index(last)] = "odd_pre"
    model.graph.node.extend(
        [
            helper.make_node("Unsqueeze", ["odd_pre", "odd_axes"], ["odd_pre3"]),
            helper.make_node("Mul", ["odd_pre3", "odd_zero"], ["odd_zeroed"]),
            helper.make_node("Inverse", ["odd_eye"], ["odd_inv"], domain="com.microsoft"),
            helper.make_node("Add", ["odd_zeroed", "odd_inv"], ["odd_sum3"]),
            helper.make_node("ReduceSum", ["odd_sum3", "odd_axes"], [last], keepdims=0),
        ]
    )
    model.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(np.array([2], np.int64), "odd_axes"),
            onnx.numpy_helper.from_array(np.zeros((1, 1, 1), np.float32), "odd_zero"),
            onnx.numpy_helper.from_array(np.eye(1, dtype=np.float32), "odd_eye"),
        ]
    )
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(odd))
    return odd


def test_model_openvino_cannot_read_keeps_the_ort_rows(cli, tiny_pair, tmp_path):
    fp32, _ = tiny_pair
    odd = _unreadable_by_openvino(fp32, tmp_path / "odd.onnx")
    assert ort.InferenceSession(str(odd), providers=["CPUExecutionProvider"]).run(
        None, {"input": random_inputs(1)}
    )

    result = cli("bench", fp32, odd, "--runtime", "ort,openvino", "--runs", "1", "--batch", "1", "--json")
    assert result.exit_code == 0, all_output(result)
    data = json.loads(result.stdout)
    assert {(r["runtime"], r["model_index"]) for r in data["rows"]} == {
        ("ort", 0),
        ("ort", 1),
        ("openvino", 0),
    }
    ((index, rt, why),) = data["errors"]
    assert (index, rt) == (1, "openvino") and "openvino cannot read odd.onnx" in why
    assert "com.microsoft.Inverse" in why and "\n" not in why and "src/" not in why

    # as the first (FP32) model, nothing can be compared in OpenVINO: one line, exit 2
    assert_one_line_error(
        cli("bench", odd, fp32, "--runtime", "openvino", "--runs", "1", "--batch", "1"),
        "openvino cannot read odd.onnx",
    )


def test_a_file_that_is_not_onnx_is_one_line_on_stderr(tmp_path):
    """OpenVINO's read_model would try its other frontends, and the TensorFlow one prints parse errors to the
    process's stderr (outside Python, so only a subprocess sees them)."""
    import subprocess
    import sys

    text = tmp_path / "text.onnx"
    text.write_text("hello: 1\n")
    _, val = top1_60_percent(tmp_path)
    for command in (["bench", str(text)], ["eval", str(text), "--data", str(val)]):
        done = subprocess.run(
            [sys.executable, "-m", "quantize.cli", *command, "--runtime", "openvino"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        lines = [ln for ln in done.stderr.splitlines() if ln.strip() and not ln.startswith("·")]
        assert len(lines) == 1 and lines[0].startswith(f"rq: error: {text} is not an ONNX model: "), (
            done.stderr
        )


def test_eval_keeps_the_ort_rows_of_a_model_openvino_cannot_read(cli, tmp_path):
    model, val = top1_60_percent(tmp_path)
    odd = _unreadable_by_openvino(model, tmp_path / "odd.onnx")
    result = cli("eval", model, odd, "--data", val, "--runtime", "ort,openvino", "--json", *SMALL)
    assert result.exit_code == 0, all_output(result)
    data = json.loads(result.stdout)
    assert [[m["path"] for m in run["models"]] for run in data["runtimes"].values()] == [
        [str(model), str(odd)],
        [str(model)],
    ]
    assert data["runtimes"]["openvino"]["models"][0]["top1"] == 60.0
    (note,) = data["runtimes"]["openvino"]["notes"]
    assert note.startswith("#2 odd.onnx not evaluated in openvino: openvino cannot read odd.onnx")
    assert "\n" not in note


@pytest.mark.parametrize("measure", [["--val", "VAL"], ["--bench", "--bench-runs", "20"]])
def test_quantize_checks_every_runtime_reads_the_model_before_writing(cli, tiny_pair, tmp_path, measure):
    """A runtime that cannot run the FP32 model: one line, exit 2, before calibration writes anything."""
    thousand_classes, val = top1_60_percent(tmp_path)
    # --val needs an ImageNet classifier; --bench takes the tiny CNN.
    odd = _unreadable_by_openvino(
        thousand_classes if "--val" in measure else tiny_pair[0], tmp_path / "odd.onnx"
    )
    calib = tmp_path / "calib"
    make_class_folders(calib, {wnid(0): 4, wnid(1): 4}, size=(48, 40))
    out, reports = tmp_path / "odd-int8.onnx", tmp_path / "reports"
    measure = [str(val) if m == "VAL" else m for m in measure]
    result = cli(
        "quantize", odd, "--calib", calib, "--samples", "8", "--out", out, "--report-dir", reports,
        "--runtime", "ort,openvino", *measure, *SMALL,
    )  # fmt: skip
    assert_one_line_error(result, "openvino cannot read odd.onnx")
    assert not out.exists() and not any(reports.rglob("*"))


@pytest.mark.parametrize("command", ["bench", "eval"])
def test_a_file_that_is_no_model_is_bad_input_in_openvino_too(cli, tiny_pair, tmp_path, command):
    """Only a model OpenVINO cannot *convert* loses its OpenVINO rows; a missing, empty or corrupt file is an
    error (exit 2) in any runtime, as it is in onnxruntime."""
    model, val = top1_60_percent(tmp_path)
    first = model if command == "eval" else tiny_pair[0]
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(first.read_bytes()[:200])
    args = ["--data", val, *SMALL] if command == "eval" else ["--runs", "1", "--batch", "1"]
    for bad, why in (
        (tmp_path / "nope.onnx", "model not found"),
        (empty, "empty file"),
        (truncated, "is not an ONNX model"),
    ):
        assert_one_line_error(cli(command, first, bad, "--runtime", "openvino", *args), why)


def test_eval_skips_a_model_openvino_cannot_read_wherever_openvino_is_listed(cli, tmp_path):
    model, val = top1_60_percent(tmp_path)
    odd = _unreadable_by_openvino(model, tmp_path / "odd.onnx")
    for runtimes_asked in ("openvino,ort", "openvino"):
        result = cli("eval", model, odd, "--data", val, "--runtime", runtimes_asked, "--json", *SMALL)
        assert result.exit_code == 0, all_output(result)
        data = json.loads(result.stdout)
        assert [m["path"] for m in data["runtimes"]["openvino"]["models"]] == [str(model)]
        (note,) = data["runtimes"]["openvino"]["notes"]
        assert note.startswith("#2 odd.onnx not evaluated in openvino: openvino cannot read odd.onnx")
