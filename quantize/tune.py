"""Accuracy-aware tuning on ONNX Runtime: fall the most sensitive nodes back to FP32 until the drop fits.

ORT has no tuning of its own. rq's:
1. quantize everything the recipe asks for and measure the top-1 drop on a *tuning* subset of the validation
   images (the rest is kept aside to confirm the result, so the reported drop is not the one that was tuned);
2. if the drop exceeds the goal, rank the quantized nodes by sensitivity: the SQNR of the model's logits
   against FP32 when that node *alone* is quantized (a few calibration images; the calibration ranges are
   reused, nothing is recalibrated). A node whose quantization alone damages the output most ranks first;
3. fall back the most sensitive nodes one at a time (cumulative), re-quantizing and re-measuring each step,
   until the drop on the tuning subset is within the goal or `max_trials` steps were spent;
4. keep the first step that meets the goal, or else the best step seen (never nothing), and benchmark every
   step against FP32, interleaved, so the report says what each fallback cost in speed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration import BatchStream, PreprocessSpec, Sample
from calibration.errors import RqInputError
from quantize.evaluate import evaluate, open_session, run_model
from quantize.inspection import sqnr_db
from quantize.recipe import QuantRecipe


@dataclass(frozen=True)
class TuneRequest:
    """What the user asked of tuning, and the images to tune on."""

    max_drop_pt: float
    tune_samples: tuple[Sample, ...]
    max_trials: int = 12
    sensitivity_images: int = 16
    bench_runs: int = 10


def split_for_tuning(
    samples: Sequence[Sample], fraction: float, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Deterministically split validation samples into a tuning part and a held-out confirmation part."""
    if not 0.0 < fraction < 1.0:
        raise RqInputError(f"--tune-fraction must be between 0 and 1 (exclusive), not {fraction}")
    order = list(samples)
    random.Random(seed).shuffle(order)
    cut = max(1, min(len(order) - 1, round(len(order) * fraction)))
    if len(order) < 2:
        raise RqInputError("tuning needs at least 2 validation images (some to tune on, some to confirm)")
    return sorted(order[:cut], key=lambda s: s.path), sorted(order[cut:], key=lambda s: s.path)


@dataclass
class TuneStep:
    step: int
    fallback: list[str]
    added: str | None
    top1: float
    drop_pt: float
    seconds: float
    speed_ratio: dict[str, float] | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "fallback_nodes": list(self.fallback),
            "added": self.added,
            "top1": round(self.top1, 4),
            "drop_pt": round(self.drop_pt, 4),
            "seconds": round(self.seconds, 3),
            "speed_ratio_to_fp32": self.speed_ratio,
            "error": self.error,
        }


@dataclass
class TuneReport:
    backend: str
    max_drop_pt: float
    tune_images: int
    fp32_top1: float
    steps: list[TuneStep] = field(default_factory=list)
    chosen: int = 0
    goal_met: bool = False
    sensitivity: list[tuple[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def chosen_step(self) -> TuneStep | None:
        """The step whose model was published (`chosen` is a step number, as shown in the report)."""
        return next((s for s in self.steps if s.step == self.chosen), None)

    @property
    def fallback_nodes(self) -> list[str]:
        step = self.chosen_step
        return list(step.fallback) if step else []

    def to_dict(self) -> dict:
        return {
            "backend": self.backend,
            "max_drop_pt": self.max_drop_pt,
            "tune_images": self.tune_images,
            "fp32_top1_on_tune_images": round(self.fp32_top1, 4),
            "steps": [s.to_dict() for s in self.steps],
            "chosen_step": self.chosen,
            "goal_met": self.goal_met,
            "fallback_nodes": self.fallback_nodes,
            "sensitivity": [{"node": n, "logits_sqnr_db": round(v, 3)} for n, v in self.sensitivity],
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }


def _decode(samples: Sequence[Sample], spec: PreprocessSpec, count: int, workers: int | None) -> np.ndarray:
    with BatchStream(list(samples)[:count], spec, batch_size=count, workers=workers) as stream:
        return np.concatenate([b.images for b in stream])


def _logits(path: Path, input_name: str, images: np.ndarray) -> np.ndarray:
    return run_model(open_session(path), input_name, images)


def candidate_nodes(prepared_path: Path, recipe: QuantRecipe) -> list[str]:
    from quantize.placement import ANCHORS, place
    from quantize.prepare import load_model

    model = load_model(prepared_path, load_weights=False)
    types = {n.name: n.op_type for n in model.graph.node}
    # The compute nodes: an activation, pooling or reshape placed after one goes back to FP32 with it.
    return [name for name in place(model, recipe).nodes if types[name] in ANCHORS]


def sensitivity_ranking(
    quantize_to: Callable[[QuantRecipe, Path], None],
    prepared_path: Path,
    input_name: str,
    recipe: QuantRecipe,
    images: np.ndarray,
    workdir: Path,
    log: Callable[[str], None] = lambda _m: None,
) -> list[tuple[str, float]]:
    """Nodes ordered from most to least sensitive: logits SQNR (dB) when only that node is quantized."""
    nodes = candidate_nodes(prepared_path, recipe)
    if any(not n for n in nodes):
        raise RqInputError("the model has unnamed nodes; rq cannot fall them back by name")
    reference = _logits(prepared_path, input_name, images)
    scores = []
    path = workdir / "sensitivity.onnx"
    for i, node in enumerate(nodes, 1):
        others = tuple(n for n in nodes if n != node)
        quantize_to(recipe.with_changes(exclude_nodes=recipe.exclude_nodes + others), path)
        scores.append((node, sqnr_db(reference, _logits(path, input_name, images))))
        if i % 10 == 0 or i == len(nodes):
            log(f"sensitivity {i}/{len(nodes)}")
    scores.sort(key=lambda item: item[1])
    return scores


def tune_fallback(
    *,
    quantize_to: Callable[[QuantRecipe, Path], None],
    prepared_path: Path,
    fp32_path: Path,
    input_name: str,
    recipe: QuantRecipe,
    spec: PreprocessSpec,
    request: TuneRequest,
    sensitivity_samples: Sequence[Sample],
    workdir: Path,
    workers: int | None = None,
    eval_batch: int = 32,
    log: Callable[[str], None] = lambda _m: None,
) -> tuple[QuantRecipe, TuneReport]:
    """Run the fallback loop; return the recipe to publish (its exclude_nodes = the chosen fallbacks)."""
    from quantize.bench import bench_models

    started = time.perf_counter()
    tune = list(request.tune_samples)
    fp32_run = evaluate([fp32_path], tune, spec, batch_size=eval_batch, workers=workers)
    fp32_correct = fp32_run.models[0].correct_top1
    report = TuneReport(
        backend="ort",
        max_drop_pt=request.max_drop_pt,
        tune_images=fp32_run.images,
        fp32_top1=fp32_run.models[0].top1,
    )
    step_models: list[Path] = []

    def measure(step: int, fallback: list[str], added: str | None) -> TuneStep:
        t0 = time.perf_counter()
        path = workdir / f"tune-step{step}.onnx"
        step_recipe = recipe.with_changes(exclude_nodes=recipe.exclude_nodes + tuple(fallback))
        quantize_to(step_recipe, path)
        run = evaluate([path], tune, spec, batch_size=eval_batch, workers=workers)
        if not np.array_equal(run.labels, fp32_run.labels):
            raise RqInputError("tuning images changed while tuning")
        correct = run.models[0].correct_top1
        top1 = 100.0 * float(correct.mean())
        drop = 100.0 * float(fp32_correct.mean() - correct.mean())
        step_models.append(path)
        log(f"tune step {step}: {len(fallback)} node(s) in FP32, top-1 {top1:.2f}, drop {drop:.2f} pt")
        return TuneStep(step, list(fallback), added, top1, drop, time.perf_counter() - t0)

    report.steps.append(measure(0, [], None))
    if report.steps[0].drop_pt > request.max_drop_pt:
        log("ranking nodes by sensitivity (each quantized alone)")
        images = _decode(sensitivity_samples, spec, request.sensitivity_images, workers)
        report.sensitivity = sensitivity_ranking(
            quantize_to, prepared_path, input_name, recipe, images, workdir, log
        )
        fallback: list[str] = []
        for node, _score in report.sensitivity[: request.max_trials]:
            fallback.append(node)
            step = measure(len(report.steps), fallback, node)
            report.steps.append(step)
            if step.drop_pt <= request.max_drop_pt:
                break
    met = [s for s in report.steps if s.drop_pt <= request.max_drop_pt]
    if met:
        chosen = met[0]
        report.goal_met = True
    else:
        chosen = min(report.steps, key=lambda s: (s.drop_pt, len(s.fallback)))
        report.notes.append(
            f"no step reached a drop ≤ {request.max_drop_pt:.2f} pt within {len(report.steps) - 1} fallback(s); "
            f"kept the best seen: step {chosen.step}, drop {chosen.drop_pt:.2f} pt"
        )
    report.chosen = chosen.step
    if len(step_models) > 1 and request.bench_runs > 0:
        log("bench: FP32 and every tuning step, interleaved (batch 1)")
        bench = bench_models([fp32_path, *step_models], batch_sizes=(1,), runs=request.bench_runs, warmup=2)
        for row in bench.rows:
            if row.model_index > 0:
                report.steps[row.model_index - 1].speed_ratio = {str(row.batch): round(row.ratio_to_first, 4)}
    report.seconds = time.perf_counter() - started
    return recipe.with_changes(exclude_nodes=recipe.exclude_nodes + tuple(chosen.fallback)), report
