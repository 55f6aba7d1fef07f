"""The one progress protocol (calibration/progress.py) and library logging: what each long step reports."""

from __future__ import annotations

import logging
from pathlib import Path

from calibration import BatchStream, PreprocessSpec, Sample
from calibration.progress import NO_PROGRESS, Progress, ProgressCallbacks
from quantize.calibrate import calibrate
from quantize.graph.prepare import prepare_model
from quantize.measure.bench import bench_models
from quantize.measure.evaluate import evaluate
from quantize.recipe import QuantRecipe
from tests.helpers.calib_images import write_rgb, write_truncated_jpeg
from tests.helpers.onehot import onehot_model, onehot_row, wnid
from tests.helpers.tiny_models import SMALL_SPEC, random_inputs, tiny_cnn


class Recorder:
    """A Progress that records every call."""

    def __init__(self):
        self.events: list[tuple[str, object]] = []

    def stage(self, name: str) -> None:
        self.events.append(("stage", name))

    def total(self, n: int) -> None:
        self.events.append(("total", n))

    def advance(self, n: int = 1) -> None:
        self.events.append(("advance", n))

    def note(self, text: str) -> None:
        self.events.append(("note", text))

    def of(self, kind: str) -> list:
        return [value for k, value in self.events if k == kind]


def test_the_default_and_the_callback_form_are_progress():
    assert isinstance(NO_PROGRESS, Progress) and isinstance(Recorder(), Progress)
    NO_PROGRESS.stage("x"), NO_PROGRESS.total(3), NO_PROGRESS.advance(), NO_PROGRESS.note("y")
    seen: list = []
    callbacks = ProgressCallbacks(on_stage=seen.append, on_advance=seen.append)
    assert isinstance(callbacks, Progress)
    callbacks.stage("calibrate"), callbacks.total(5), callbacks.advance(2), callbacks.note("ignored")
    assert seen == ["calibrate", 2]


def test_batch_stream_reports_the_total_then_every_sample_skipped_ones_included(tmp_path):
    samples = [Sample(write_rgb(tmp_path / f"{i}.png", size=(20, 18), seed=i), 0) for i in range(5)]
    samples.insert(2, Sample(write_truncated_jpeg(tmp_path / "bad.JPEG"), 0))
    recorder = Recorder()
    stream = BatchStream(
        samples, PreprocessSpec(resize=16, crop=16), batch_size=4, workers=2, progress=recorder
    )
    assert sum(len(b) for b in stream) == 5
    assert recorder.events == [("total", 6), ("advance", 4), ("advance", 2)]
    list(stream)  # a second pass reports again
    assert recorder.of("total") == [6, 6] and sum(recorder.of("advance")) == 12


def test_evaluate_reports_images(tmp_path):
    model = onehot_model(tmp_path / "k.onnx", onehot_row(1000, [3]))
    samples = [Sample(write_rgb(tmp_path / wnid(3) / f"{i}.png", size=(40, 36), seed=i), 3) for i in range(7)]
    recorder = Recorder()
    run = evaluate([model], samples, SMALL_SPEC, batch_size=3, workers=1, progress=recorder)
    assert run.images == 7 and recorder.of("total") == [7] and recorder.of("advance") == [3, 3, 1]


def test_bench_reports_a_stage_per_batch_size_and_every_round(tmp_path):
    model = tiny_cnn(tmp_path / "tiny.onnx")
    recorder = Recorder()
    bench_models([model], batch_sizes=(1, 2), runs=3, warmup=1, progress=recorder)
    assert recorder.of("stage") == ["bench batch 1", "bench batch 2"]
    assert recorder.of("total") == [3, 3] and recorder.of("advance") == [1] * 6
    assert recorder.of("note")[0] == "loading tiny.onnx in onnxruntime"


def test_library_code_logs_instead_of_printing(tmp_path, caplog, capsys):
    """Diagnostics go to the module's logger (the CLI decides what shows); nothing reaches stdout/stderr."""
    model = tiny_cnn(tmp_path / "tiny.onnx", opset=11)
    with caplog.at_level(logging.DEBUG):
        prepared = prepare_model(model, tmp_path)
        batches = [random_inputs(4, seed=i) for i in range(2)]
        recorder = Recorder()
        calibrate(
            prepared.path,
            "input",
            iter(batches),
            QuantRecipe(calibration="minmax"),
            tmp_path,
            progress=recorder,
        )
    assert recorder.of("advance") == [4, 4]
    by_logger = {(r.name, r.levelno) for r in caplog.records}
    assert ("quantize.graph.prepare", logging.DEBUG) in by_logger
    assert any(
        r.name == "quantize.calibrate" and "on 8 images in 2 batches" in r.getMessage()
        for r in caplog.records
    )
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_nothing_is_logged_or_printed_by_default(tmp_path, capsys):
    """No logging configuration (a script's default): rq's debug diagnostics stay silent."""
    assert logging.getLogger("quantize").getEffectiveLevel() > logging.DEBUG
    model = Path(tiny_cnn(tmp_path / "tiny.onnx"))
    calibrate(model, "input", iter([random_inputs(2)]), QuantRecipe(calibration="minmax"), tmp_path)
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_validate_and_fidelity_report_images(tmp_path):
    from calibration import discover_dataset
    from quantize.measure.fidelity import measure_fidelity
    from quantize.measure.validate import validate

    model = onehot_model(tmp_path / "k.onnx", onehot_row(1000, [3]))
    samples = [Sample(write_rgb(tmp_path / wnid(3) / f"{i}.png", size=(40, 36), seed=i), 3) for i in range(5)]
    recorder = Recorder()
    validate(model, model, discover_dataset(tmp_path), samples, SMALL_SPEC, batch_size=2, progress=recorder)
    assert recorder.events == [("total", 5), ("advance", 2), ("advance", 2), ("advance", 1)]
    recorder = Recorder()
    measure_fidelity(model, model, samples, SMALL_SPEC, source="test", batch_size=4, progress=recorder)
    assert recorder.events == [("total", 5), ("advance", 4), ("advance", 1)]
