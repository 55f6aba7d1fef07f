"""Stage 3, quantize (Intel Neural Compressor backend): INC's static post-training quantization, with or
without its accuracy-driven tuning.

neural-compressor 3.7.1 is the last release that quantizes ONNX models, and it pins numpy < 2 and (through
its ONNX adaptor) onnx < 1.19, so it usually lives in its own virtual environment. Nothing here imports it at
module level: `require_inc()` does, when the INC backend is actually used.

INC always gets rq's *prepared* model (`quantize.graph.prepare.prepare_model`): it rejects opset-7 files (the
BatchNormalization `spatial` attribute). It calibrates with its own calibrators, streaming the caller's
batches, and writes its scratch files (`nc_workspace`) under the caller's work folder, never into the current
directory.

How a recipe maps to INC's configuration, and what INC refuses: quantize/backends/inc_config.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibration.errors import RqInputError
from calibration.progress import NO_PROGRESS, Progress
from quantize.backends import Tuned
from quantize.backends.inc_config import (
    INC_INSTALL_HINT,
    INC_METHODS,
    inc_capabilities,
    inc_op_types,
    recipe_to_inc_config,
    require_inc,
)
from quantize.exits import QuantizerError, one_line
from quantize.recipe import LEGACY_OP_TYPES, QuantRecipe

INC_LOGGER = "neural_compressor"
#: Accuracy (percent) the evaluator hands INC for a trial whose evaluation raised: below any real one.
FAILED_TRIAL_ACCURACY = -100.0
# Node types that only appear in a quantized graph (QDQ or QOperator, ONNX or com.microsoft domain).
_QUANTIZED_NODE_TYPES = {
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "ConvInteger",
    "MatMulInteger",
    "DynamicQuantizeLinear",
}


class IncCalibrationLoader:
    """The dataloader INC wants: a `batch_size` and `(inputs, labels)` pairs, one fresh pass per iteration.

    `make_batches()` is called at every pass (INC calibrates again for every tuning trial), so at most one
    batch is held in memory here.
    """

    def __init__(self, make_batches: Callable[[], Iterable[np.ndarray]], batch_size: int):
        if batch_size < 1:
            raise ValueError("batch_size must be ≥ 1")
        self._make_batches = make_batches
        self.batch_size = batch_size
        self.passes = 0

    def __iter__(self) -> Iterator[tuple[np.ndarray, None]]:
        self.passes += 1
        batches = self._make_batches()
        try:
            for images in batches:
                yield np.ascontiguousarray(images, dtype=np.float32), None
        finally:
            # INC stops reading after the sampling size: release a BatchStream's decoding threads at once.
            close = getattr(batches, "close", None)
            if callable(close):
                close()


@dataclass
class IncOutcome:
    """What `quantize_with_inc` did."""

    output: Path
    goal_met: bool | None  # None when not tuning
    trials: list[dict] = field(default_factory=list)
    best_accuracy: float | None = None  # top-1 % of the written model (when tuning)
    baseline_accuracy: float | None = None  # FP32 top-1 % as INC's tuning measured it
    fallback_nodes: list[str] = field(default_factory=list)  # candidates INC left FP32 in the written model
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "output": str(self.output),
            "goal_met": self.goal_met,
            "trials": [dict(t) for t in self.trials],
            "best_accuracy": self.best_accuracy,
            "baseline_accuracy": self.baseline_accuracy,
            "fallback_nodes": list(self.fallback_nodes),
            "seconds": round(self.seconds, 3),
            "notes": list(self.notes),
        }


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {one_line(exc)}" if str(exc).strip() else type(exc).__name__


def is_quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type in _QUANTIZED_NODE_TYPES for n in model.graph.node)


def fp32_candidates(model: onnx.ModelProto, op_types: Iterable[str]) -> list[str]:
    """Names of nodes of `op_types` that a (QDQ or QOperator) quantized graph still computes in float.

    QDQ: a float op counts as quantized when its activation and weight both come out of DequantizeLinear
    (the rule of `quantize.backends.ort.count_quantized`); QOperator: any float op left is FP32.
    """
    op_types = set(op_types)
    produced_by = {out: node.op_type for node in model.graph.node for out in node.output}
    initializers = {init.name for init in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        operands = [name for name in node.input[:2] if name]
        if not operands or not all(
            produced_by.get(name) == "DequantizeLinear" and name not in initializers for name in operands
        ):
            names.append(node.name)
    return names


def _digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


class _TrialEvaluator:
    """INC's eval_func: saves the candidate INC hands over, runs rq's evaluation on the file, keeps the best.

    INC calls it first with the FP32 model (the baseline), then once per tuning trial. rq's `eval_func` returns
    top-1 in percent; INC gets a fraction (and `FAILED_TRIAL_ACCURACY` / 100 for a trial whose evaluation
    raised, so tuning goes on). A plain class, not a function: INC scans the *source* of function eval_funcs
    for words such as "exec(" and refuses them.
    """

    def __init__(
        self,
        eval_func: Callable[[Path], float],
        workdir: Path,
        op_types: tuple[str, ...],
        excluded: tuple[str, ...],
        progress: Progress,
    ):
        self.eval_func = eval_func
        self.workdir = workdir
        self.op_types = op_types
        self.excluded = set(excluded)
        self.progress = progress
        self.calls = 0
        self.baseline: float | None = None
        self.baseline_error: str | None = None
        self.trials: list[dict] = []
        self.best: dict | None = None  # the best trial record
        self.best_path = workdir / "inc-best.onnx"
        self.digests: dict[str, int] = {}  # sha256 of each evaluated candidate → trial number
        self.interrupted = False
        # The real stdout/stderr: INC's chatter is redirected during `fit`, rq's log and evaluation are not.
        self.streams: tuple[Any, Any] | None = None

    @contextlib.contextmanager
    def _outside(self):
        if self.streams is None:
            yield
            return
        with contextlib.redirect_stdout(self.streams[0]), contextlib.redirect_stderr(self.streams[1]):
            yield

    def _say(self, message: str) -> None:
        with self._outside():
            self.progress.note(message)

    def _run(self, path: Path) -> float:
        with self._outside():
            return float(self.eval_func(path))

    def __call__(self, model: Any) -> float:
        self.calls += 1
        path, proto = self._materialize(model)
        if self.calls == 1 and not is_quantized(proto):
            return self._baseline(path)
        number = len(self.trials) + 1
        record: dict[str, Any] = {
            "trial": number,
            "accuracy": None,
            "drop_pt": None,
            "fp32_nodes": [n for n in fp32_candidates(proto, self.op_types) if n not in self.excluded],
            "error": None,
        }
        self.trials.append(record)
        if not is_quantized(proto):
            # INC's fallback can end with every candidate in FP32: that is the FP32 model again, which would
            # "meet" any accuracy goal. It is not a candidate for rq's INT8 output; tell INC it is useless.
            record["error"] = "not evaluated: every candidate fell back to FP32"
            self._say(f"trial {number}: skipped, every candidate fell back to FP32")
            path.unlink(missing_ok=True)
            return FAILED_TRIAL_ACCURACY / 100.0
        with contextlib.suppress(Exception):
            self.digests[_digest(proto)] = number
        del proto
        try:
            accuracy = self._run(path)
            if not np.isfinite(accuracy):
                raise ValueError(f"the evaluation returned {accuracy}")
        except KeyboardInterrupt:
            self.interrupted = True
            raise
        except Exception as exc:
            record["error"] = _first_line(exc)
            self._say(f"trial {number} failed: {record['error']}")
            path.unlink(missing_ok=True)
            return FAILED_TRIAL_ACCURACY / 100.0
        record["accuracy"] = accuracy
        if self.baseline is not None:
            record["drop_pt"] = self.baseline - accuracy
        drop = f", drop {record['drop_pt']:.2f} pt" if record["drop_pt"] is not None else ""
        fallback = f", {len(record['fp32_nodes'])} node(s) FP32" if record["fp32_nodes"] else ""
        self._say(f"trial {number}: top-1 {accuracy:.2f}%{drop}{fallback}")
        if self.best is None or accuracy > self.best["accuracy"]:
            os.replace(path, self.best_path)
            self.best = record
        else:
            path.unlink(missing_ok=True)
        return accuracy / 100.0

    def _baseline(self, path: Path) -> float:
        try:
            self.baseline = self._run(path)
        except KeyboardInterrupt:
            self.interrupted = True
            raise
        except Exception as exc:
            self.baseline_error = _first_line(exc)
            raise
        finally:
            path.unlink(missing_ok=True)
        self._say(f"FP32 baseline: top-1 {self.baseline:.2f}%")
        return self.baseline / 100.0

    def _materialize(self, model: Any) -> tuple[Path, onnx.ModelProto]:
        """A file for rq's eval_func and the graph to inspect, whatever INC passed."""
        path = self.workdir / f"inc-candidate-{self.calls}.onnx"
        if isinstance(model, str | os.PathLike):  # INC's way for > 2 GB models, which rq refuses up front
            proto = onnx.load(str(model))
        else:
            proto = model if isinstance(model, onnx.ModelProto) else getattr(model, "model", None)
        if not isinstance(proto, onnx.ModelProto):
            raise TypeError(f"INC passed an unexpected model object: {type(model).__name__}")
        onnx.save_model(proto, str(path))
        return path, proto


class _ErrorCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _inc_session(workspace: Path):
    """Silence INC (its logger, stdout/stderr chatter), point its workspace at `workspace`, protect global state.

    INC seeds Python's and numpy's global random generators; they are restored afterwards. INC catches
    KeyboardInterrupt inside `fit` (its own timeout raises one), so a user's Ctrl-C is recorded here and
    re-raised by the caller.
    """
    from neural_compressor.config import options

    logger = logging.getLogger(INC_LOGGER)
    saved_logger = (logger.level, list(logger.handlers), logger.propagate)
    capture = _ErrorCapture()
    saved_workspace, saved_resume = options.workspace, options.resume_from
    saved_random, saved_np_random = random.getstate(), np.random.get_state()
    state = {"sigint_at": None, "capture": capture, "output": io.StringIO()}
    restore_sigint = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            state["sigint_at"] = time.perf_counter()
            if callable(previous):
                previous(signum, frame)
            elif previous != signal.SIG_IGN:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)
        restore_sigint = previous
    logger.handlers = [capture]
    logger.setLevel(logging.ERROR)
    logger.propagate = False
    options.workspace = str(workspace) + os.sep
    options.resume_from = None
    try:
        with (
            contextlib.redirect_stdout(state["output"]),
            contextlib.redirect_stderr(state["output"]),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")  # INC's own deprecation warnings (onnx.mapping, its adaptor)
            yield state
    finally:
        options.workspace, options.resume_from = saved_workspace, saved_resume
        logger.setLevel(saved_logger[0])
        logger.handlers = saved_logger[1]
        logger.propagate = saved_logger[2]
        random.setstate(saved_random)
        np.random.set_state(saved_np_random)
        if restore_sigint is not None:
            signal.signal(signal.SIGINT, restore_sigint)


def _inc_failure(state: dict) -> str:
    """The most useful line of what INC logged or printed when it produced nothing."""
    for message in state["capture"].messages:
        if "Unexpected exception" in message:
            return message.strip().splitlines()[0]
    lines = [line for line in state["output"].getvalue().splitlines() if line.strip()]
    for line in reversed(lines):  # the last line of a traceback names the exception
        if "Error" in line or "Exception" in line:
            return line.strip()
    messages = [m for m in state["capture"].messages if m.strip()]
    return messages[0].strip().splitlines()[0] if messages else "no reason given"


def _uses_external_data(path: Path) -> bool:
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    return any(uses_external_data(init) for init in model.graph.initializer)


def quantize_with_inc(
    prepared_path: Path,
    make_batches: Callable[[], Iterable[np.ndarray]],
    recipe: QuantRecipe,
    output_path: Path,
    workdir: Path,
    *,
    batch_size: int,
    eval_func: Callable[[Path], float] | None = None,
    max_drop_pt: float | None = None,
    max_trials: int = 20,
    timeout_s: int = 0,
    progress: Progress | None = None,
) -> IncOutcome:
    """Quantize `prepared_path` with INC into `output_path` (a scratch path; the caller publishes it).

    Without `eval_func`: one calibration + quantization pass. With it (rq's evaluation: ONNX path → top-1 %)
    and `max_drop_pt`: INC's basic tuning strategy (at most `max_trials` trials; `timeout_s` 0 stops at the
    first configuration within the drop, > 0 lets INC keep tuning until the timeout or `max_trials`). When no
    configuration meets the goal, the most accurate quantized candidate is written and `goal_met` is False.
    """
    progress = progress or NO_PROGRESS
    started = time.perf_counter()
    require_inc()
    from neural_compressor.quantization import fit

    prepared_path, output_path, workdir = Path(prepared_path), Path(output_path), Path(workdir)
    if _uses_external_data(prepared_path):
        raise RqInputError(
            f"{prepared_path.name}: models stored with external data (over 2 GB) are not supported by "
            "--backend inc (use --backend ort)"
        )
    tune = eval_func is not None
    notes: list[str] = []
    conf = recipe_to_inc_config(
        recipe, tune=tune, max_drop_pt=max_drop_pt, max_trials=max_trials, timeout_s=timeout_s, notes=notes
    )
    workspace = workdir / "inc-workspace"
    workspace.mkdir(parents=True, exist_ok=True)
    loader = IncCalibrationLoader(make_batches, batch_size)
    evaluator = (
        _TrialEvaluator(eval_func, workdir, inc_op_types(recipe), recipe.exclude_nodes, progress)
        if tune
        else None
    )
    progress.note(
        f"INC: {'tuning (at most ' + str(max_trials) + ' trials)' if tune else 'calibrating and quantizing'}"
        f" {prepared_path.name}"
    )
    fit_started = time.perf_counter()
    streams = (sys.stdout, sys.stderr)
    with _inc_session(workspace) as state:
        if evaluator is not None:
            evaluator.streams = streams
        qmodel = fit(str(prepared_path), conf, calib_dataloader=loader, eval_func=evaluator)
    fit_seconds = time.perf_counter() - fit_started

    # INC's timeout interrupts the main thread like a Ctrl-C does; only an interrupt before it is the user's.
    interrupted_at = state["sigint_at"] or (fit_started + fit_seconds)
    timed_out = timeout_s > 0 and interrupted_at - fit_started >= timeout_s - 1.0
    if not timed_out and (
        state["sigint_at"] is not None or (evaluator is not None and evaluator.interrupted)
    ):
        raise KeyboardInterrupt
    if timed_out:
        notes.append(f"INC's tuning stopped at its {timeout_s} s timeout")
    if evaluator is not None and evaluator.baseline_error is not None:
        raise RqInputError(f"INC could not evaluate the FP32 model: {evaluator.baseline_error}")

    outcome = IncOutcome(output=output_path, goal_met=None, notes=notes)
    if evaluator is not None:
        outcome.trials = evaluator.trials
        outcome.baseline_accuracy = evaluator.baseline

    if qmodel is not None:
        proto = qmodel.model
        if not is_quantized(proto):
            raise QuantizerError("INC's result has no quantized node (every candidate fell back to FP32)")
        onnx.save_model(proto, str(output_path))
        if evaluator is not None:
            outcome.goal_met = True
            number = evaluator.digests.get(_digest(proto))
            record = next((t for t in evaluator.trials if t["trial"] == number), None)
            if record is not None:
                outcome.best_accuracy = record["accuracy"]
            else:
                met = [t for t in evaluator.trials if t["accuracy"] is not None]
                outcome.best_accuracy = max((t["accuracy"] for t in met), default=None)
                notes.append(
                    "INC's result could not be matched to a trial; best_accuracy is the best trial's"
                )
        del proto, qmodel
    elif evaluator is not None and evaluator.best is not None:
        best = evaluator.best
        shutil.move(str(evaluator.best_path), str(output_path))
        outcome.goal_met = False
        outcome.best_accuracy = best["accuracy"]
        drop = f"drop {best['drop_pt']:.2f} pt" if best["drop_pt"] is not None else "drop unknown"
        notes.append(
            f"INC found no configuration within {max_drop_pt:g} pt; the best seen "
            f"(trial {best['trial']}, {drop}) was written"
        )
    else:
        if evaluator is not None and evaluator.trials:
            errors = [t["error"] for t in evaluator.trials if t["error"]]
            reason = (
                f"every trial's evaluation failed (first: {errors[0]})" if errors else _inc_failure(state)
            )
        else:
            reason = _inc_failure(state)
        raise QuantizerError(f"Intel Neural Compressor produced no quantized model: {reason}")
    if evaluator is not None:
        evaluator.best_path.unlink(missing_ok=True)

    written = onnx.load(str(output_path), load_external_data=False)
    excluded = set(recipe.exclude_nodes)
    outcome.fallback_nodes = [n for n in fp32_candidates(written, inc_op_types(recipe)) if n not in excluded]
    outcome.seconds = time.perf_counter() - started
    progress.note(f"INC: done in {outcome.seconds:.1f} s")
    return outcome


class IncBackend:
    """Intel Neural Compressor: calibrates by itself (from rq's calibration sample) and tunes by itself."""

    name = "inc"
    uses_rq_ranges = False
    has_tuner = True

    def require(self) -> None:
        require_inc()

    def versions(self) -> dict[str, str]:
        return {"neural-compressor": require_inc()}

    def adapt(self, recipe: QuantRecipe) -> QuantRecipe:
        # Placement from the graph and bias correction are ort-backend steps: INC gets the op types it always
        # had, and the recipe recorded with its model says that no bias correction (and no OpenVINO form) was
        # done.
        return recipe.with_changes(
            op_types=recipe.op_types or LEGACY_OP_TYPES, bias_correction=False, placement_runtime="ort"
        )

    def quantize(self, prepared, calibration, recipe, spec, scratch: Path, workdir: Path) -> None:
        self._run(prepared, calibration, recipe, spec, scratch, workdir)

    def tune(self, prepared, calibration, recipe, spec, workdir, request, top1, progress) -> Tuned:
        scratch = workdir / "int8-inc-tuned.onnx"
        outcome = self._run(
            prepared, calibration, recipe, spec, scratch, workdir, top1=top1, tune=request, progress=progress
        )
        tuned = recipe.with_changes(exclude_nodes=recipe.exclude_nodes + tuple(outcome.fallback_nodes))
        return Tuned(tuned, inc_tune_report(outcome, request), scratch)

    @staticmethod
    def _run(prepared, calibration, recipe, spec, scratch, workdir, *, top1=None, tune=None, progress=None):
        make_batches, batch = calibration_passes(prepared, calibration, recipe, spec)
        return quantize_with_inc(
            prepared.path,
            make_batches,
            recipe,
            scratch,
            workdir,
            batch_size=batch,
            eval_func=top1,
            max_drop_pt=tune.max_drop_pt if tune else None,
            max_trials=tune.max_trials if tune else 20,
            progress=progress,
        )


def calibration_passes(prepared, calibration, recipe: QuantRecipe, spec):
    """A factory of fresh calibration passes for INC (it reads the images again for every trial): the
    calibration sample, decoded with the run's `--workers`; the last pass's counts go back to `calibration`."""
    from quantize.pipeline import calibration_batches

    def make_batches():
        batches = calibration_batches(prepared, calibration, spec, recipe.batch_size)
        try:
            with contextlib.closing(batches):
                yield from batches
        finally:
            # Also when INC stops reading before the end (it reads as many batches as the sample fills).
            calibration.used, calibration.skipped, calibration.replaced = (
                batches.used,
                batches.skipped,
                batches.replaced,
            )

    return make_batches, prepared.signature.fixed_batch or recipe.batch_size


def inc_tune_report(outcome: IncOutcome, tune):
    """INC's trials in the shape of rq's own tuning report."""
    from quantize.tune import TuneReport, TuneStep

    report = TuneReport(
        backend="inc",
        max_drop_pt=tune.max_drop_pt,
        tune_images=len(tune.tune_samples),
        fp32_top1=outcome.baseline_accuracy if outcome.baseline_accuracy is not None else float("nan"),
        goal_met=bool(outcome.goal_met),
        notes=list(outcome.notes),
        seconds=outcome.seconds,
    )
    best = None
    for trial in outcome.trials:
        accuracy = trial.get("accuracy")
        step = TuneStep(
            step=int(trial["trial"]),
            fallback=list(trial.get("fp32_nodes") or []),
            added=None,
            top1=float("nan") if accuracy is None else float(accuracy),
            drop_pt=float("nan") if trial.get("drop_pt") is None else float(trial["drop_pt"]),
            seconds=0.0,
            error=trial.get("error"),
        )
        report.steps.append(step)
        if accuracy is not None and (best is None or accuracy > best.top1):
            best = step
    report.chosen = best.step if best is not None else (report.steps[0].step if report.steps else 0)
    report.notes.append("INC keeps only its best trial's model, so the speed of each trial was not measured")
    return report


__all__ = [
    "INC_INSTALL_HINT",
    "INC_METHODS",
    "IncBackend",
    "IncCalibrationLoader",
    "IncOutcome",
    "fp32_candidates",
    "inc_capabilities",
    "quantize_with_inc",
    "recipe_to_inc_config",
    "require_inc",
]
