"""Accuracy-aware tuning on ONNX Runtime: fall the nodes that damage fidelity most back to FP32.

ORT has no tuning of its own. rq's tuner optimizes *fidelity to FP32*, which needs no labels, on as many images
as it has, and keeps the labelled images the user held out for confirmation out of every decision:

1. the **pool**: the labelled *tuning* part of the `--val` images (the rest is held out and only confirms the
   result, in the CLI's validation) plus up to `holdout_images` *held-back calibration images* (images of
   `--calib` calibration did not read; their labels, if any, are ignored). FP32 runs on the pool once;
2. quantize everything the recipe asks for (step 0) and measure, on the pool, top-1 agreement with FP32, the
   softmax KL and the logits SQNR, and on the labelled tuning images the top-1 drop;
3. if the goal is not met, rank the quantized nodes by sensitivity in **one pass**: FP32 and the step-0 INT8
   model run once on a few calibration images with every candidate node's input and output exposed, and each
   node is scored by the noise it *adds* (relative error power of its output minus that of its input), so
   a node downstream of a damaged one is not blamed for the damage it only passes on;
4. fall back the most sensitive nodes one at a time (cumulative), re-quantizing and re-measuring each step;
5. a step **meets the goal** when both the drop on the labelled tuning images and the drop *predicted* from the
   pool's disagreement rate are within `max_drop_pt`. The prediction is disagreement rate × the net loss per
   disagreement measured once, at step 0, on the labelled tuning images: a fixed factor times a figure
   measured on the whole pool, so stopping does not hinge on the few labelled images that happen to flip at
   one step (what made the old top-1-only tuner overfit its tuning half). Keep the first step that meets the
   goal; otherwise the most faithful step (highest agreement, then lowest KL), never nothing;
6. benchmark every step against FP32, interleaved, so the report says what each fallback cost in speed.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration import BatchStream, PreprocessSpec, Sample
from calibration.errors import RqInputError
from calibration.progress import NO_PROGRESS, Progress
from quantize.graph.inspection import DEQUANT_SUFFIX, _run_all, _session, _with_outputs
from quantize.measure.evaluate import open_session, run_model
from quantize.measure.fidelity import compare_logits
from quantize.recipe import QuantRecipe


@dataclass(frozen=True)
class TuneRequest:
    """What the user asked of tuning, and the images to tune on."""

    max_drop_pt: float
    tune_samples: tuple[Sample, ...]
    max_trials: int = 12
    sensitivity_images: int = 16
    bench_runs: int = 10
    # Held-back calibration images added to the fidelity pool (no labels needed); 0: the tuning images only.
    holdout_images: int = 1000
    # Images that must never join the pool: the confirmation images (when --calib and --val share images,
    # a held-back calibration image could be one of them).
    never_use: tuple[Path, ...] = ()
    ray: object = None  # a quantize.distributed.RayRunner: the tuning passes run on that Ray cluster
    eval_batch: int = 32  # batch size of the tuning's validation passes (`--eval-batch`)


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
    top1: float  # on the labelled tuning images
    drop_pt: float  # on the labelled tuning images
    seconds: float
    speed_ratio: dict[str, float] | None = None
    error: str | None = None
    agreement_pct: float | None = None  # on the pool (tuning + held-back calibration images)
    softmax_kl: float | None = None
    logits_sqnr_db: float | None = None
    predicted_drop_pt: float | None = None  # pool disagreement rate × step-0 net loss per disagreement

    def to_dict(self) -> dict:
        def r(value, digits):
            return None if value is None else round(value, digits)

        return {
            "step": self.step,
            "fallback_nodes": list(self.fallback),
            "added": self.added,
            "top1": round(self.top1, 4),
            "drop_pt": round(self.drop_pt, 4),
            "agreement_pct": r(self.agreement_pct, 4),
            "softmax_kl": r(self.softmax_kl, 6),
            "logits_sqnr_db": r(self.logits_sqnr_db, 3),
            "predicted_drop_pt": r(self.predicted_drop_pt, 4),
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
    sensitivity: list[tuple[str, float]] = field(default_factory=list)  # (node, dB of the noise it adds)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    pool_images: int = 0  # images fidelity was measured on (tuning + held-back calibration)
    holdout_images: int = 0  # of which held-back calibration images
    loss_per_disagreement: float | None = None  # step 0, labelled tuning images

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
            "sensitivity": [{"node": n, "added_noise_sqnr_db": round(v, 3)} for n, v in self.sensitivity],
            "objective": "fidelity to FP32 (top-1 agreement, softmax KL) on the pool",
            "pool_images": self.pool_images,
            "holdout_calibration_images": self.holdout_images,
            "loss_per_disagreement": (
                None if self.loss_per_disagreement is None else round(self.loss_per_disagreement, 4)
            ),
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }


def _decode(samples: Sequence[Sample], spec: PreprocessSpec, count: int, workers: int | None) -> np.ndarray:
    with BatchStream(list(samples)[:count], spec, batch_size=count, workers=workers) as stream:
        return np.concatenate([b.images for b in stream])


@dataclass
class PoolRun:
    """One model's logits on the pool, with the labels (-1 where unknown) and paths of the images read."""

    logits: np.ndarray
    labels: np.ndarray
    paths: list[Path]


def run_pool(
    path: Path, samples: Sequence[Sample], spec: PreprocessSpec, batch: int, workers: int | None, ray=None
) -> PoolRun:
    if ray is not None:
        # Tuning needs whole logits (SQNR, KL), not the top-5 a validation pass brings back.
        logits, labels, paths = ray.logits(path, samples, spec, batch_size=batch)
        if not len(logits):
            raise RqInputError("no readable image to tune on")
        return PoolRun(logits, labels, paths)
    session = open_session(path)
    input_name = session.get_inputs()[0].name
    logits, labels, paths = [], [], []
    with BatchStream(list(samples), spec, batch_size=batch, workers=workers) as stream:
        for item in stream:
            logits.append(run_model(session, input_name, item.images))
            labels.append(item.labels)
            paths.extend(item.paths)
    if not logits:
        raise RqInputError("no readable image to tune on")
    return PoolRun(np.concatenate(logits), np.concatenate(labels), paths)


def pool_samples(tune: Sequence[Sample], holdout: Sequence[Sample]) -> list[Sample]:
    """The labelled tuning images, then the held-back calibration images without their labels (an image in
    both is taken once, labelled)."""
    seen = {Path(s.path) for s in tune}
    return list(tune) + [Sample(s.path, None) for s in holdout if Path(s.path) not in seen]


@dataclass(frozen=True)
class StepFigures:
    top1: float
    drop_pt: float
    agreement_pct: float
    softmax_kl: float
    logits_sqnr_db: float
    disagreement_rate: float  # on the pool, fraction
    labelled_disagreements: int
    labelled_net_loss: int  # FP32-only right minus INT8-only right, labelled images


def step_figures(fp32: PoolRun, int8: PoolRun) -> StepFigures:
    """Fidelity on the whole pool; top-1 and its drop on the labelled images of it."""
    if fp32.paths != int8.paths:
        raise RqInputError("tuning images changed while tuning")
    fid = compare_logits(fp32.logits, int8.logits)
    offset = 1 if fp32.logits.shape[1] == 1001 else 0
    pred_a = np.argmax(fp32.logits[:, offset:], axis=1)
    pred_b = np.argmax(int8.logits[:, offset:], axis=1)
    labelled = fp32.labels >= 0
    if not labelled.any():
        raise RqInputError("tuning needs labelled images (the tuning part of --val)")
    truth = fp32.labels[labelled]
    a = pred_a[labelled] == truth
    b = pred_b[labelled] == truth
    return StepFigures(
        top1=100.0 * float(b.mean()),
        drop_pt=100.0 * float(a.mean() - b.mean()),
        agreement_pct=fid.agreement_pct,
        softmax_kl=fid.softmax_kl,
        logits_sqnr_db=fid.logits_sqnr_db,
        disagreement_rate=fid.disagreements / fid.images,
        labelled_disagreements=int((pred_a[labelled] != pred_b[labelled]).sum()),
        labelled_net_loss=int((a & ~b).sum() - (~a & b).sum()),
    )


def candidate_nodes(prepared_path: Path, recipe: QuantRecipe) -> list[str]:
    from quantize.graph.placement import ANCHORS, place
    from quantize.graph.prepare import load_model

    model = load_model(prepared_path, load_weights=False)
    types = {n.name: n.op_type for n in model.graph.node}
    # The compute nodes: an activation, pooling or reshape placed after one goes back to FP32 with it.
    return [name for name in place(model, recipe).nodes if types[name] in ANCHORS]


def _int8_name(name: str, int8_tensors: set[str]) -> str | None:
    """The INT8 graph's tensor holding what FP32 tensor `name` holds (its dequantized copy when quantized)."""
    if name + DEQUANT_SUFFIX in int8_tensors:
        return name + DEQUANT_SUFFIX
    return name if name in int8_tensors else None


#: Element-wise activations that follow a Conv/Gemm: a node's noise is measured after them, where its consumers
#: read it (a clipped pre-activation range costs only what survives the activation).
ACTIVATIONS = frozenset({"Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh"})


def _node_models(fp32, nodes: Sequence[str], int8_tensors: set[str]) -> dict[str, tuple]:
    """For each node: an FP32 model of the node alone (plus the activation it feeds, if that is its only
    consumer), the name of its data input, the INT8 tensors holding that input and the chain's output, and
    the FP32 name of the chain's output."""
    from onnx import TensorProto, helper

    by_name = {n.name: n for n in fp32.graph.node}
    inits = {i.name: i for i in fp32.graph.initializer}
    constants = {n.output[0]: n for n in fp32.graph.node if n.op_type == "Constant" and n.output}
    consumers: dict[str, list] = {}
    for n in fp32.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    outputs = {o.name for o in fp32.graph.output}
    built = {}
    for name in nodes:
        node = by_name.get(name)
        if node is None or not node.input or not node.output:
            continue
        chain, end = [node], node.output[0]
        after = consumers.get(end, [])
        if len(after) == 1 and after[0].op_type in ACTIVATIONS and end not in outputs:
            chain.append(after[0])
            end = after[0].output[0]
        data_in = node.input[0]
        int8_in, int8_out = _int8_name(data_in, int8_tensors), _int8_name(end, int8_tensors)
        if int8_in is None or int8_out is None:
            continue
        sub_inits, sub_consts, ok = {}, {}, True
        internal = {data_in} | {t for n in chain[:-1] for t in n.output}
        for n in chain:
            for t in n.input:
                if not t or t in internal:
                    continue
                if t in inits:
                    sub_inits[t] = inits[t]
                elif t in constants:
                    sub_consts[t] = constants[t]
                else:
                    ok = False
        if not ok:
            continue
        graph = helper.make_graph(
            [*sub_consts.values(), *chain],
            f"sensitivity-{name}",
            [helper.make_tensor_value_info(data_in, TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info(end, TensorProto.FLOAT, None)],
            initializer=list(sub_inits.values()),
        )
        model = helper.make_model(graph, opset_imports=list(fp32.opset_import))
        model.ir_version = fp32.ir_version
        built[name] = (model.SerializeToString(), data_in, int8_in, int8_out, end)
    return built


def one_pass_sensitivity(
    prepared_path: Path,
    int8_path: Path,
    nodes: Sequence[str],
    images: np.ndarray,
) -> list[tuple[str, float]]:
    """Nodes ordered from most to least sensitive, from ONE run of the FP32 and ONE of the INT8 model (no
    re-quantization, no run of either whole model per node).

    Both models run once (a few images at a time) with every candidate node's data input and output
    exposed. Each node's own quantization noise is then isolated: its FP32 computation (the node alone, with
    its FP32 weights, plus the activation it feeds) is applied to the very input the INT8 model gave it, and
    compared with what the INT8 model passed on to its consumers, relative to the FP32 model's own signal
    there (not to the node's output on damaged inputs, which can be degenerate)::

        noise = Σ (int8_out − fp32_node(int8_in))² / Σ fp32_out²

    so upstream damage, which both sides share, does not count against the node, while its weight rounding,
    its output range (a pre-activation range stretched over values the activation discards) and the
    re-quantization of the activated output do. Reported in dB as −10·log10(noise) (low = sensitive; a node
    whose tensors could not be matched gets 200 dB and is ranked last).
    """
    from quantize.graph.prepare import load_model

    fp32 = load_model(prepared_path)
    int8 = load_model(int8_path)
    int8_tensors = {t for n in int8.graph.node for t in n.output} | {i.name for i in int8.graph.input}
    built = _node_models(fp32, nodes, int8_tensors)
    input_name = next(
        i.name for i in int8.graph.input if i.name not in {x.name for x in int8.graph.initializer}
    )
    wanted = sorted({t for entry in built.values() for t in entry[2:4]} - {input_name})
    int8_session = _session(_with_outputs(int8, wanted))
    fp32_session = _session(_with_outputs(fp32, sorted({entry[4] for entry in built.values()})))
    del fp32, int8
    node_sessions = {name: _session(entry[0]) for name, entry in built.items()}
    int8_names = [o.name for o in int8_session.get_outputs()]
    fp32_names = [o.name for o in fp32_session.get_outputs()]
    err2 = dict.fromkeys(built, 0.0)
    ref2 = dict.fromkeys(built, 0.0)
    # A few images at a time: with every candidate exposed, one batch's activations are large.
    for start in range(0, len(images), 4):
        chunk = images[start : start + 4]
        approx = dict(zip(int8_names, _run_all(int8_session, input_name, chunk), strict=True))
        approx[input_name] = chunk
        truth = dict(zip(fp32_names, _run_all(fp32_session, input_name, chunk), strict=True))
        for name, (_model, data_in, int8_in, int8_out, end) in built.items():
            reference = (
                node_sessions[name].run(None, {data_in: approx[int8_in]})[0].astype(np.float64).ravel()
            )
            diff = approx[int8_out].astype(np.float64).ravel() - reference
            err2[name] += float(diff @ diff)
            signal = truth[end].astype(np.float64).ravel()
            ref2[name] += float(signal @ signal)
        del approx, truth
    scores = []
    for name in nodes:
        if name not in built:
            scores.append((name, 200.0))
            continue
        noise = err2[name] / max(ref2[name], np.finfo(np.float64).tiny)
        scores.append((name, 200.0 if noise <= 1e-20 else min(200.0, -10.0 * math.log10(noise))))
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
    holdout_samples: Sequence[Sample] = (),
    workers: int | None = None,
    eval_batch: int = 32,
    progress: Progress | None = None,
) -> tuple[QuantRecipe, TuneReport]:
    """Run the fallback loop; return the recipe to publish (its exclude_nodes = the chosen fallbacks).

    Reads only `request.tune_samples`, `holdout_samples` (held-back calibration images, labels ignored) and
    `sensitivity_samples` (calibration images), less any of `request.never_use` (the confirmation images,
    which are named only to be left out: --calib and --val may share images).
    """
    from quantize.measure.bench import bench_models
    from quantize.measure.validate import _identity

    progress = progress or NO_PROGRESS
    started = time.perf_counter()
    forbidden = {_identity(Path(p)) for p in request.never_use}
    holdout_samples = [s for s in holdout_samples if _identity(Path(s.path)) not in forbidden]
    sensitivity_samples = [
        s for s in sensitivity_samples if _identity(Path(s.path)) not in forbidden
    ] or list(request.tune_samples)
    pool = pool_samples(request.tune_samples, holdout_samples)
    fp32_run = run_pool(fp32_path, pool, spec, eval_batch, workers, request.ray)
    labelled = fp32_run.labels >= 0
    offset = 1 if fp32_run.logits.shape[1] == 1001 else 0
    fp32_top1 = 100.0 * float(
        (np.argmax(fp32_run.logits[:, offset:], axis=1) == fp32_run.labels)[labelled].mean()
    )
    report = TuneReport(
        backend=recipe.backend,
        max_drop_pt=request.max_drop_pt,
        tune_images=int(labelled.sum()),
        fp32_top1=fp32_top1,
        pool_images=len(fp32_run.paths),
        holdout_images=int((~labelled).sum()),
    )
    step_models: list[Path] = []
    loss_per_disagreement: list[float] = []

    def measure(step: int, fallback: list[str], added: str | None) -> TuneStep:
        t0 = time.perf_counter()
        path = workdir / f"tune-step{step}.onnx"
        step_recipe = recipe.with_changes(exclude_nodes=recipe.exclude_nodes + tuple(fallback))
        quantize_to(step_recipe, path)
        figures = step_figures(fp32_run, run_pool(path, pool, spec, eval_batch, workers, request.ray))
        if not loss_per_disagreement:  # fixed once, at step 0 (see the module docstring)
            ratio = (
                figures.labelled_net_loss / figures.labelled_disagreements
                if figures.labelled_disagreements
                else 0.0
            )
            loss_per_disagreement.append(max(ratio, 0.0))
        predicted = 100.0 * figures.disagreement_rate * loss_per_disagreement[0]
        step_models.append(path)
        progress.note(
            f"tune step {step}: {len(fallback)} node(s) in FP32, agreement {figures.agreement_pct:.2f}% on "
            f"{report.pool_images} images, drop {figures.drop_pt:.2f} pt on {report.tune_images} labelled "
            f"(predicted {predicted:.2f} pt)"
        )
        return TuneStep(
            step,
            list(fallback),
            added,
            figures.top1,
            figures.drop_pt,
            time.perf_counter() - t0,
            agreement_pct=figures.agreement_pct,
            softmax_kl=figures.softmax_kl,
            logits_sqnr_db=figures.logits_sqnr_db,
            predicted_drop_pt=predicted,
        )

    def meets(step: TuneStep) -> bool:
        return step.drop_pt <= request.max_drop_pt and (step.predicted_drop_pt or 0.0) <= request.max_drop_pt

    report.steps.append(measure(0, [], None))
    report.loss_per_disagreement = loss_per_disagreement[0]
    if not meets(report.steps[0]):
        progress.note("ranking nodes by sensitivity (one pass of FP32 and INT8, every candidate exposed)")
        nodes = candidate_nodes(prepared_path, recipe)
        if any(not n for n in nodes):
            raise RqInputError("the model has unnamed nodes; rq cannot fall them back by name")
        images = _decode(sensitivity_samples, spec, request.sensitivity_images, workers)
        report.sensitivity = one_pass_sensitivity(prepared_path, step_models[0], nodes, images)
        fallback: list[str] = []
        # At least one node stays quantized: falling back every node would publish an FP32 copy.
        for node, _score in report.sensitivity[: min(request.max_trials, len(nodes) - 1)]:
            fallback.append(node)
            step = measure(len(report.steps), fallback, node)
            report.steps.append(step)
            if meets(step):
                break
    met = [s for s in report.steps if meets(s)]
    if met:
        chosen = met[0]
        report.goal_met = True
    else:
        chosen = max(report.steps, key=lambda s: (s.agreement_pct, -(s.softmax_kl or 0.0), -len(s.fallback)))
        report.notes.append(
            f"no step reached a drop ≤ {request.max_drop_pt:.2f} pt (measured and predicted) within "
            f"{len(report.steps) - 1} fallback(s); kept the most faithful: step {chosen.step}, agreement "
            f"{chosen.agreement_pct:.2f}%, drop {chosen.drop_pt:.2f} pt on the tuning images"
        )
    report.chosen = chosen.step
    if len(step_models) > 1 and request.bench_runs > 0:
        progress.note("bench: FP32 and every tuning step, interleaved (batch 1)")
        bench = bench_models(
            [fp32_path, *step_models],
            batch_sizes=(1,),
            runs=request.bench_runs,
            warmup=2,
            image_shape=spec.input_shape(1)[1:],  # the size the images have (a model may leave H/W free)
        )
        for row in bench.rows:
            if row.model_index > 0:
                report.steps[row.model_index - 1].speed_ratio = {str(row.batch): round(row.ratio_to_first, 4)}
    report.seconds = time.perf_counter() - started
    return recipe.with_changes(exclude_nodes=recipe.exclude_nodes + tuple(chosen.fallback)), report
