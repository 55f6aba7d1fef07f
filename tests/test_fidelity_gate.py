"""Part 5 of issue 7: agreement with FP32 next to every drop, label-free fidelity on held-back calibration
images, and a gate that says when its images cannot confirm the goal (`--gate-on ci` gates on the bound).

Statistics are checked against hand-computed answers; the CLI runs use the tune tests' sensitive model, whose
INT8 version (per-tensor MinMax) predicts one class for every image, with validation labels chosen so that
INT8 is right on some images FP32 gets wrong: the drop is then small while its interval stays wide.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from calibration import discover_dataset, load_image, load_synsets, select_samples
from calibration.errors import RqInputError
from quantize.cli import app
from quantize.exits import EXIT_BAD_INPUT, EXIT_GATE_FAILED
from quantize.measure.fidelity import compare_logits, held_back_samples, softmax_kl
from quantize.measure.stats import agreement, images_to_confirm, paired_drop
from quantize.measure.validate import Gate
from tests.helpers.cli import ENV, all_output, assert_one_line_error
from tests.helpers.sensitive import (
    BREAKING,
    center_fc_bias,
    colored_images,
    labelled_by_fp32,
    sensitive_model,
)
from tests.helpers.tiny_models import SMALL_SPEC

# ---------------------------------------------------------------------------------------------------------
# Statistics with known answers
# ---------------------------------------------------------------------------------------------------------


def test_agreement_counts_and_exact_interval():
    a = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    b = a.copy()
    b[[2, 7]] = 0
    result = agreement(a, b)
    assert (result.n, result.disagreements, result.agreement_pct) == (10, 2, 80.0)
    # Clopper–Pearson for 8 of 10 at 95%: [0.4439, 0.9748] (textbook values)
    assert result.ci_low_pct == pytest.approx(44.39, abs=0.01)
    assert result.ci_high_pct == pytest.approx(97.48, abs=0.01)


def test_full_agreement_has_the_closed_form_lower_bound():
    a = np.arange(50)
    result = agreement(a, a)
    assert result.agreement_pct == 100.0 and result.disagreements == 0
    assert result.ci_high_pct == 100.0
    assert result.ci_low_pct == pytest.approx(100 * 0.025 ** (1 / 50), abs=1e-9)


def test_agreement_bad_input():
    with pytest.raises(RqInputError, match="differ in length"):
        agreement([1, 2], [1])
    with pytest.raises(RqInputError, match="no predictions"):
        agreement([], [])


def test_paired_drop_carries_agreement():
    a = np.array([True] * 6 + [False] * 4)
    b = np.array([False] * 2 + [True] * 4 + [True] * 1 + [False] * 3)
    d = paired_drop(a, b, disagreements=5)
    assert d.agreement_pct == 50.0
    assert d.to_dict()["agreement_pct"] == 50.0


def test_images_to_confirm_matches_the_normal_formula_and_the_interval_rq_reports():
    """1300 images, 20 FP32-only and 18 INT8-only right: drop 0.15 pt, upper bound 1.13 pt > 0.5 pt.
    Normal approximation: N = z²(d − δ²)/(G − δ)² = 1.96²·(38/1300 − (2/1300)²)/(0.005 − 2/1300)² ≈ 9370."""
    d, delta, gate = 38 / 1300, 2 / 1300, 0.005
    z = 1.959963984540054
    normal = z * z * (d - delta**2) / (gate - delta) ** 2
    assert normal == pytest.approx(9370, abs=5)
    needed = images_to_confirm(20, 18, 1300, 0.5)
    assert needed % 10 == 0
    # the score interval is close to the normal one at 38 discordant images: the answer is near the formula
    assert 0.95 * normal <= needed <= 1.1 * normal
    # and it is what the reported (score) bound needs, counts scaled to it
    paired = paired_drop
    scale = needed / 1300
    a, b = round(20 * scale), round(18 * scale)
    at = paired(
        [True] * a + [False] * b + [True] * (needed - a - b),
        [False] * a + [True] * b + [True] * (needed - a - b),
    )
    assert at.ci_high_pt <= 0.5
    fewer = needed - 200
    a, b = round(20 * fewer / 1300), round(18 * fewer / 1300)
    before = paired(
        [True] * a + [False] * b + [True] * (fewer - a - b),
        [False] * a + [True] * b + [True] * (fewer - a - b),
    )
    assert before.ci_high_pt > 0.5


def test_images_to_confirm_has_no_answer_when_the_drop_itself_exceeds_the_gate():
    assert images_to_confirm(30, 10, 1000, 1.0) is None  # drop 2 pt > 1 pt
    # No discordant image: the interval is ±z²/(N + z²), under 0.5 pt from N = 765 images on (rounded up to
    # 770), under 0.1 pt from 3838 (3840).
    assert images_to_confirm(0, 0, 1000, 0.5) == 770
    assert images_to_confirm(0, 0, 1000, 0.1) == 3840


# ---------------------------------------------------------------------------------------------------------
# The gate's words
# ---------------------------------------------------------------------------------------------------------


def _drop(a_only: int, b_only: int, n: int):
    both = n - a_only - b_only
    a = [True] * a_only + [False] * b_only + [True] * both
    b = [False] * a_only + [True] * b_only + [True] * both
    return paired_drop(a, b, disagreements=a_only + b_only)


def test_point_gate_passes_but_says_the_images_cannot_confirm_the_goal():
    drop = _drop(20, 18, 1300)  # 0.15 pt, 95% CI up to 1.13 pt
    gate = Gate.from_drop(0.5, drop, EXIT_GATE_FAILED)
    assert gate.passed and gate.confirmed is False
    needed = images_to_confirm(20, 18, 1300, 0.5)
    assert gate.message == (
        "PASSED: INT8 top-1 drop 0.15 pt ≤ 0.50 pt; the 95% interval reaches 1.13 pt, so these 1300 images "
        f"cannot confirm the goal; about {needed} images would, at the disagreement rate seen here "
        "(--gate-on ci gates on the upper bound)"
    )
    data = gate.to_dict()
    assert data["images_to_confirm"] == needed and data["exit_code"] == 0 and data["confirmed"] is False


def test_ci_gate_fails_on_the_upper_bound():
    drop = _drop(20, 18, 1300)
    gate = Gate.from_drop(0.5, drop, EXIT_GATE_FAILED, gate_on="ci")
    assert not gate.passed and gate.to_dict()["exit_code"] == EXIT_GATE_FAILED
    assert gate.message.startswith(
        "FAILED (--gate-on ci): INT8 top-1 drop 0.15 pt; the 95% interval reaches 1.13 pt"
    )
    assert "cannot confirm the goal" in gate.message and "--gate-on ci gates" not in gate.message
    # a generous limit is confirmed by the same images
    wide = Gate.from_drop(1.2, drop, EXIT_GATE_FAILED, gate_on="ci")
    assert wide.passed and wide.confirmed
    assert (
        wide.message
        == "PASSED: the 95% interval of the INT8 top-1 drop reaches 1.13 pt ≤ 1.20 pt (drop 0.15 pt)"
    )


def test_confirmed_point_gate_says_nothing_more():
    drop = _drop(3, 2, 1300)
    gate = Gate.from_drop(1.0, drop, EXIT_GATE_FAILED)
    assert gate.confirmed and gate.message == "PASSED: INT8 top-1 drop 0.08 pt ≤ 1.00 pt"


def test_drop_above_the_gate_is_a_plain_failure():
    drop = _drop(30, 10, 1000)  # 2 pt: no number of images of this kind would bring the bound under 1 pt
    gate = Gate.from_drop(1.0, drop, EXIT_GATE_FAILED)
    assert not gate.passed and gate.images_needed is None
    assert gate.message == "FAILED: INT8 top-1 drop 2.00 pt > 1.00 pt (exit code 3)"
    ci = Gate.from_drop(1.0, drop, EXIT_GATE_FAILED, gate_on="ci")
    assert ci.message == (
        f"FAILED (--gate-on ci): INT8 top-1 drop 2.00 pt and the upper bound of its 95% interval "
        f"{drop.ci_high_pt:.2f} pt both exceed 1.00 pt (exit code 3)"
    )


def test_unknown_gate_on_is_an_input_error():
    with pytest.raises(RqInputError, match="--gate-on must be one of point, ci"):
        Gate(0.5, 0.1, EXIT_GATE_FAILED, gate_on="mean", ci_high_pt=0.2)


# ---------------------------------------------------------------------------------------------------------
# Label-free fidelity: known answers
# ---------------------------------------------------------------------------------------------------------


def test_compare_logits_by_hand():
    ref = np.array([[3.0, 0.0], [0.0, 3.0]])
    approx = np.array([[0.0, 3.0], [0.0, 3.0]])
    fid = compare_logits(ref, approx)
    assert (fid.images, fid.disagreements, fid.agreement_pct) == (2, 1, 50.0)
    # error energy 9 + 9 = signal energy 18: 0 dB
    assert fid.logits_sqnr_db == pytest.approx(0.0, abs=1e-9)
    # KL(softmax(3,0) ‖ softmax(0,3)) = (2σ(3) − 1)·3 for the first image, 0 for the second
    sigma = 1 / (1 + math.exp(-3))
    assert fid.softmax_kl == pytest.approx((2 * sigma - 1) * 3 / 2, rel=1e-9)


def test_identical_logits_are_fully_faithful():
    ref = np.random.default_rng(0).standard_normal((7, 10))
    fid = compare_logits(ref, ref.copy())
    assert fid.agreement_pct == 100.0 and fid.softmax_kl == 0.0 and fid.logits_sqnr_db > 200


def test_softmax_kl_is_shift_invariant_and_nonnegative():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    np.testing.assert_allclose(softmax_kl(a, b), softmax_kl(a + 7.0, b - 3.0), atol=1e-12)
    assert (softmax_kl(a, b) >= 0).all()


def test_probability_outputs_are_compared_as_log_probabilities():
    """A model that ends in a softmax: its KL is the KL of the logits it came from (a second softmax over
    probabilities would flatten it to almost 0), and the SQNR is over log-probabilities, said so."""
    rng = np.random.default_rng(2)
    logits = 4.0 * rng.standard_normal((6, 50))
    noisy = logits + 0.3 * rng.standard_normal((6, 50))

    def softmax(x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    from_logits = compare_logits(logits, noisy)
    from_probabilities = compare_logits(softmax(logits), softmax(noisy))
    assert from_logits.outputs == "logits" and from_probabilities.outputs == "probabilities"
    assert from_probabilities.softmax_kl == pytest.approx(from_logits.softmax_kl, rel=1e-6)
    assert from_probabilities.softmax_kl > 0.01
    assert from_probabilities.agreement_pct == from_logits.agreement_pct
    assert "log-probability SQNR" in from_probabilities.describe()
    assert from_probabilities.to_dict()["outputs"] == "probabilities"


def test_held_back_samples_exclude_what_calibration_read(tmp_path):
    colored_images(tmp_path / "calib", 20)
    dataset = discover_dataset(tmp_path / "calib")
    used = [s.path for s in select_samples(dataset, 12, 0)]
    held = held_back_samples(dataset, used, None)
    assert len(held) == 8 and not {s.path for s in held} & set(used)
    assert len(held_back_samples(dataset, used, 5)) == 5
    assert held_back_samples(dataset, used, 5) == held_back_samples(dataset, used, 5)  # seeded
    assert held_back_samples(dataset, [s.path for s in dataset.samples], None) == []


# ---------------------------------------------------------------------------------------------------------
# Through the CLI
# ---------------------------------------------------------------------------------------------------------


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def _report(report_dir: Path) -> dict:
    (run,) = [p for p in report_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return json.loads((run / "report.json").read_text())


def _predict(model: Path, paths: list[Path]) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = np.stack([load_image(p, SMALL_SPEC) for p in paths])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> dict:
    """The sensitive model, its INT8 version under BREAKING (one class for every image), and a validation
    folder where half the images carry FP32's class and half INT8's: both models are right on some images
    the other gets wrong, so the drop is near 0 while its interval is wide."""
    base = tmp_path_factory.mktemp("fidelity-gate")
    model = sensitive_model(base / "sensitive.onnx")
    center_fc_bias(model, colored_images(base / "staging", 36))
    labelled_by_fp32(model, base / "by-fp32", base / "staging")
    colored_images(base / "calib", 24, start=500)
    int8 = base / "int8.onnx"
    result = invoke(
        "quantize", model, "--calib", base / "calib", "--out", int8, "--report-dir", base / "r0", *BREAKING
    )
    assert result.exit_code == 0, all_output(result)
    paths = sorted((base / "by-fp32").rglob("*.png"))
    fp32_pred = _predict(model, paths).argmax(1)
    int8_pred = _predict(int8, paths).argmax(1)
    synsets = load_synsets()
    labels = []
    for i, (path, f, q) in enumerate(zip(paths, fp32_pred, int8_pred, strict=True)):
        label = int(f) if i % 2 == 0 else int(q)
        dest = base / "val" / synsets[label].wnid / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
        labels.append(label)
    labels = np.array(labels)
    drop = paired_drop(
        fp32_pred == labels, int8_pred == labels, disagreements=int((fp32_pred != int8_pred).sum())
    )
    assert drop.a_only > 0 and drop.b_only > 0, drop
    return {"model": model, "int8": int8, "calib": base / "calib", "val": base / "val", "drop": drop}


def _quantize(mixed, tmp_path, *extra):
    reports = tmp_path / "reports"
    result = invoke(
        "quantize",
        mixed["model"],
        "--calib",
        mixed["calib"],
        "--out",
        tmp_path / "int8.onnx",
        "--report-dir",
        reports,
        *extra,
        *BREAKING,
    )
    return result, reports


def test_val_run_reports_agreement_and_the_point_gate_says_it_cannot_confirm(mixed, tmp_path):
    expected = mixed["drop"]
    limit = round((max(expected.drop_pt, 0.0) + expected.ci_high_pt) / 2, 2)
    result, reports = _quantize(mixed, tmp_path, "--val", mixed["val"], "--max-drop", limit)
    text = " ".join(all_output(result).split())
    assert result.exit_code == 0, text
    assert f"top-1 agreement with FP32 {expected.agreement_pct:.2f}%" in text
    assert "cannot confirm the goal" in text and "--gate-on ci" in text
    data = _report(reports)
    int8 = data["variants"][1]
    assert int8["drop"]["agreement_pct"] == pytest.approx(expected.agreement_pct, abs=1e-3)
    assert (int8["drop"]["a_only"], int8["drop"]["b_only"]) == (expected.a_only, expected.b_only)
    assert data["gate"]["confirmed"] is False and data["gate"]["passed"] is True
    assert data["gate"]["ci_high_pt"] == pytest.approx(expected.ci_high_pt, abs=1e-3)
    md = (next(p for p in reports.iterdir() if p.is_dir()) / "report.md").read_text()
    assert "Agreement %" in md and "cannot confirm the goal" in " ".join(md.split())


def test_gate_on_ci_fails_with_exit_3_where_the_point_gate_passes(mixed, tmp_path):
    expected = mixed["drop"]
    limit = round((max(expected.drop_pt, 0.0) + expected.ci_high_pt) / 2, 2)
    result, reports = _quantize(
        mixed, tmp_path, "--val", mixed["val"], "--max-drop", limit, "--gate-on", "ci"
    )
    text = " ".join(all_output(result).split())
    assert result.exit_code == EXIT_GATE_FAILED, text
    assert "FAILED (--gate-on ci)" in text and "cannot confirm the goal" in text
    assert (tmp_path / "int8.onnx").is_file()  # the model is still written
    data = _report(reports)
    assert data["gate"]["gate_on"] == "ci" and data["gate"]["exit_code"] == EXIT_GATE_FAILED
    md = (next(p for p in reports.iterdir() if p.is_dir()) / "report.md").read_text()
    assert "FAILED: upper bound of the INT8 top-1 drop's interval" in md


def test_gate_on_ci_passes_above_the_upper_bound(mixed, tmp_path):
    limit = math.ceil(mixed["drop"].ci_high_pt + 1)
    result, _ = _quantize(mixed, tmp_path, "--val", mixed["val"], "--max-drop", limit, "--gate-on", "ci")
    assert result.exit_code == 0, all_output(result)
    assert "PASSED: the 95% interval" in " ".join(all_output(result).split())


def test_gate_on_bad_value_is_exit_2(mixed, tmp_path):
    result, reports = _quantize(
        mixed, tmp_path, "--val", mixed["val"], "--max-drop", "1", "--gate-on", "upper"
    )
    assert_one_line_error(result, "--gate-on must be one of point, ci")
    assert result.exit_code == EXIT_BAD_INPUT and not (tmp_path / "int8.onnx").exists()
    assert not reports.exists()


def test_without_val_fidelity_is_measured_on_held_back_calibration_images(mixed, tmp_path):
    """16 of the 24 calibration images calibrate (--samples 16); the other 8 are compared, with no labels."""
    result, reports = _quantize(mixed, tmp_path)
    text = " ".join(all_output(result).split())
    assert result.exit_code == 0, text
    assert "Fidelity to FP32 (label-free)" in text and "8 held-back calibration images" in text
    assert "│ runtime │ onnxruntime │" in text  # where the check ran, whatever --runtime says
    fid = _report(reports)["fidelity"]
    assert fid["images"] == 8
    # computed independently: the images calibration did not read, both models run here
    dataset = discover_dataset(mixed["calib"])
    used = {s.path for s in select_samples(dataset, 16, 0)}
    held = [s.path for s in dataset.samples if s.path not in used]
    ref = _predict(mixed["model"], held)
    approx = _predict(tmp_path / "int8.onnx", held)
    expected = compare_logits(ref, approx)
    assert fid["disagreements"] == expected.disagreements > 0  # INT8 predicts one class for everything
    assert fid["agreement_pct"] == pytest.approx(expected.agreement_pct, abs=1e-3)
    assert fid["logits_sqnr_db"] == pytest.approx(expected.logits_sqnr_db, abs=0.01)
    assert fid["softmax_kl"] == pytest.approx(expected.softmax_kl, rel=1e-3)
    md = (next(p for p in reports.iterdir() if p.is_dir()) / "report.md").read_text()
    assert "## Fidelity to FP32 (label-free)" in md
    assert "| Runtime | onnxruntime (--runtime applies to --val and --bench) |" in md
    # the Results table shows that agreement too (marked as measured on held-back calibration images)
    results = md.split("## Results", 1)[1].split("\n## ", 1)[0]
    int8_row = next(line for line in results.splitlines() if line.startswith("| ") and "INT8" in line)
    assert f"{fid['agreement_pct']:.2f} (held-back calib.)" in int8_row


def test_holdout_images_zero_skips_fidelity_and_limit_is_honoured(mixed, tmp_path):
    result, reports = _quantize(mixed, tmp_path, "--holdout-images", "0")
    assert result.exit_code == 0, all_output(result)
    assert _report(reports)["fidelity"] is None
    (tmp_path / "b").mkdir()
    result, reports = _quantize(mixed, tmp_path / "b", "--holdout-images", "3")
    assert result.exit_code == 0, all_output(result)
    assert _report(reports)["fidelity"]["images"] == 3


# ---------------------------------------------------------------------------------------------------------
# rq eval with several models: each compared with the first
# ---------------------------------------------------------------------------------------------------------


def test_eval_of_two_models_reports_agreement_with_the_first(tmp_path):
    from tests.helpers.calib_images import make_class_folders
    from tests.helpers.onehot import onehot_model, onehot_row, wnid

    val = tmp_path / "val"
    make_class_folders(val, {wnid(3): 6, wnid(7): 2}, size=(40, 36))
    first = onehot_model(tmp_path / "k.onnx", onehot_row(1000, [3]))
    same = onehot_model(tmp_path / "k2.onnx", onehot_row(1000, [3, 7]))
    other = onehot_model(tmp_path / "j.onnx", onehot_row(1000, [7]))
    args = ["eval", first, same, other, "--data", val, "--resize", "36", "--crop", "32"]
    result = invoke(*args, "--json")
    assert result.exit_code == 0, all_output(result)
    models = json.loads(result.stdout)["models"]
    assert models[0]["vs_first"] is None
    assert models[1]["vs_first"]["agreement_pct"] == 100.0 and models[1]["vs_first"]["disagreements"] == 0
    vs = models[2]["vs_first"]
    assert (vs["agreement_pct"], vs["disagreements"], vs["a_only"], vs["b_only"]) == (0.0, 8, 6, 2)
    assert vs["drop_pt"] == 50.0
    text = all_output(invoke(*args))
    assert "agreement with first %" in text
    row = next(line for line in text.splitlines() if "j.onnx" in line)
    assert "0.00 (8 differ)" in row and "50.00 [" in row
