"""Validation of INT8 against FP32 (`quantize.measure.validate`): the paired drop, the gate, the calibration overlap,
and `rq quantize --val/--max-drop` through the CLI with a model whose INT8 version really flips predictions.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from quantize.exits import EXIT_BAD_INPUT, EXIT_GATE_FAILED
from quantize.measure.stats import paired_drop, tango_interval
from quantize.measure.validate import Gate, count_overlap, validate, validation_samples
from tests.helpers.calib_images import make_class_folders, write_rgb
from tests.helpers.cli import all_output, assert_one_line_error
from tests.helpers.onehot import onehot_model, onehot_row, wnid
from tests.helpers.sensitive import (
    BREAKING,
)
from tests.helpers.tiny_models import SMALL_SPEC

K, J, OTHER = 3, 7, 11
N_K, N_J = 6, 2

# ---------------------------------------------------------------------------------------------------------
# The paired drop on a model pair whose predictions are fixed
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_class_val(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gate-val")
    make_class_folders(root, {wnid(K): N_K, wnid(J): N_J}, size=(40, 36))
    return root


@pytest.fixture(scope="module")
def onehots(tmp_path_factory) -> dict[int, Path]:
    d = tmp_path_factory.mktemp("gate-onehot")
    return {k: onehot_model(d / f"class{k}.onnx", onehot_row(1000, [k])) for k in (K, J, OTHER)}


def test_validate_drop_equals_paired_drop_on_hand_made_arrays(onehots, two_class_val):
    """The "FP32" model always says K and the "INT8" one J: FP32 is right on the 6 K images, INT8 on the 2 J."""
    dataset, samples = validation_samples(two_class_val, None, None)
    v = validate(onehots[K], onehots[J], dataset, samples, SMALL_SPEC, batch_size=3)
    a = np.array([True] * N_K + [False] * N_J)
    b = ~a
    expected = paired_drop(a, b, disagreements=N_K + N_J)
    assert v.drop == expected
    d = v.drop
    assert (d.n, d.a_only, d.b_only, d.disagreements) == (8, 6, 2, 8)
    assert d.top1_a == 75.0 and d.top1_b == 25.0 and d.drop_pt == 50.0
    assert d.method == "score" and d.confidence == 0.95
    assert v.fp32.top1 == 75.0 and v.int8.top1 == 25.0
    assert v.overlap_with_calibration == 0
    assert v.to_dict()["images"] == 8


def test_validate_drop_interval_is_the_score_interval(onehots, two_class_val):
    """INT8 right on no image: every discordant image goes FP32's way (6 of 8). The interval is Tango's score
    interval for those counts; unlike one conditional on the 6 discordant images it reaches above the
    measured 75 pt (those 6 could have been fewer or more)."""
    dataset, samples = validation_samples(two_class_val, None, None)
    v = validate(onehots[K], onehots[OTHER], dataset, samples, SMALL_SPEC)
    d = v.drop
    low, high = tango_interval(6, 0, 8)
    assert (d.a_only, d.b_only) == (6, 0)
    assert d.disagreements == 8  # OTHER differs from K on the J images too, though both are wrong there
    assert d.drop_pt == pytest.approx(75.0)
    assert (d.ci_low_pt, d.ci_high_pt) == pytest.approx((100 * low, 100 * high), abs=1e-9)
    assert d.ci_high_pt > 75.0 and d.significant


def test_identical_models_have_no_drop_but_eight_images_prove_little(onehots, two_class_val):
    dataset, samples = validation_samples(two_class_val, None, None)
    v = validate(onehots[K], onehots[K], dataset, samples, SMALL_SPEC)
    d = v.drop
    assert (d.drop_pt, d.disagreements) == (0.0, 0)
    z2 = 1.959963984540054**2
    assert (d.ci_low_pt, d.ci_high_pt) == pytest.approx((-100 * z2 / (8 + z2), 100 * z2 / (8 + z2)), abs=1e-6)
    assert not d.significant


def test_validate_counts_calibration_overlap(onehots, two_class_val):
    dataset, samples = validation_samples(two_class_val, None, None)
    calib = [s.path for s in samples[:3]]
    v = validate(onehots[K], onehots[K], dataset, samples, SMALL_SPEC, calibration_files=calib)
    assert v.overlap_with_calibration == 3
    assert v.to_dict()["overlap_with_calibration"] == 3


# ---------------------------------------------------------------------------------------------------------
# Gate
# ---------------------------------------------------------------------------------------------------------


def test_gate_passes_at_and_below_the_limit():
    for drop in (-1.0, 0.0, 0.3, 0.5):
        gate = Gate(0.5, drop, EXIT_GATE_FAILED)
        assert gate.passed
        assert gate.message.startswith("PASSED") and "≤ 0.50 pt" in gate.message
        data = gate.to_dict()
        assert data["passed"] is True and data["exit_code"] == 0 and data["variant"] == "INT8"


def test_gate_fails_above_the_limit():
    gate = Gate(0.5, 0.51, EXIT_GATE_FAILED, "INT8 qdq-pt-minmax")
    assert not gate.passed
    assert gate.message == "FAILED: INT8 top-1 drop 0.51 pt > 0.50 pt (exit code 3)"
    data = gate.to_dict()
    assert data == {
        "variant": "INT8 qdq-pt-minmax",
        "max_drop_pt": 0.5,
        "drop_pt": 0.51,
        "gate_on": "point",
        "ci_high_pt": None,
        "confirmed": None,
        "images": None,
        "images_to_confirm": None,
        "tuning_goal_met": None,
        "runtimes": [],
        "passed": False,
        "exit_code": 3,
        "message": gate.message,
    }


def test_gate_fails_when_tuning_missed_its_goal_even_if_held_out_images_pass():
    # The tuner kept its best model (0.15 pt on the tuning images > 0.10): rq writes it but must not claim success.
    gate = Gate(0.1, -0.31, EXIT_GATE_FAILED, tuning_goal_met=False, tuning_best_drop_pt=0.15)
    assert not gate.passed
    assert gate.to_dict()["exit_code"] == 3
    assert gate.message.startswith("FAILED: tuning found no configuration within 0.10 pt")
    assert "best 0.15 pt" in gate.message and "held-out drop -0.31 pt" in gate.message
    assert Gate(0.1, 0.05, EXIT_GATE_FAILED, tuning_goal_met=True).passed


# ---------------------------------------------------------------------------------------------------------
# count_overlap
# ---------------------------------------------------------------------------------------------------------


def test_count_overlap_same_files_links_and_copies(tmp_path):
    calib = [write_rgb(tmp_path / "calib" / f"c{i}.png", seed=i) for i in range(4)]
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    hard = val_dir / "hard.png"
    os.link(calib[0], hard)
    sym = val_dir / "sym.png"
    sym.symlink_to(calib[1])
    copy = val_dir / "copy.png"
    shutil.copy(calib[2], copy)  # same bytes in another file: the same image, it counts
    other = write_rgb(val_dir / "other.png", seed=99)
    # the same size as a calibration image but other bytes: hashed, and not counted
    twin_size = val_dir / "twin-size.png"
    data = bytearray(calib[3].read_bytes())
    data[-1] ^= 0xFF
    twin_size.write_bytes(bytes(data))
    roundabout = tmp_path / "calib" / ".." / "calib" / "c3.png"
    assert count_overlap(calib, calib) == 4
    assert count_overlap(calib, [hard]) == 1
    assert count_overlap(calib, [sym]) == 1
    assert count_overlap(calib, [roundabout]) == 1
    assert count_overlap(calib, [copy, other, twin_size]) == 1
    assert count_overlap(calib, [hard, sym, copy, other, twin_size, roundabout]) == 4
    assert count_overlap([], [hard]) == 0
    assert count_overlap(calib, [tmp_path / "missing.png"]) == 0


# ---------------------------------------------------------------------------------------------------------
# rq quantize --val --max-drop (a model whose INT8 version flips predictions)
# ---------------------------------------------------------------------------------------------------------


def _report(report_dir: Path) -> dict:
    (run,) = [p for p in report_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return json.loads((run / "report.json").read_text())


def test_gate_failed_exit_3_artifact_and_report_written(cli, flipping, tmp_path):
    out = tmp_path / "int8.onnx"
    reports = tmp_path / "reports"
    result = cli(
        "quantize",
        flipping["model"],
        "--calib",
        flipping["calib"],
        "--val",
        flipping["val"],
        "--max-drop",
        "0",
        "--out",
        out,
        "--report-dir",
        reports,
        *BREAKING,
    )
    text = all_output(result)
    assert result.exit_code == EXIT_GATE_FAILED, text
    assert "FAILED" in text and "Traceback" not in text
    assert out.is_file()  # the model is written even though the gate failed
    data = _report(reports)
    assert data["gate"]["passed"] is False and data["gate"]["exit_code"] == EXIT_GATE_FAILED
    fp32, int8 = data["variants"]
    assert fp32["accuracy"]["top1"] == 100.0
    assert int8["drop"]["drop_pt"] > 0
    assert data["gate"]["drop_pt"] == pytest.approx(int8["drop"]["drop_pt"], abs=1e-4)
    assert int8["drop"]["significant"] is True
    (run,) = [p for p in reports.iterdir() if p.is_dir()]
    assert "FAILED" in (run / "report.md").read_text() and (run / "report.html").is_file()


def test_gate_passes_with_the_sensitive_node_in_fp32(cli, flipping, tmp_path):
    out = tmp_path / "int8.onnx"
    reports = tmp_path / "reports"
    result = cli(
        "quantize",
        flipping["model"],
        "--calib",
        flipping["calib"],
        "--val",
        flipping["val"],
        "--max-drop",
        "0",
        "--exclude-nodes",
        "conv_sensitive",
        "--out",
        out,
        "--report-dir",
        reports,
        *BREAKING,
    )
    text = all_output(result)
    assert result.exit_code == 0, text
    assert "PASSED" in text and "FAILED" not in text
    assert out.is_file()
    data = _report(reports)
    assert data["gate"]["passed"] is True and data["gate"]["exit_code"] == 0
    assert data["variants"][1]["drop"]["drop_pt"] == 0.0
    assert data["validation"]["overlap_with_calibration"] == 0
    assert "also calibration images" not in text


def test_warning_when_calibration_and_validation_are_the_same_images(cli, flipping, tmp_path):
    reports = tmp_path / "reports"
    result = cli(
        "quantize",
        flipping["model"],
        "--calib",
        flipping["val"],
        "--val",
        flipping["val"],
        "--exclude-nodes",
        "conv_sensitive",
        "--out",
        tmp_path / "int8.onnx",
        "--report-dir",
        reports,
        *BREAKING,
    )
    text = all_output(result)
    assert result.exit_code == 0, text
    images = sum(1 for _ in flipping["val"].rglob("*.png"))
    used = min(16, images)
    assert f"warning: {used} validation images are also calibration images" in " ".join(text.split())
    data = _report(reports)
    assert data["validation"]["overlap_with_calibration"] == used
    assert any("also calibration images" in note for note in data["notes"])


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--max-drop", "0.5"], "--max-drop needs --val"),
        (["--tune"], "--tune needs --val"),
        (["--tune", "--max-drop", "0.5"], "needs --val"),
        (["--tune", "--val", "{val}"], "--tune needs --val"),  # --val but no --max-drop (the goal)
        (["--val", "{val}", "--max-drop", "-1"], "--max-drop must be ≥ 0"),
        (["--val", "{val}", "--max-drop", "1", "--eval-batch", "0"], "--eval-batch must be ≥ 1"),
    ],
)
def test_gate_options_need_val(cli, flipping, tmp_path, extra, fragment):
    out = tmp_path / "int8.onnx"
    extra = [e.replace("{val}", str(flipping["val"])) for e in extra]
    result = cli(
        "quantize",
        flipping["model"],
        "--calib",
        flipping["calib"],
        "--out",
        out,
        "--report-dir",
        tmp_path / "reports",
        *extra,
        *BREAKING,
    )
    assert_one_line_error(result, fragment)
    assert result.exit_code == EXIT_BAD_INPUT
    assert not out.exists() and not (tmp_path / "reports").exists()


def test_gate_over_several_runtimes_reads_the_worst_gated_figure():
    """With --gate-on ci the gate reads the runtime with the largest interval bound, not the largest point drop;
    its message names every runtime validated."""
    from types import SimpleNamespace

    from quantize.run import _gate

    n = 100
    fp32 = np.ones(n, dtype=bool)
    # ort: drop 0 but 3 + 3 discordant images (a wide interval); openvino: 1 image lost (drop 1 pt, narrow).
    ort_int8 = fp32.copy()
    ort_int8[:3] = False
    fp32_ort = fp32.copy()
    fp32_ort[3:6] = False
    ort_int8_b = ort_int8.copy()
    ort_int8_b[3:6] = True
    ov_int8 = fp32.copy()
    ov_int8[0] = False
    validations = {
        "ort": SimpleNamespace(drop=paired_drop(fp32_ort, ort_int8_b)),
        "openvino": SimpleNamespace(drop=paired_drop(fp32, ov_int8)),
    }
    assert validations["ort"].drop.drop_pt < validations["openvino"].drop.drop_pt
    assert validations["ort"].drop.ci_high_pt > validations["openvino"].drop.ci_high_pt
    result = SimpleNamespace(tuning=None, recipe=SimpleNamespace(label=lambda: "qdq"))
    for gate_on, worst in (("point", "INT8 qdq · openvino"), ("ci", "INT8 qdq")):
        request = SimpleNamespace(max_drop=2.0, gate_on=gate_on)
        gate = _gate(request, result, validations, ["ort", "openvino"])
        assert gate.variant == worst
        assert "validated in ort, openvino" in gate.message
        assert gate.to_dict()["runtimes"] == ["ort", "openvino"]
    assert not gate.passed  # the ort interval reaches past 2 pt
