"""Tuning that does not overfit (issue 7, part 6): the tuner's pool is the tuning images plus held-back
calibration images, the sensitivity ranking is one pass, and the confirmation images are never used to choose.

The confirmation split is checked two ways: every image decoded while the tuner runs is recorded (the
confirmation images must not be among them), and a run whose confirmation images are replaced by garbage
must tune exactly as the clean run does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

import quantize.pipeline as pipeline_module
import quantize.tune as tune_module
from calibration import preprocess
from quantize.cli import app
from quantize.measure.validate import validation_samples
from quantize.pipeline import quantize_model
from quantize.tune import TuneRequest, split_for_tuning
from tests.helpers.cli import ENV, all_output
from tests.helpers.cpu import x86_cpu
from tests.helpers.sensitive import (
    PER_TENSOR,
    center_fc_bias,
    colored_images,
    labelled_by_fp32,
    sensitive_model,
)
from tests.helpers.tiny_models import SMALL_SPEC

TUNE_ARGS = ["--max-drop", "0", "--tune", "--per-tensor", "--calibration", "minmax", "--reduce-range"]
TUNE_ARGS += ["--samples", "16", "--workers", "2", "--resize", "36", "--crop", "32", "--json"]
# Pinned to the compute nodes, as test_tune.PER_TENSOR: only conv_sensitive can flip a prediction then.
TUNE_ARGS += ["--op-types", "Conv,Gemm,MatMul"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("tune-fidelity")
    model = sensitive_model(base / "sensitive.onnx")
    center_fc_bias(model, colored_images(base / "staging", 36))
    counts = labelled_by_fp32(model, base / "val", base / "staging")
    assert len(counts) >= 2, counts
    # Calibration images the FP32 model classifies with a clear margin (like the validation images), so that
    # only conv_sensitive can flip them: 16 calibrate, the rest are held back and join the tuner's pool.
    calib = base / "calib"
    colored_images(base / "calib-staging", 40, start=500)
    labelled_by_fp32(model, calib, base / "calib-staging")
    held = len(list(calib.rglob("*.png"))) - 16
    assert held >= 4, held
    _dataset, samples = validation_samples(base / "val", None, None)
    tune, confirm = split_for_tuning(samples, 0.5)
    return {
        "base": base,
        "model": model,
        "calib": calib,
        "val": base / "val",
        "tune": tune,
        "confirm": confirm,
        "held": held,
    }


class Recorder:
    """Records every image decoded while `quantize.pipeline.tune_fallback` runs, except while it rebuilds a
    candidate model: quantizing reads the calibration images (bias correction's statistics), which are
    calibration's, the same for every candidate, and never a basis for choosing."""

    def __init__(self, monkeypatch):
        self.active = False
        self.paths: set[Path] = set()
        self.calibration_reads: set[Path] = set()
        real_load, real_tune = preprocess.load_image, pipeline_module.tune_fallback
        real_quantize = pipeline_module.quantize_prepared

        def load_image(path, spec):
            if self.active:
                self.paths.add(Path(path).resolve())
            else:
                self.calibration_reads.add(Path(path).resolve())
            return real_load(path, spec)

        def quantize_prepared(prepared, calibration, *args, **kwargs):
            was, self.active = self.active, False
            try:
                return real_quantize(prepared, calibration, *args, **kwargs)
            finally:
                self.active = was

        def tune_fallback(**kwargs):
            self.active = True
            try:
                return real_tune(**kwargs)
            finally:
                self.active = False

        monkeypatch.setattr(preprocess, "load_image", load_image)
        monkeypatch.setattr(pipeline_module, "tune_fallback", tune_fallback)
        monkeypatch.setattr(pipeline_module, "quantize_prepared", quantize_prepared)


def _cli(setup, val: Path, tmp_path: Path) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    args = ["quantize", setup["model"], "--calib", setup["calib"], "--val", val, "--out", tmp_path / "t.onnx"]
    args += ["--report-dir", tmp_path / "reports", *TUNE_ARGS]
    result = CliRunner().invoke(app, [str(a) for a in args], env=ENV)
    assert result.exit_code in (0, 3), all_output(result)
    return json.loads(result.stdout)


def test_confirmation_images_are_never_read_while_tuning(setup, tmp_path, monkeypatch):
    recorder = Recorder(monkeypatch)
    data = _cli(setup, setup["val"], tmp_path)
    assert data["tuning"]["fallback_nodes"] == ["conv_sensitive"]
    confirm = {s.path.resolve() for s in setup["confirm"]}
    tune = {s.path.resolve() for s in setup["tune"]}
    assert recorder.paths, "the recorder saw nothing: the instrumentation is broken"
    assert not recorder.paths & confirm  # not one confirmation image was decoded by the tuner
    assert tune <= recorder.paths  # every tuning image was
    calib_read = {p.resolve() for p in setup["calib"].rglob("*.png")} & recorder.paths
    assert (
        len(calib_read) == 16 + setup["held"]
    )  # the calibration images (sensitivity) and the held-back ones
    # and the confirmation images are exactly what the validation (and the gate) measured
    assert data["validation"]["images"] == len(confirm)


def test_poisoned_confirmation_images_do_not_change_the_tuning(setup, tmp_path):
    """Replace every confirmation image by noise of another colour: the tuning report must not move."""
    clean = _cli(setup, setup["val"], tmp_path / "clean")
    poisoned_val = tmp_path / "poisoned-val"
    shutil.copytree(setup["val"], poisoned_val)
    rng = np.random.default_rng(7)
    for sample in setup["confirm"]:
        target = poisoned_val / sample.path.relative_to(setup["val"])
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(target)
    poisoned = _cli(setup, poisoned_val, tmp_path / "poisoned")

    def choice(data):
        t = dict(data["tuning"])
        t.pop("seconds")
        for step in t["steps"]:
            step.pop("seconds")
            step.pop("speed_ratio_to_fp32")
        return t

    assert choice(poisoned) == choice(clean)
    # the poison did reach the confirmation: the validation figures differ
    assert poisoned["variants"][1]["drop"] != clean["variants"][1]["drop"] or (
        poisoned["variants"][0]["accuracy"] != clean["variants"][0]["accuracy"]
    )


def test_pool_is_tuning_plus_held_back_calibration_images_and_ranking_is_one_pass(
    setup, tmp_path, monkeypatch
):
    sessions = []
    real_session = tune_module._session
    monkeypatch.setattr(
        tune_module,
        "_session",
        lambda b: sessions.append(len(onnx.load_from_string(b).graph.node)) or real_session(b),
    )
    quantizations = []
    real_quantize = pipeline_module.quantize_prepared

    def counting(*args, **kwargs):
        quantizations.append(args[2].exclude_nodes)
        return real_quantize(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "quantize_prepared", counting)
    result = quantize_model(
        setup["model"],
        setup["calib"],
        output=tmp_path / "int8.onnx",
        recipe=PER_TENSOR,
        spec=SMALL_SPEC,
        cpu=x86_cpu("avx2"),
        workers=2,
        tune=TuneRequest(max_drop_pt=0.0, tune_samples=tuple(setup["tune"]), bench_runs=0),
    )
    t = result.tuning
    assert t.tune_images == len(setup["tune"])
    assert t.holdout_images == setup["held"] and t.pool_images == len(setup["tune"]) + setup["held"]
    # the whole INT8 and FP32 models ran in ONE session each for the ranking; besides them, one FP32 model per
    # candidate (the node and its activation: at most 2 nodes), never the whole FP32 model per node
    assert len(sessions) == 2 + 4 and sorted(sessions)[-2] > 2 and sorted(sessions)[-3] <= 2
    # the model was quantized once per step, plus the final publish: no per-node re-quantization
    assert len(quantizations) == len(t.steps) + 1
    assert t.sensitivity[0][0] == "conv_sensitive"
    scores = dict(t.sensitivity)
    assert all(scores["conv_sensitive"] < scores[n] - 10 for n in ("conv_a", "conv_c", "fc")), t.sensitivity
    # fidelity figures on the pool, step by step: falling the sensitive node back restores agreement
    assert t.steps[0].agreement_pct < 80 and t.steps[-1].agreement_pct == 100.0
    assert t.steps[-1].predicted_drop_pt == 0.0 and t.goal_met


def test_holdout_images_zero_tunes_on_the_tuning_images_alone(setup, tmp_path):
    result = quantize_model(
        setup["model"],
        setup["calib"],
        output=tmp_path / "int8.onnx",
        recipe=PER_TENSOR,
        spec=SMALL_SPEC,
        cpu=x86_cpu("avx2"),
        workers=2,
        tune=TuneRequest(max_drop_pt=0.0, tune_samples=tuple(setup["tune"]), bench_runs=0, holdout_images=0),
    )
    assert result.tuning.holdout_images == 0 and result.tuning.pool_images == len(setup["tune"])


def test_confirmation_images_stay_out_when_calib_and_val_share_images(setup, tmp_path, monkeypatch):
    """--calib pointing at the --val folder: calibration reads some of its images, but the tuner (pool and
    sensitivity ranking) must still read none of the confirmation images."""
    recorder = Recorder(monkeypatch)
    args = [
        "quantize",
        setup["model"],
        "--calib",
        setup["val"],
        "--val",
        setup["val"],
        "--out",
        tmp_path / "t.onnx",
    ]
    args += ["--report-dir", tmp_path / "reports", *TUNE_ARGS]
    args[args.index("--samples") + 1] = "6"
    result = CliRunner().invoke(app, [str(a) for a in args], env=ENV)
    assert result.exit_code in (0, 3), all_output(result)
    confirm = {s.path.resolve() for s in setup["confirm"]}
    assert recorder.paths and not recorder.paths & confirm
    data = json.loads(result.stdout)
    # the pool holds the tuning images only: every other image of the folder is a confirmation image
    assert data["tuning"]["holdout_calibration_images"] == 0
