"""Accuracy-aware tuning (`quantize.tune`, through `quantize.pipeline.quantize_model`) on a model with one
deliberately sensitive node.

The model (one node whose INT8 version flips predictions) and its FP32-labelled images are built in
tests/helpers/sensitive.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from calibration import Sample
from calibration.errors import RqInputError
from quantize.cli import app
from quantize.measure.validate import validation_samples
from quantize.pipeline import quantize_model, read_model_metadata
from quantize.recipe import METADATA_KEY
from quantize.tune import TuneRequest, split_for_tuning
from tests.helpers.cli import ENV, all_output
from tests.helpers.cpu import x86_cpu
from tests.helpers.sensitive import (
    PER_TENSOR,
    center_fc_bias,
    colored_images,
    fp32_logits,
    labelled_by_fp32,
    sensitive_model,
    tune_split,
)
from tests.helpers.tiny_models import SMALL_SPEC


def test_sensitive_node_is_found_and_falls_back_alone(sensitive, sensitive_val, tune_calib, tmp_path):
    tune, _confirm = tune_split(sensitive_val)
    out = tmp_path / "tuned-int8.onnx"
    result = quantize_model(
        sensitive,
        tune_calib,
        output=out,
        recipe=PER_TENSOR,
        spec=SMALL_SPEC,
        cpu=x86_cpu("avx2"),
        workers=2,
        tune=TuneRequest(max_drop_pt=0.0, tune_samples=tuple(tune), bench_runs=1),
    )
    t = result.tuning
    assert t is not None and t.backend == "ort"
    assert t.fp32_top1 == 100.0 and t.tune_images == len(tune)
    # step 0 (everything quantized) breaks the model: every prediction collapses onto one class
    assert t.steps[0].fallback == [] and t.steps[0].drop_pt > 0
    ranked = [node for node, _ in t.sensitivity]
    assert sorted(ranked) == ["conv_a", "conv_c", "conv_sensitive", "fc"]
    assert ranked[0] == "conv_sensitive"
    sqnr = dict(t.sensitivity)
    assert all(sqnr["conv_sensitive"] < sqnr[n] - 10 for n in ("conv_a", "conv_c", "fc")), t.sensitivity
    assert t.fallback_nodes == ["conv_sensitive"]
    assert t.goal_met is True and t.chosen == 1 and len(t.steps) == 2
    assert t.steps[1].added == "conv_sensitive" and t.steps[1].drop_pt <= 0.0
    # the published model is the chosen step
    assert out.is_file() and result.output == out
    assert result.recipe.exclude_nodes == ("conv_sensitive",)
    stored = json.loads(read_model_metadata(out)[METADATA_KEY])
    assert stored["exclude_nodes"] == ["conv_sensitive"]
    assert stored["per_channel"] is False and stored["calibration"] == "minmax"
    ops = result.quantized_ops
    assert (ops.quantized, ops.candidates) == (3, 4)
    assert ops.by_type == {"Conv": [2, 3], "Gemm": [1, 1]}
    assert ops.fp32 == {"conv_sensitive": ["Conv", "fell back in tuning"]}
    # every step was benchmarked against FP32 (batch 1); no speed figure is asserted
    assert all(s.speed_ratio and set(s.speed_ratio) == {"1"} for s in t.steps)
    data = t.to_dict()
    assert data["fallback_nodes"] == ["conv_sensitive"] and data["sensitivity"][0]["node"] == "conv_sensitive"


def test_tuned_model_keeps_fp32_predictions_on_held_out_images(
    sensitive, sensitive_val, tune_calib, tmp_path
):
    """The confirmation images (never seen by the tuner) agree with FP32 once conv_sensitive is FP32."""
    tune, confirm = tune_split(sensitive_val)
    out = tmp_path / "tuned-int8.onnx"
    quantize_model(
        sensitive,
        tune_calib,
        output=out,
        recipe=PER_TENSOR,
        spec=SMALL_SPEC,
        cpu=x86_cpu("avx2"),
        workers=2,
        tune=TuneRequest(max_drop_pt=0.0, tune_samples=tuple(tune), bench_runs=0),
    )
    paths = [s.path for s in confirm]
    labels = np.array([s.label for s in confirm])
    assert (fp32_logits(out, paths).argmax(axis=1) == labels).all()


def test_goal_not_reachable_keeps_the_best_step(tmp_path, tune_calib):
    """Two sensitive nodes, one trial: falling back one of them cannot meet the goal; a model is still
    written, the goal is reported NOT met, and a note names the step kept."""
    model = sensitive_model(tmp_path / "two.onnx", n_sensitive=2, seed=0)
    center_fc_bias(model, colored_images(tmp_path / "staging", 36))
    counts = labelled_by_fp32(model, tmp_path / "val", tmp_path / "staging")
    assert len(counts) >= 2, counts
    tune, _confirm = tune_split(tmp_path / "val")
    out = tmp_path / "two-int8.onnx"
    result = quantize_model(
        model,
        tune_calib,
        output=out,
        recipe=PER_TENSOR,
        spec=SMALL_SPEC,
        cpu=x86_cpu("avx2"),
        workers=2,
        tune=TuneRequest(max_drop_pt=0.0, tune_samples=tuple(tune), max_trials=1, bench_runs=0),
    )
    t = result.tuning
    assert out.is_file()
    assert t.goal_met is False
    assert len(t.steps) == 2  # step 0 and the one trial allowed
    assert t.steps[1].added in ("conv_sensitive1", "conv_sensitive2")
    assert all(s.drop_pt > 0 for s in t.steps)
    # no step meets the goal: the most faithful one (top-1 agreement with FP32, then softmax KL) is kept
    best = max(t.steps, key=lambda s: (s.agreement_pct, -s.softmax_kl, -len(s.fallback)))
    assert t.chosen == best.step
    assert len(t.notes) == 1 and f"kept the most faithful: step {best.step}" in t.notes[0]
    stored = json.loads(read_model_metadata(out)[METADATA_KEY])
    assert stored["exclude_nodes"] == list(best.fallback)


def _samples(n: int) -> list[Sample]:
    return [Sample(Path(f"/val/img_{i:03d}.JPEG"), i % 7) for i in range(n)]


def test_split_for_tuning_is_deterministic_and_disjoint():
    samples = _samples(41)
    tune, confirm = split_for_tuning(samples, 0.5)
    assert (tune, confirm) == split_for_tuning(samples, 0.5, seed=0)
    assert not {s.path for s in tune} & {s.path for s in confirm}
    assert sorted(tune + confirm, key=lambda s: s.path) == samples
    assert len(tune) == round(41 * 0.5)
    assert tune == sorted(tune, key=lambda s: s.path)
    other_tune, _ = split_for_tuning(samples, 0.5, seed=1)
    assert other_tune != tune  # the seed matters
    small_tune, small_confirm = split_for_tuning(samples, 0.1)
    assert len(small_tune) == 4 and len(small_confirm) == 37


def test_split_for_tuning_keeps_one_image_on_each_side():
    tune, confirm = split_for_tuning(_samples(2), 0.01)
    assert len(tune) == len(confirm) == 1
    tune, confirm = split_for_tuning(_samples(3), 0.99)
    assert len(tune) == 2 and len(confirm) == 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 1.5])
def test_split_for_tuning_fraction_must_be_inside_0_1(fraction):
    with pytest.raises(RqInputError, match="--tune-fraction"):
        split_for_tuning(_samples(10), fraction)


def test_split_for_tuning_needs_two_images():
    with pytest.raises(RqInputError, match="at least 2"):
        split_for_tuning(_samples(1), 0.5)


def test_cli_tune_falls_back_the_sensitive_node_and_gates_on_held_out_images(
    sensitive, sensitive_val, tune_calib, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "tuned-int8.onnx"
    reports = tmp_path / "reports"
    args = [
        sensitive,
        "--calib",
        tune_calib,
        "--val",
        sensitive_val,
        "--max-drop",
        "0",
        "--tune",
        "--out",
        out,
    ]
    args += ["--report-dir", reports, "--per-tensor", "--calibration", "minmax", "--reduce-range"]
    args += ["--samples", "16", "--workers", "2", "--resize", "36", "--crop", "32", "--json"]
    args += ["--op-types", "Conv,Gemm,MatMul"]  # as PER_TENSOR: see there
    result = CliRunner().invoke(app, ["quantize", *[str(a) for a in args]], env=ENV)
    assert result.exit_code == 0, all_output(result)
    data = json.loads(result.stdout)
    tuning = data["tuning"]
    assert tuning["fallback_nodes"] == ["conv_sensitive"] and tuning["goal_met"] is True
    assert tuning["sensitivity"][0]["node"] == "conv_sensitive"
    _dataset, samples = validation_samples(sensitive_val, None, None)
    tune, confirm = split_for_tuning(samples, 0.5)
    # tuned on one half, validated and gated on the other
    assert tuning["tune_images"] == len(tune)
    assert data["validation"]["images"] == len(confirm)
    assert data["gate"]["passed"] is True and data["variants"][1]["drop"]["drop_pt"] == 0.0
    assert data["variants"][1]["recipe"]["exclude_nodes"] == ["conv_sensitive"]
    assert any("tuning" in note for note in data["notes"])
    (run,) = [p for p in reports.iterdir() if p.is_dir()]
    assert "## Tuning" in (run / "report.md").read_text()
    assert json.loads(read_model_metadata(out)[METADATA_KEY])["exclude_nodes"] == ["conv_sensitive"]


def test_cli_eval_batch_reaches_the_tuning_passes(
    sensitive, sensitive_val, tune_calib, tmp_path, monkeypatch
):
    """`--eval-batch` is the batch size of tuning's validation passes too, not only of the confirmation."""
    import quantize.tune as tune_module

    batches: list[int] = []
    real_pool = tune_module.run_pool

    def recording_pool(path, samples, spec, batch, workers, ray=None):
        batches.append(batch)
        return real_pool(path, samples, spec, batch, workers, ray)

    monkeypatch.setattr(tune_module, "run_pool", recording_pool)
    monkeypatch.chdir(tmp_path)
    args = [sensitive, "--calib", tune_calib, "--val", sensitive_val, "--max-drop", "0", "--tune"]
    args += ["--out", tmp_path / "int8.onnx", "--report-dir", tmp_path / "reports", "--per-tensor"]
    args += ["--calibration", "minmax", "--reduce-range", "--samples", "16", "--workers", "2"]
    args += ["--resize", "36", "--crop", "32", "--op-types", "Conv,Gemm,MatMul", "--eval-batch", "3"]
    result = CliRunner().invoke(app, ["quantize", *[str(a) for a in args]], env=ENV)
    assert result.exit_code == 0, all_output(result)
    assert len(batches) >= 2 and set(batches) == {3}
