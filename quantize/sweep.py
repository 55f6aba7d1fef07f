"""`rq sweep`: quantize, validate and benchmark a grid of recipes; one report, the Pareto front marked.

The model is prepared once and each distinct calibration (method, percentile, bins, sample) runs once; every
recipe then only re-quantizes. Each finished recipe is cached under `<report-dir>/.sweep-cache/<key>/` (its
INT8 model, per-image predictions, and a summary keyed by the recipe's digest), where the key covers the model
file, the preprocessing, the calibration and validation images (name, size, time) and labels (content), the
versions of rq and its runtime (`cache_key`): an interrupted sweep resumes where it stopped, and a changed
input starts a fresh cache. With several runtimes (`runtimes`, like `--runtime` on bench/eval) every recipe's
one INT8 file is validated and benchmarked in each; its predictions are cached per runtime and runtime version
(`<digest>.<runtime tag>.npz`, see `runtime_tag`). Benchmarks are not cached: the models are benchmarked
together, interleaved, at the end, so that the machine's drift hits them all alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration import PreprocessSpec, discover_dataset, select_samples
from calibration.errors import RqInputError
from calibration.progress import NO_PROGRESS, Progress
from quantize import backends as registry
from quantize.backends.ort import QuantizedOps
from quantize.fetch import sha256_file
from quantize.files import atomic_output, atomic_write_text, work_folder
from quantize.graph.prepare import prepare_model
from quantize.measure.bench import BenchResult, bench_models
from quantize.measure.cpu import CpuInfo, advise_int8, detect_cpu
from quantize.measure.evaluate import evaluate
from quantize.measure.validate import count_overlap, validation_samples
from quantize.pipeline import (
    CalibrationRun,
    calibration_key,
    check_spec_matches,
    file_list_sha256,
    file_states_sha256,
    quantize_prepared,
    run_calibration,
)
from quantize.recipe import LEGACY_OP_TYPES, QuantRecipe

GRIDS: dict[str, dict[str, tuple]] = {
    # The default grid answers the questions that decide INT8 accuracy on CNNs now: where the quantize nodes
    # go (placement from the graph, `op_types=None`, against the legacy Conv/Gemm/MatMul list), whether the
    # bias correction helps, and which range estimator suits a small calibration set. Values the installed
    # recipe does not know are dropped (see `supported_axes`), so the grid never names an invalid recipe.
    "default": {
        "op_types": (None, LEGACY_OP_TYPES),
        "bias_correction": (True, False),
        "calibration": ("percentile", "mean-minmax", "mse"),
    },
    "full": {
        "op_types": (None, LEGACY_OP_TYPES),
        "bias_correction": (True, False),
        "per_channel": (True, False),
        "reduce_range": (False, True),
        "calibration": ("minmax", "entropy", "percentile", "mean-minmax", "mse"),
    },
    "calibration": {"calibration": ("minmax", "entropy", "percentile")},
    # The range estimators only, at rq's default placement.
    "ranges": {"calibration": ("minmax", "entropy", "percentile", "mean-minmax", "mse")},
    # Weight format questions: per-channel scales and 7-bit weights (the grid rq's default used to be).
    "weights": {"per_channel": (True, False), "reduce_range": (False, True)},
    # INC and ONNX Runtime side by side: same calibration images, same validation images, same recipe.
    "parity": {"backend": ("ort", "inc"), "calibration": ("minmax", "percentile")},
    "formats": {"format": ("qdq", "qoperator"), "per_channel": (True, False)},
}


def _accepts(base: QuantRecipe, name: str, value) -> bool:
    """Whether the recipe class of `base` has field `name` and accepts `value` for it."""
    if name not in {f.name for f in dataclasses.fields(base)}:
        return False
    changes = {name: value}
    if name == "calibration" and value == "minmax":
        changes["num_bins"] = None
    try:
        base.with_changes(**changes)
    except (RqInputError, TypeError, ValueError):
        return False
    return True


def supported_axes(name: str, base: QuantRecipe) -> dict[str, tuple]:
    """The grid's axes restricted to fields and values this rq's recipe supports (an axis left with one value
    or none is dropped: it would not vary). Raises for an unknown grid name."""
    if name not in GRIDS:
        raise RqInputError(f"unknown grid {name!r}; choose one of {', '.join(GRIDS)}")
    axes = {}
    for key, values in GRIDS[name].items():
        kept = tuple(v for v in values if _accepts(base, key, v))
        if len(kept) >= 2 or (kept and len(values) == 1):
            axes[key] = kept
    return axes


def unsupported_values(name: str, base: QuantRecipe) -> str:
    """The grid's axis values `supported_axes` leaves out, in words ("" when none)."""
    if name not in GRIDS:
        return ""
    parts = []
    for key, values in GRIDS[name].items():
        missing = [v for v in values if not _accepts(base, key, v)]
        if missing:
            parts.append(f"{key} = {', '.join('graph placement' if v is None else str(v) for v in missing)}")
    return "; ".join(parts)


def grid_recipes(name: str, base: QuantRecipe, cpu: CpuInfo) -> list[QuantRecipe]:
    axes = supported_axes(name, base)
    keys = list(axes)
    recipes = []
    for values in itertools.product(*(axes[k] for k in keys)):
        changes = dict(zip(keys, values, strict=True))
        if changes.get("calibration") == "minmax":
            changes["num_bins"] = None  # bins belong to the histogram methods only
        recipe = base.with_changes(**changes)
        if recipe.reduce_range is None:
            recipe = recipe.with_changes(reduce_range=advise_int8(cpu).reduce_range)
        if recipe not in recipes:
            recipes.append(recipe)
    return recipes


def variant_name(recipe: QuantRecipe) -> str:
    """`INT8 <label>`; the recipe's label names placement and bias correction when they differ from the
    defaults (quantize.recipe), so the recipes of a grid have distinct names."""
    return f"INT8 {recipe.label()}"


@dataclass
class SweepEntry:
    recipe: QuantRecipe
    model_path: Path
    quantized_ops: dict
    predictions: np.ndarray
    top5_correct: np.ndarray
    cached: bool
    seconds: dict[str, float] = field(default_factory=dict)
    runtime: str = "ort"  # the runtime these predictions came from (one entry per recipe and runtime)
    model_index: int = 0  # the recipe's model in the benchmark (1-based; 0 is FP32)


@dataclass
class SweepResult:
    model: Path
    cpu: CpuInfo
    entries: list[SweepEntry]
    fp32_predictions: np.ndarray
    fp32_top5_correct: np.ndarray
    labels: np.ndarray
    bench: BenchResult | None
    calibration: dict
    validation: dict
    prepared: object
    cache_dir: Path
    seconds: dict[str, float]
    runtimes: list[str] = field(default_factory=lambda: ["ort"])
    # FP32 (predictions, top-5 correctness) per runtime; the first runtime's are fp32_predictions above.
    fp32_by_runtime: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    preprocess: dict | None = None  # the PreprocessSpec every image went through, as a dict


def runtime_tag(name: str) -> str:
    """The cache files' name for predictions made in runtime `name`: its name and a digest of its version
    (an upgraded runtime computes, and is cached, anew)."""
    from quantize.measure import runtimes as runtimes_mod

    version = runtimes_mod.get(name).version()
    return f"{name}-{hashlib.sha256(version.encode()).hexdigest()[:8]}"


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_output(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def cache_key(
    model: Path,
    spec: PreprocessSpec,
    *,
    calib_files: list[Path],
    calib_root: Path,
    val_files: list[Path],
    val_root: Path,
    labels: Path | None,
    val_labels: Path | None,
    backends: set[str],
) -> str:
    """The sweep cache's folder name: everything a cached result depends on, besides the recipe itself.

    The images count by name, size, modification time and inode (an image replaced under the same name changes
    the results; their bytes are not read), the labels files by content, and the versions of
    rq, ONNX Runtime (which quantizes and runs the models), onnx and, when the grid uses it, INC count too:
    a cached result is never reused under another runtime."""
    import onnx
    import onnxruntime

    from quantize import __version__

    versions = {"rq": __version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}
    for name in sorted(backends):
        versions.update(registry.get(name).versions())
    material = json.dumps(
        {
            "model": sha256_file(model),
            "spec": spec.to_dict(),
            "calib": file_states_sha256(calib_files, calib_root),
            "val": file_states_sha256(val_files, val_root),
            "labels": sha256_file(Path(labels)) if labels is not None else None,
            "val_labels": sha256_file(Path(val_labels)) if val_labels is not None else None,
            "versions": versions,
        },
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def run_sweep(
    model: Path,
    calib: Path,
    val: Path,
    *,
    grid: str = "default",
    base: QuantRecipe | None = None,
    spec: PreprocessSpec | None = None,
    labels: Path | None = None,
    val_labels: Path | None = None,
    val_limit: int | None = None,
    report_dir: Path = Path("reports"),
    bench_batches: list[int] | None = None,
    bench_runs: int = 20,
    eval_batch: int = 32,
    workers: int | None = None,
    cpu: CpuInfo | None = None,
    progress: Progress | None = None,
    ray=None,
    runtimes: Sequence[str] = ("ort",),
) -> SweepResult:
    """`ray`: a `quantize.distributed.RayRunner`: every validation pass runs on the cluster through Ray Data
    and each uncached recipe's quantization is a Ray task (submitted together after the calibrations, which
    run once per calibration key here and are shared); finished recipes are cached as without Ray.

    `runtimes`: the runtimes (quantize.measure.runtimes names) every model is validated and benchmarked in; entries
    come recipe by recipe, one per runtime in this order."""
    model = Path(model)
    progress = progress or NO_PROGRESS
    base = base or QuantRecipe()
    spec = spec or PreprocessSpec()
    cpu = cpu or detect_cpu()
    from quantize.measure import runtimes as runtimes_mod

    runtimes = runtimes_mod.parse(list(runtimes))
    if ray is not None and runtimes != ["ort"]:
        raise RqInputError("--ray runs models in onnxruntime only; drop --runtime or --ray")
    tags = {rt: runtime_tag(rt) for rt in runtimes}
    recipes = grid_recipes(grid, base, cpu)
    for name in dict.fromkeys(r.backend for r in recipes):
        registry.get(name).require()  # before any work: a missing extra fails at once
    calib_dataset = discover_dataset(calib, labels)
    val_dataset, val_set = validation_samples(val, val_labels, val_limit)
    seconds: dict[str, float] = {}

    cache_name = cache_key(
        model,
        spec,
        calib_files=[s.path for s in calib_dataset.samples],
        calib_root=calib_dataset.root,
        val_files=[s.path for s in val_set],
        val_root=val_dataset.root,
        labels=labels,
        val_labels=val_labels,
        backends={r.backend for r in recipes},
    )
    cache_dir = Path(report_dir) / ".sweep-cache" / cache_name
    cache_dir.mkdir(parents=True, exist_ok=True)

    with work_folder("rq-sweep-") as workdir:
        started = time.perf_counter()
        progress.stage("prepare")
        prepared = prepare_model(model, workdir)
        check_spec_matches(prepared.signature, spec)
        seconds["prepare"] = time.perf_counter() - started

        def where(rt: str) -> str:
            return "" if rt == runtimes[0] else f" · {rt}"

        val_skipped: list[tuple[Path, str]] = []
        labels_arr = None
        fp32_by_runtime: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for rt in runtimes:
            fp32_cache = cache_dir / f"fp32.{tags[rt]}.npz"
            if fp32_cache.is_file():
                data = np.load(fp32_cache)
                pred, top5, rt_labels = data["predictions"], data["top5"], data["labels"]
                rt_skipped = [(Path(p), r) for p, r in json.loads(str(data["skipped"]))]
            else:
                progress.stage(f"validate FP32{where(rt)}")
                started = time.perf_counter()
                run = evaluate(
                    [model], val_set, spec, batch_size=eval_batch, workers=workers, ray=ray, runtime=rt
                )
                seconds[f"validate FP32{where(rt)}"] = time.perf_counter() - started
                pred, top5, rt_labels = run.models[0].predictions, run.models[0].correct_top5, run.labels
                rt_skipped = list(run.skipped)
                # The images the FP32 pass could not read go into the same file (one atomic write), as JSON: a
                # rerun served from the cache reports them too.
                skipped_json = np.array(json.dumps([[str(p), r] for p, r in rt_skipped]))
                _save_npz(fp32_cache, predictions=pred, top5=top5, labels=rt_labels, skipped=skipped_json)
            if labels_arr is None:
                labels_arr, val_skipped = rt_labels, rt_skipped
            elif not np.array_equal(rt_labels, labels_arr):
                raise RqInputError(
                    "validation images changed during the sweep; delete the sweep cache and rerun"
                )
            fp32_by_runtime[rt] = (pred, top5)
        fp32_pred, fp32_top5 = fp32_by_runtime[runtimes[0]]

        calibrations: dict[tuple, CalibrationRun] = {}
        calibration_seconds: dict[tuple, float] = {}
        entries: list[SweepEntry] = []
        model_paths: list[Path] = []
        calib_summary: dict = {}
        jobs = None
        if ray is not None:
            from quantize.distributed import QuantizeJobs

            jobs = QuantizeJobs(ray, prepared)
            for recipe in recipes:
                digest = recipe.digest()
                if all((cache_dir / f"{digest}{ext}").is_file() for ext in (".onnx", ".json")):
                    continue
                key = calibration_key(recipe)
                if key not in calibrations:
                    started = time.perf_counter()
                    calibrations[key] = run_calibration(
                        prepared, calib_dataset, recipe, spec, workdir, workers=workers, progress=progress
                    )
                    calibration_seconds[key] = time.perf_counter() - started
                jobs.submit(digest, calibrations[key], recipe, spec)
        for index, recipe in enumerate(recipes, 1):
            digest = recipe.digest()
            onnx_path = cache_dir / f"{digest}.onnx"
            summary_path = cache_dir / f"{digest}.json"
            npz_paths = {rt: cache_dir / f"{digest}.{tags[rt]}.npz" for rt in runtimes}
            model_paths.append(onnx_path)
            model_cached = onnx_path.is_file() and summary_path.is_file()
            timing: dict[str, float] = {}
            if model_cached:
                summary = json.loads(summary_path.read_text())
                calib_summary = summary.get("calibration") or calib_summary
                ops_dict = summary["quantized_ops"]
                if all(p.is_file() for p in npz_paths.values()):
                    progress.stage(f"[{index}/{len(recipes)}] {variant_name(recipe)}: cached")
                else:
                    progress.stage(f"[{index}/{len(recipes)}] {variant_name(recipe)}: cached model, validate")
            else:
                progress.stage(f"[{index}/{len(recipes)}] {variant_name(recipe)}")
                key = calibration_key(recipe)
                if key in calibration_seconds:
                    timing["calibrate"] = calibration_seconds.pop(key)
                if key not in calibrations:
                    started = time.perf_counter()
                    calibrations[key] = run_calibration(
                        prepared, calib_dataset, recipe, spec, workdir, workers=workers, progress=progress
                    )
                    timing["calibrate"] = time.perf_counter() - started
                calibration = calibrations[key]
                calib_summary = {
                    "folder": str(calib_dataset.root),
                    "layout": calib_dataset.layout,
                    "images_requested": len(calibration.samples),
                    "images_used": calibration.used,
                    "skipped": [[str(p), r] for p, r in calibration.skipped],
                    "replaced": [[str(old), str(new)] for old, new in calibration.replaced],
                    "file_list_sha256": file_list_sha256(calibration.files(), calib_dataset.root),
                    "seconds": round(calibration.seconds, 3),
                }
                started = time.perf_counter()
                if jobs is not None and digest in jobs:
                    ops, timing["quantize"] = jobs.collect(digest, onnx_path)
                else:
                    ops: QuantizedOps = quantize_prepared(
                        prepared, calibration, recipe, spec, onnx_path, workdir
                    )
                    timing["quantize"] = time.perf_counter() - started
                ops_dict = ops.to_dict()
                summary = {
                    "recipe": recipe.to_dict(),
                    "quantized_ops": ops_dict,
                    "seconds": timing,
                    "calibration": calib_summary,
                }
                atomic_write_text(summary_path, json.dumps(summary, indent=2))
            # The one INT8 file, validated in every runtime (its predictions cached per runtime and version).
            for rt in runtimes:
                npz_path = npz_paths[rt]
                rt_timing = dict(timing) if rt == runtimes[0] else {}
                if npz_path.is_file():
                    data = np.load(npz_path)
                    pred, top5 = data["predictions"], data["top5"]
                    cached = model_cached
                else:
                    started = time.perf_counter()
                    run = evaluate(
                        [onnx_path],
                        val_set,
                        spec,
                        batch_size=eval_batch,
                        workers=workers,
                        ray=ray,
                        runtime=rt,
                    )
                    rt_timing["validate"] = time.perf_counter() - started
                    if not np.array_equal(run.labels, labels_arr):
                        raise RqInputError(
                            "validation images changed during the sweep; delete the sweep cache and rerun"
                        )
                    pred, top5 = run.models[0].predictions, run.models[0].correct_top5
                    _save_npz(npz_path, predictions=pred, top5=top5)
                    cached = False
                entries.append(
                    SweepEntry(recipe, onnx_path, ops_dict, pred, top5, cached, rt_timing, rt, index)
                )

    bench = None
    if bench_batches:
        where_all = "" if runtimes == ["ort"] else f" in {', '.join(runtimes)}"
        progress.stage(f"bench (FP32 and every INT8 variant, interleaved{where_all})")
        started = time.perf_counter()
        bench = bench_models(
            [model, *model_paths],
            batch_sizes=bench_batches,
            runs=bench_runs,
            runtimes=runtimes,
            image_shape=spec.input_shape(1)[1:],  # the size the images have (a model may leave H/W free)
        )
        seconds["bench"] = time.perf_counter() - started

    validate_seconds = sum(e.seconds.get("validate", 0.0) for e in entries)
    validated_images = len(labels_arr) * sum(1 for e in entries if "validate" in e.seconds)
    # The calibration sample every recipe of the grid used (they share samples and seed).
    calibration_files = [s.path for s in select_samples(calib_dataset, base.samples, base.seed)]
    # …and the images that replaced its unreadable ones (the summary is a cached entry's when nothing ran).
    calibration_files += [Path(new) for _, new in calib_summary.get("replaced") or []]
    val_summary = {
        "folder": str(val_dataset.root),
        "layout": val_dataset.layout,
        "images": len(labels_arr),
        "skipped": [[str(p), r] for p, r in val_skipped],
        "overlap_with_calibration": count_overlap(calibration_files, [s.path for s in val_set]),
        # None when every recipe came from the cache: nothing was validated (or timed) in this run.
        "images_per_s": round(validated_images / validate_seconds, 2) if validate_seconds else None,
        "seconds": round(validate_seconds, 3) if validate_seconds else None,
    } | ({"cluster": ray.connect().to_dict()} if ray is not None else {})
    return SweepResult(
        model=model,
        cpu=cpu,
        entries=entries,
        fp32_predictions=fp32_pred,
        fp32_top5_correct=fp32_top5,
        labels=labels_arr,
        bench=bench,
        calibration=calib_summary,
        validation=val_summary,
        prepared=prepared,
        cache_dir=cache_dir,
        seconds=seconds,
        runtimes=runtimes,
        fp32_by_runtime=fp32_by_runtime,
        preprocess=spec.to_dict(),
    )
