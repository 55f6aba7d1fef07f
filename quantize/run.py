"""`run`: the one verb behind `rq quantize`, for scripts and tests too.

prepare → calibrate → (tune) → quantize (`quantize.pipeline.quantize_model`) → validate on `val` in every
runtime asked for (or, without `val`, fidelity to FP32 on held-back calibration images) → gate → bench →
report (`quantize.report.data.quantize_report`, written under `report_dir/<run-id>/`).

    from quantize.run import RunRequest, run
    result = run(RunRequest(model=Path("m.onnx"), calib=Path("calib"), val=Path("val"), max_drop=1.0))
    result.gate.passed, result.report_paths["json"]

Errors are those of the stages: `RqInputError` (bad input, nothing written), `QuantizerError`,
`RqEnvironmentError`, and `ReportFailed` when the model was published but its report could not be written
(exit codes in quantize/exits.py). A failed gate is not an exception: `result.exit_code` is 3 then.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from calibration import PreprocessSpec
from calibration.errors import RqEnvironmentError, RqInputError
from calibration.progress import NO_PROGRESS, Progress
from quantize.exits import EXIT_GATE_FAILED, EXIT_OK, ReportFailed, one_line
from quantize.files import ensure_writable_dir
from quantize.measure.bench import BenchResult
from quantize.measure.cpu import CpuInfo
from quantize.measure.fidelity import Fidelity
from quantize.measure.validate import GATE_ON, Gate, Validation
from quantize.pipeline import QuantizeResult, quantize_model
from quantize.recipe import QuantRecipe

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunRequest:
    """Everything one run needs; the defaults are `rq quantize`'s."""

    model: Path | None  # None only until the caller resolved it (the CLI fetches a named model first)
    calib: Path
    output: Path | None = None  # default: <model stem without -<opset>>-int8.onnx in the current folder
    recipe: QuantRecipe = field(default_factory=QuantRecipe)
    spec: PreprocessSpec = field(default_factory=PreprocessSpec)
    labels: Path | None = None  # labels file of a flat calibration folder
    workers: int | None = None  # image decoding threads
    val: Path | None = None  # labelled images: validate FP32 and INT8 on them
    val_labels: Path | None = None
    val_limit: int | None = None
    max_drop: float | None = None  # the gate, in top-1 points (needs val)
    gate_on: str = "point"  # point | ci
    holdout_images: int | None = None  # None: 500 without val, all with tune; 0: none
    tune: bool = False
    max_trials: int = 12
    tune_fraction: float = 0.5
    eval_batch: int = 32
    bench_batches: Sequence[int] = ()  # empty: no benchmark
    bench_runs: int = 20
    runtimes: Sequence[str] = ("ort",)  # quantize.measure.runtimes names; the first is the gate's reference
    report_dir: Path | None = Path("reports")  # None: assemble the report, write nothing
    command: Sequence[str] | None = None  # for the report; default `rq <this process's arguments>`
    cpu: CpuInfo | None = None  # default: detected

    def check(self, *, ray: bool = False) -> None:
        """Every check that needs no file: run before any work (the CLI calls it before fetching a model)."""
        from quantize.measure import runtimes

        for value, option in ((self.max_drop, "--max-drop"), (self.tune_fraction, "--tune-fraction")):
            if value is not None and not math.isfinite(value):
                raise RqInputError(f"{option} must be a finite number, got {value}")
        if self.workers is not None and self.workers < 1:
            raise RqInputError(f"--workers must be ≥ 1, got {self.workers}")
        if self.max_drop is not None and self.val is None:
            raise RqInputError("--max-drop needs --val (the images to measure the drop on)")
        if self.max_drop is not None and self.max_drop < 0:
            raise RqInputError("--max-drop must be ≥ 0")
        if self.gate_on == "ci" and self.max_drop == 0:
            # Any interval of a drop measured on finitely many images reaches above 0: the gate could never pass.
            raise RqInputError(
                "--gate-on ci needs --max-drop above 0: the drop's interval always reaches above 0"
            )
        if self.gate_on not in GATE_ON:
            raise RqInputError(f"--gate-on must be one of {', '.join(GATE_ON)}, not {self.gate_on!r}")
        if self.holdout_images is not None and self.holdout_images < 0:
            raise RqInputError("--holdout-images must be ≥ 0")
        if self.tune and (self.val is None or self.max_drop is None):
            raise RqInputError("--tune needs --val (images to measure on) and --max-drop (the goal)")
        if self.max_trials < 1:
            raise RqInputError("--max-trials must be ≥ 1")
        if self.eval_batch < 1:
            raise RqInputError("--eval-batch must be ≥ 1")
        if any(b < 1 for b in self.bench_batches):
            raise RqInputError("--bench-batch must be ≥ 1")
        if self.bench_batches and self.bench_runs < 1:
            raise RqInputError("--bench-runs must be ≥ 1")
        chosen = runtimes.parse(list(self.runtimes))
        if chosen != ["ort"] and self.val is None and not self.bench_batches:
            # The label-free fidelity check runs in ONNX Runtime: without --val or --bench, --runtime would
            # change nothing, and the run would look as if it had been checked where the user deploys.
            raise RqInputError(
                "--runtime chooses where --val and --bench run; add one of them (or drop --runtime)"
            )
        if ray and chosen != ["ort"]:
            raise RqInputError("--ray runs models in onnxruntime only; drop --runtime or --ray")
        if ray and self.val is None:
            raise RqInputError("--ray runs the validation on a Ray cluster: it needs --val")


@dataclass
class RunResult:
    """What a run produced: the published model, the measurements, the gate and the report."""

    quantized: QuantizeResult  # the INT8 model: output path, recipe, calibration, ops, tuning, seconds
    validations: dict[str, Validation]  # per runtime, in the order asked for (empty without val)
    fidelity: Fidelity | None  # held-back calibration images (only without val)
    gate: Gate | None  # only with max_drop
    bench: BenchResult | None
    report: dict  # report.json's content (quantize.report.data.quantize_report)
    report_paths: dict[str, Path] | None  # json / md / html; None when report_dir was None

    @property
    def output(self) -> Path:
        return self.quantized.output

    @property
    def validation(self) -> Validation | None:
        """The first runtime's validation (the report's unsuffixed FP32/INT8 pair)."""
        return next(iter(self.validations.values()), None)

    @property
    def exit_code(self) -> int:
        return EXIT_GATE_FAILED if self.gate is not None and not self.gate.passed else EXIT_OK


def run(
    request: RunRequest,
    *,
    progress: Progress | None = None,
    ray=None,
) -> RunResult:
    """Run every stage of `request` (see the module docstring). `ray`: a connected
    `quantize.distributed.RayRunner`; the validation (and tuning) passes then run on that cluster."""
    from quantize.measure.validate import validation_samples
    from quantize.tune import TuneRequest, split_for_tuning

    request.check(ray=ray is not None)
    if request.model is None:
        raise RqInputError("no model given")
    progress = progress or NO_PROGRESS
    model = Path(request.model)
    val_dataset = val_samples = tune_request = None
    if request.val is not None:
        # The FP32 model must be one rq can evaluate (ImageNet classes) before any INT8 file is written.
        _check_evaluable(model)
        val_dataset, val_samples = validation_samples(request.val, request.val_labels, request.val_limit)
        if request.tune:
            # Tune on one part of the images, confirm (and gate) on the other: the drop reported is not the
            # one the tuner optimized.
            tune_samples, val_samples = split_for_tuning(val_samples, request.tune_fraction)
            holdout = request.holdout_images
            tune_request = TuneRequest(
                request.max_drop,
                tuple(tune_samples),
                max_trials=request.max_trials,
                holdout_images=holdout if holdout is not None else 1_000_000,
                never_use=tuple(s.path for s in val_samples),
                ray=ray,
                eval_batch=request.eval_batch,
            )
    if request.report_dir is not None:
        ensure_writable_dir(request.report_dir)
    if request.val is not None or request.bench_batches:
        _check_runtimes_open(model, request.runtimes)
    result = quantize_model(
        model,
        request.calib,
        output=request.output,
        recipe=request.recipe,
        spec=request.spec,
        labels=request.labels,
        cpu=request.cpu,
        workers=request.workers,
        progress=progress,
        tune=tune_request,
    )
    runtimes = list(request.runtimes)
    validations: dict[str, Validation] = {}
    gate = fidelity = bench = None
    if val_dataset is not None:
        validations = _validate(request, model, result, val_dataset, val_samples, runtimes, progress, ray)
        gate = _gate(request, result, validations, runtimes)
    elif request.holdout_images != 0:
        fidelity = _holdout_fidelity(request, model, result, progress)
    if request.bench_batches:
        from quantize.measure.bench import bench_models

        progress.stage("bench (FP32 and INT8 interleaved)")
        started = time.perf_counter()
        bench = bench_models(
            [model, result.output],
            batch_sizes=list(request.bench_batches),
            runs=request.bench_runs,
            runtimes=runtimes,
            image_shape=request.spec.input_shape(1)[1:],  # the images' size (a model may leave H/W free)
        )
        result.seconds["bench"] = time.perf_counter() - started
    return _report(request, result, validations, gate, fidelity, bench, runtimes)


def _check_runtimes_open(model: Path, names) -> None:
    """Every runtime --val/--bench will use must load and compile the FP32 model before an INT8 file is
    written: a one-line error (exit 2) now, not after calibration with the INT8 file already published."""
    from quantize.measure.evaluate import open_in_runtime, prepare_for

    if not model.is_file():
        return  # quantize_model says what is wrong with the path
    for name in names:
        if name != "ort":  # onnxruntime is the runtime rq quantizes with: preparation loads the model in it
            prepare_for(open_in_runtime(model, name), 1)


def _check_evaluable(model: Path) -> None:
    from quantize.measure.evaluate import check_classifier_outputs, open_session

    if model.is_file():
        check_classifier_outputs(open_session(model), model)


def _validate(request, model, result, dataset, samples, runtimes, progress, ray) -> dict[str, Validation]:
    """FP32 and INT8 on the same images, in every runtime."""
    from quantize.measure.validate import validate

    validations = {}
    for rt in runtimes:
        where = "" if runtimes == ["ort"] else f" in {rt}"
        progress.stage(f"validate{where} (FP32 and INT8 on the same images)")
        validations[rt] = validate(
            model,
            result.output,
            dataset,
            samples,
            request.spec,
            batch_size=request.eval_batch,
            calibration_files=result.calibration_files,
            workers=request.workers,
            progress=progress,
            ray=ray,
            runtime=rt,
        )
    result.seconds["validate"] = sum(v.run.seconds for v in validations.values())
    return validations


def _gate(request, result, validations, runtimes) -> Gate | None:
    if request.max_drop is None:
        return None
    tuning = result.tuning
    chosen = tuning.chosen_step if tuning else None

    # Integer arithmetic differs between runtimes: the gate holds in every one validated, so it is the gate of
    # the runtime with the largest gated figure (Gate.gated_value: the interval's bound under --gate-on ci).
    gates = [
        Gate.from_drop(
            request.max_drop,
            validations[rt].drop,
            EXIT_GATE_FAILED,
            f"INT8 {result.recipe.label()}" + ("" if rt == runtimes[0] else f" · {rt}"),
            gate_on=request.gate_on,
            tuning_goal_met=tuning.goal_met if tuning else None,
            tuning_best_drop_pt=chosen.drop_pt if chosen else None,
            runtimes=tuple(validations),
        )
        for rt in validations
    ]
    return max(gates, key=lambda gate: gate.gated_value)


def _holdout_fidelity(request, model, result, progress) -> Fidelity | None:
    """Agreement / SQNR / KL of INT8 vs FP32 on calibration images calibration did not read (no labels)."""
    from quantize.measure.fidelity import DEFAULT_HOLDOUT_IMAGES, held_back_samples, measure_fidelity

    limit = DEFAULT_HOLDOUT_IMAGES if request.holdout_images is None else request.holdout_images
    held = held_back_samples(result.calibration_dataset, result.calibration_files, limit, result.recipe.seed)
    if not held:
        logger.warning(
            "every --calib image was used for calibration: no held-back image is left to check INT8's "
            "agreement with FP32 (use more calibration images than --samples, or --val)"
        )
        return None
    progress.stage(f"fidelity (FP32 vs INT8 on {len(held)} held-back calibration images)")
    fidelity = measure_fidelity(
        model,
        result.output,
        held,
        request.spec,
        source=f"{len(held)} held-back calibration images (not used to calibrate; no labels needed)",
        batch_size=request.eval_batch,
        workers=request.workers,
        progress=progress,
    )
    result.seconds["fidelity"] = fidelity.seconds
    return fidelity


def _report(request, result, validations, gate, fidelity, bench, runtimes) -> RunResult:
    from quantize.report.data import quantize_report

    command = list(request.command) if request.command is not None else ["rq", *sys.argv[1:]]
    validation = next(iter(validations.values()), None)
    data = quantize_report(result, validation, gate, bench, fidelity, validations, runtimes, command=command)
    paths = None
    if request.report_dir is not None:
        paths = write_report_after_model(data, Path(request.report_dir), result.output)
    return RunResult(result, validations, fidelity, gate, bench, data, paths)


def write_report_after_model(data: dict, report_dir: Path, model: Path) -> dict:
    """The INT8 model is already published: a report that fails now must not say "nothing was written"."""
    from quantize.report import write_report

    run_dir = report_dir / data["run_id"]
    # The folders write_report would create, outermost first: removed again (when empty) if it fails.
    created = [p for p in (*reversed(run_dir.parents), run_dir) if not p.exists()]
    try:
        return write_report(data, run_dir)
    except (RqInputError, RqEnvironmentError, OSError) as exc:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        reason = one_line(exc)
        raise ReportFailed(
            f"the INT8 model was written to {model}, but the report could not be written: {reason}"
        ) from None


def evaluate_in(runtimes, models, samples, spec, batch, workers=None, ray=None, progress=None) -> dict:
    """`rq eval`: the models on the same batches, in each runtime (`quantize.measure.evaluate.evaluate`)."""
    from quantize.measure.evaluate import evaluate, open_in_runtime
    from quantize.measure.runtimes import check_model_files

    progress = progress or NO_PROGRESS
    check_model_files(models)  # bad input in every runtime, not a model one runtime happens to skip
    if "ort" in list(runtimes)[1:]:
        # onnxruntime, the reference runtime, does not skip a model it cannot load: say so before the passes
        # of the runtimes listed before it, not after them.
        for m in models:
            open_in_runtime(Path(m), "ort")
    by_runtime = {}
    for name in runtimes:
        progress.stage(f"evaluate in {name}" if list(runtimes) != ["ort"] else "evaluate")
        by_runtime[name] = evaluate(
            models,
            samples,
            spec,
            batch_size=batch,
            workers=workers,
            progress=progress,
            ray=ray,
            runtime=name,
            # A model (after the first) that OpenVINO cannot read keeps the rows of the runtimes that ran it;
            # that runtime's rows say why it is missing, as rq bench does. onnxruntime is the reference runtime
            # (rq quantizes with it): a model it cannot load is an error.
            skip_unreadable=name != "ort",
        )
    return by_runtime


def inspect_run(fp32, int8, calib, labels, samples: int, spec, report_dir: Path, command) -> tuple:
    """`rq inspect`: per-node errors of `int8` against the prepared `fp32` on `samples` calibration images;
    the report written under `report_dir`. Returns (report, its paths, the nodes worst first)."""
    from calibration import BatchStream, discover_dataset, select_with_spares
    from quantize.files import work_folder
    from quantize.graph.inspection import inspect_models
    from quantize.graph.prepare import prepare_model
    from quantize.measure.cpu import detect_cpu
    from quantize.report import write_report
    from quantize.report.data import inspect_report

    dataset = discover_dataset(calib, labels)
    chosen, spares = select_with_spares(dataset, samples, 0)
    ensure_writable_dir(report_dir)
    with work_folder("rq-inspect-") as tmp:
        # The INT8 model was made from the prepared graph: compare against the same graph (same names).
        prepared = prepare_model(fp32, tmp)
        with BatchStream(chosen, spec, batch_size=8, spares=spares) as stream:
            nodes = inspect_models(prepared.path, int8, (b.images for b in stream))
            used = stream.used
    data = inspect_report(command, fp32, int8, prepared, detect_cpu(), used, nodes, spec)
    return data, write_report(data, Path(report_dir) / data["run_id"]), nodes


__all__ = ["RunRequest", "RunResult", "evaluate_in", "inspect_run", "run", "write_report_after_model"]
