"""`rq sweep`: quantize, validate and benchmark a grid of recipes; one report, the Pareto front marked.

The model is prepared once and each distinct calibration (method, percentile, bins, sample) runs once; every
recipe then only re-quantizes. Each finished recipe is cached under `<report-dir>/.sweep-cache/<key>/` (its
INT8 model, per-image predictions, and a summary keyed by the recipe's digest), where the key covers the model
file, the preprocessing, the calibration and validation image lists, the labels files' contents and the
versions of rq and its runtime (`cache_key`): an interrupted sweep resumes where it stopped, and a changed
input starts a fresh cache. Benchmarks are not cached: the models are benchmarked
together, interleaved, at the end, so that the machine's drift hits them all alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration import PreprocessSpec, discover_dataset, select_samples
from calibration.errors import RqInputError
from quantize.bench import BenchResult, bench_models
from quantize.cpu import CpuInfo, advise_int8, detect_cpu
from quantize.evaluate import evaluate
from quantize.fetch import sha256_file
from quantize.files import atomic_output, atomic_write_text, work_folder
from quantize.ort_backend import QuantizedOps
from quantize.pipeline import (
    CalibrationRun,
    Progress,
    calibration_key,
    check_spec_matches,
    file_list_sha256,
    quantize_prepared,
    run_calibration,
)
from quantize.prepare import prepare_model
from quantize.recipe import QuantRecipe
from quantize.stats import paired_drop
from quantize.validate import count_overlap, validation_samples

#: Conv/Gemm/MatMul only: the placement rq used before it decided from the graph (kept as the comparison).
LEGACY_OP_TYPES = ("Conv", "Gemm", "MatMul")

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

    The labels files count by content (a corrected labels file changes every accuracy), and the versions of
    rq, ONNX Runtime (which quantizes and runs the models), onnx and, when the grid uses it, INC count too:
    a cached result is never reused under another runtime."""
    import onnx
    import onnxruntime

    from quantize import __version__

    versions = {"rq": __version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}
    if "inc" in backends:
        from quantize.inc_backend import require_inc

        versions["neural-compressor"] = require_inc()
    material = json.dumps(
        {
            "model": sha256_file(model),
            "spec": spec.to_dict(),
            "calib": file_list_sha256(calib_files, calib_root),
            "val": file_list_sha256(val_files, val_root),
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
    log: Callable[[str], None] = lambda _msg: None,
    progress: Progress | None = None,
    ray=None,
) -> SweepResult:
    """`ray`: a `quantize.distributed.RayRunner`: every validation pass runs on the cluster through Ray Data
    and each uncached recipe's quantization is a Ray task (submitted together after the calibrations, which
    run once per calibration key here and are shared); finished recipes are cached as without Ray."""
    model = Path(model)
    base = base or QuantRecipe()
    spec = spec or PreprocessSpec()
    cpu = cpu or detect_cpu()
    recipes = grid_recipes(grid, base, cpu)
    if any(r.backend == "inc" for r in recipes):
        from quantize.inc_backend import require_inc

        require_inc()
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
        log("prepare")
        prepared = prepare_model(model, workdir)
        check_spec_matches(prepared.signature, spec)
        seconds["prepare"] = time.perf_counter() - started

        fp32_cache = cache_dir / "fp32.npz"
        if fp32_cache.is_file():
            data = np.load(fp32_cache)
            fp32_pred, fp32_top5, labels_arr = data["predictions"], data["top5"], data["labels"]
            val_skipped = [(Path(p), r) for p, r in json.loads(str(data["skipped"]))]
        else:
            log("validate FP32")
            started = time.perf_counter()
            run = evaluate([model], val_set, spec, batch_size=eval_batch, workers=workers, ray=ray)
            seconds["validate FP32"] = time.perf_counter() - started
            fp32_pred, fp32_top5, labels_arr = (
                run.models[0].predictions,
                run.models[0].correct_top5,
                run.labels,
            )
            val_skipped = list(run.skipped)
            # The images the FP32 pass could not read go into the same file (one atomic write), as JSON: a
            # rerun served from the cache reports them too.
            skipped_json = np.array(json.dumps([[str(p), r] for p, r in val_skipped]))
            _save_npz(
                fp32_cache, predictions=fp32_pred, top5=fp32_top5, labels=labels_arr, skipped=skipped_json
            )

        calibrations: dict[tuple, CalibrationRun] = {}
        calibration_seconds: dict[tuple, float] = {}
        entries: list[SweepEntry] = []
        calib_summary: dict = {}
        jobs = None
        if ray is not None:
            from quantize.distributed import QuantizeJobs

            jobs = QuantizeJobs(ray, prepared)
            for recipe in recipes:
                digest = recipe.digest()
                if all((cache_dir / f"{digest}{ext}").is_file() for ext in (".onnx", ".json", ".npz")):
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
            npz_path = cache_dir / f"{digest}.npz"
            if onnx_path.is_file() and summary_path.is_file() and npz_path.is_file():
                summary = json.loads(summary_path.read_text())
                calib_summary = summary.get("calibration") or calib_summary
                data = np.load(npz_path)
                entries.append(
                    SweepEntry(
                        recipe, onnx_path, summary["quantized_ops"], data["predictions"], data["top5"], True
                    )
                )
                log(f"[{index}/{len(recipes)}] {variant_name(recipe)}: cached")
                continue
            log(f"[{index}/{len(recipes)}] {variant_name(recipe)}")
            timing: dict[str, float] = {}
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
                "images_used": calibration.used,
                "skipped": [[str(p), r] for p, r in calibration.skipped],
                "file_list_sha256": file_list_sha256(calibration.files(), calib_dataset.root),
                "seconds": round(calibration.seconds, 3),
            }
            started = time.perf_counter()
            if jobs is not None and digest in jobs:
                ops, timing["quantize"] = jobs.collect(digest, onnx_path)
            else:
                ops: QuantizedOps = quantize_prepared(prepared, calibration, recipe, spec, onnx_path, workdir)
                timing["quantize"] = time.perf_counter() - started
            started = time.perf_counter()
            run = evaluate([onnx_path], val_set, spec, batch_size=eval_batch, workers=workers, ray=ray)
            timing["validate"] = time.perf_counter() - started
            if not np.array_equal(run.labels, labels_arr):
                raise RqInputError(
                    "validation images changed during the sweep; delete the sweep cache and rerun"
                )
            pred, top5 = run.models[0].predictions, run.models[0].correct_top5
            _save_npz(npz_path, predictions=pred, top5=top5)
            summary = {
                "recipe": recipe.to_dict(),
                "quantized_ops": ops.to_dict(),
                "seconds": timing,
                "calibration": calib_summary,
            }
            atomic_write_text(summary_path, json.dumps(summary, indent=2))
            entries.append(SweepEntry(recipe, onnx_path, ops.to_dict(), pred, top5, False, timing))

    bench = None
    if bench_batches:
        log("bench (FP32 and every INT8 variant, interleaved)")
        started = time.perf_counter()
        bench = bench_models(
            [model] + [e.model_path for e in entries], batch_sizes=bench_batches, runs=bench_runs
        )
        seconds["bench"] = time.perf_counter() - started

    validate_seconds = sum(e.seconds.get("validate", 0.0) for e in entries)
    validated_images = len(labels_arr) * sum(1 for e in entries if "validate" in e.seconds)
    # The calibration sample every recipe of the grid used (they share samples and seed).
    calibration_files = [s.path for s in select_samples(calib_dataset, base.samples, base.seed)]
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
    )


def sweep_report(result: SweepResult, command: list[str], grid: str) -> dict:
    from quantize.report_data import bench_by_batch, build_report, variant

    labels = result.labels
    fp32_correct = result.fp32_predictions == labels
    variants = [
        variant(
            "FP32",
            "fp32",
            result.model,
            accuracy={
                "top1": round(100 * float(fp32_correct.mean()), 4),
                "top5": round(100 * float(result.fp32_top5_correct.mean()), 4),
                "images": len(labels),
            },
            bench=bench_by_batch(result.bench, 0),
        )
    ]
    for i, entry in enumerate(result.entries, 1):
        correct = entry.predictions == labels
        drop = paired_drop(
            fp32_correct, correct, disagreements=int((entry.predictions != result.fp32_predictions).sum())
        )
        name = variant_name(entry.recipe)
        if any(
            v["name"] == name for v in variants
        ):  # labels that leave a varied field out: keep names unique
            name = f"{name} ({entry.recipe.digest()[:6]})"
        item = variant(
            name,
            "int8",
            entry.model_path,
            recipe=entry.recipe,
            accuracy={
                "top1": round(100 * float(correct.mean()), 4),
                "top5": round(100 * float(entry.top5_correct.mean()), 4),
                "images": len(labels),
            },
            drop=drop,
            bench=bench_by_batch(result.bench, i),
        )
        item["quantized_ops"] = entry.quantized_ops
        item["cached"] = entry.cached
        variants.append(item)
    notes = [f"grid {grid!r}: {len(result.entries)} recipes; cache {result.cache_dir}"]
    dropped = unsupported_values(grid, result.entries[0].recipe if result.entries else QuantRecipe())
    if dropped:
        notes.append(f"left out of the grid (this rq's recipe does not support them): {dropped}")
    cached = sum(e.cached for e in result.entries)
    if cached:
        notes.append(f"{cached} recipe(s) reused from the cache of an earlier (interrupted) sweep")
    return build_report(
        command=command,
        model=result.model,
        cpu=result.cpu,
        advice=advise_int8(result.cpu),
        prepared=result.prepared,
        variants=variants,
        calibration=result.calibration or None,
        validation=None,
        gate=None,
        bench=result.bench,
        stages=result.seconds,
        notes=notes,
        label=f"sweep-{grid}",
    ) | {"validation": result.validation}
