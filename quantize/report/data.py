"""Assemble `report.json` (schema rq.report/1) from the results of the stages; validation, writing and rendering are quantize.report.

Every report rq writes is assembled here: `quantize_report` (rq quantize, quantize.run), `sweep_report`
(rq sweep) and `inspect_report` (rq inspect), all on `build_report`.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import re
import secrets
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from quantize import __version__
from quantize.backends.ort import QuantizedOps
from quantize.fetch import sha256_file
from quantize.graph.channel_pad import describe_channel_pads
from quantize.graph.prepare import PreparedModel
from quantize.measure.bench import BenchResult
from quantize.measure.cpu import CpuInfo, IntegerKernelAdvice
from quantize.measure.stats import PairedDrop, pareto_front
from quantize.measure.validate import Gate, Validation
from quantize.recipe import QuantRecipe
from quantize.report.plot import speed_key, speedup
from quantize.report.schema import SCHEMA

PACKAGES = (
    "onnxruntime",
    "onnx",
    "numpy",
    "pillow",
    "typer",
    "rich",
    "matplotlib",
    "neural-compressor",
    "openvino",
    "onnxruntime-openvino",
)


def package_versions() -> dict[str, str]:
    versions = {"rq-quant": __version__, "python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def run_id(model: Path, label: str) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{Path(model).stem}-{label}")
    # The random part keeps two runs started within the same second from sharing (overwriting) a folder.
    return f"{stamp}-{secrets.token_hex(3)}-{safe}"


def cpu_section(cpu: CpuInfo) -> dict:
    return cpu.to_dict()  # its `isa` holds the flags the report states (once)


def bench_by_batch(bench: BenchResult | None, model_index: int, runtime: str | None = None) -> dict | None:
    """A variant's figures per batch in `runtime` (default: the first benchmarked); ``ratio_to_fp32`` is
    against FP32 in the same runtime, ``ratio_to_ort_fp32`` against FP32 in ONNX Runtime (when measured)."""
    if bench is None:
        return None
    runtime = runtime or (bench.runtimes[0] if bench.runtimes else "ort")
    out = {}
    for row in bench.rows:
        if row.model_index == model_index and row.runtime == runtime:
            figures = {
                "median_ms": round(row.median_ms, 4),
                "p90_ms": round(row.p90_ms, 4),
                "images_per_s": round(row.images_per_s, 3),
                "ratio_to_fp32": round(row.ratio_to_first, 4),
                "runtime": row.runtime,
                "precision": row.precision,
            }
            if row.ratio_to_ort_first is not None:
                figures["ratio_to_ort_fp32"] = round(row.ratio_to_ort_first, 4)
            if row.ratio_interval is not None:
                figures["ratio_to_fp32_interval"] = [round(x, 4) for x in row.ratio_interval]
            out[str(row.batch)] = figures
    return out or None


def variant(
    name: str,
    kind: str,
    path: Path | None,
    *,
    recipe: QuantRecipe | None = None,
    quantized_ops: QuantizedOps | None = None,
    accuracy: dict | None = None,
    drop: PairedDrop | None = None,
    bench: dict | None = None,
    sha256: str | None = None,
) -> dict:
    return {
        "name": name,
        "kind": kind,
        "recipe": recipe.to_dict() if recipe else None,
        "path": str(path) if path else None,
        "sha256": sha256 or (sha256_file(path) if path and Path(path).is_file() else None),
        "size_bytes": Path(path).stat().st_size if path and Path(path).is_file() else None,
        "quantized_ops": quantized_ops.to_dict() if quantized_ops else None,
        "accuracy": accuracy,
        "drop": drop.to_dict() if drop else None,
        "bench": bench,
        "pareto": None,
    }


def accuracy_of(validation: Validation | None, index: int) -> dict | None:
    if validation is None:
        return None
    model = validation.run.models[index]
    return {"top1": round(model.top1, 4), "top5": round(model.top5, 4), "images": validation.run.images}


def _agreement_pct(v: dict) -> float | None:
    """Top-1 agreement with FP32 of a variant: 100 for FP32 itself, from the drop's counts for INT8."""
    if v["kind"] == "fp32":
        return 100.0
    drop = v.get("drop")
    return drop.get("agreement_pct") if drop else None


def mark_pareto(variants: list[dict]) -> None:
    """Mark the variants on the accuracy/speed Pareto front (needs both figures; largest batch measured).

    Two fronts: `pareto` on (speed, top-1) and `pareto_agreement` on (speed, top-1 agreement with FP32).
    Top-1 on a small validation set moves by single images; agreement is the steadier signal of fidelity.
    Speed is on the plot's axis: with several runtimes, the speedup against ONNX Runtime's FP32 (each
    runtime's own FP32 is a different baseline, so same-runtime ratios cannot be compared across runtimes).
    """
    measured = [v for v in variants if v["accuracy"] and v["bench"]]
    if not measured:
        return
    batch = str(max(int(b) for b in measured[0]["bench"]))
    key = speed_key(variants)
    speed = {id(v): speedup(v, v["bench"].get(batch), key) for v in measured}
    for v in measured:
        v["pareto"] = False
    measured = [v for v in measured if speed[id(v)] is not None]
    points = [(speed[id(v)], v["accuracy"]["top1"]) for v in measured]
    front = set(pareto_front(points))
    for i, v in enumerate(measured):
        v["pareto"] = i in front
    agreed = [v for v in measured if _agreement_pct(v) is not None]
    if len(agreed) > 1:
        points = [(speed[id(v)], _agreement_pct(v)) for v in agreed]
        front = set(pareto_front(points))
        for i, v in enumerate(agreed):
            v["pareto_agreement"] = i in front


def build_report(
    *,
    command: Sequence[str],
    model: Path,
    cpu: CpuInfo,
    advice: IntegerKernelAdvice | None,
    prepared: PreparedModel | None,
    variants: list[dict],
    calibration: dict | None = None,
    validation: Validation | None = None,
    gate: Gate | None = None,
    bench: BenchResult | None = None,
    stages: dict[str, float] | None = None,
    notes: Sequence[str] = (),
    label: str = "run",
    preprocess: dict | None = None,
) -> dict:
    mark_pareto(variants)
    return {
        "schema": SCHEMA,
        "run_id": run_id(model, label),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(str(c) for c in command),
        "rq_version": __version__,
        "packages": package_versions(),
        "cpu": cpu_section(cpu),
        "advice": advice.to_dict() if advice else None,
        "model": {
            "path": str(model),
            "sha256": sha256_file(model),
            "size_bytes": Path(model).stat().st_size,
            "signature": prepared.signature.to_dict() if prepared else None,
            "preparation": (
                {
                    "steps": prepared.steps,
                    "warnings": prepared.warnings,
                    "seconds": round(prepared.seconds, 3),
                }
                if prepared
                else None
            ),
        },
        "preprocess": preprocess,  # how every image of the run was turned into a network input
        "calibration": calibration,
        "validation": validation.to_dict() if validation else None,
        "variants": variants,
        "gate": gate.to_dict() if gate else None,
        "stages": {k: round(v, 3) for k, v in (stages or {}).items()},
        "bench": bench.to_dict() if bench else None,
        "notes": list(notes),
    }


def quantize_report(
    result,
    validation: Validation | None,
    gate: Gate | None,
    bench_result: BenchResult | None,
    fidelity=None,
    validations: dict[str, Validation] | None = None,
    runtimes: Sequence[str] = ("ort",),
    *,
    command: Sequence[str],
) -> dict:
    """report.json of a quantize run (`quantize.run.run`): `result` is its `pipeline.QuantizeResult`; one
    (FP32, INT8) pair of variants per runtime validated or benchmarked in."""
    validations = validations or {}
    variants = []
    # One (FP32, INT8) pair per runtime: the same files, validated and timed there (the first runtime's pair
    # is unsuffixed and uses the first benchmarked runtime's figures).
    for i, rt in enumerate(runtimes):
        suffix, checked, bench_rt = (
            ("", validation, None) if i == 0 else (f" · {rt}", validations.get(rt), rt)
        )
        variants += [
            variant(
                f"FP32{suffix}",
                "fp32",
                result.prepared.source,
                accuracy=accuracy_of(checked, 0),
                bench=bench_by_batch(bench_result, 0, bench_rt),
            ),
            variant(
                f"INT8 {result.recipe.label()}{suffix}",
                "int8",
                result.output,
                recipe=result.recipe,
                quantized_ops=result.quantized_ops,
                accuracy=accuracy_of(checked, 1),
                drop=checked.drop if checked else None,
                bench=bench_by_batch(bench_result, 1, bench_rt),
            ),
        ]
    pair_runtimes = [rt for rt in runtimes for _ in ("fp32", "int8")]  # variants come in (FP32, INT8) pairs
    for v, rt in zip(variants, pair_runtimes, strict=True):
        v["runtime"] = rt
    calibration = result.to_dict()["calibration"]
    notes = []
    if validation is not None and validation.overlap_with_calibration:
        notes.append(
            f"{validation.overlap_with_calibration} validation images are also calibration images: "
            "the measured drop is optimistic"
        )
    if result.bias_correction is not None:
        notes.append(f"bias correction: {result.bias_correction.describe()}")
    if result.runtime_form is not None:
        notes.append(
            f"{result.runtime_form.describe()}: this file is laid out for OpenVINO; ONNX Runtime runs those "
            "parts in float"
        )
    if result.channel_pads:
        notes.append(describe_channel_pads(result.channel_pads))
    if result.tuning is not None:
        tuning = result.tuning
        notes.append(
            f"tuning ({tuning.backend}): {len(tuning.fallback_nodes)} node(s) fell back to FP32; the validation "
            "figures are on the images held out from tuning"
        )
    data = build_report(
        command=command,
        model=result.prepared.source,
        cpu=result.cpu,
        advice=result.advice,
        preprocess=result.spec.to_dict(),
        prepared=result.prepared,
        variants=variants,
        calibration=calibration,
        validation=validation,
        gate=gate,
        bench=bench_result,
        stages=result.seconds,
        notes=notes,
        label=result.recipe.label(),
    )
    if result.tuning is not None:
        data["tuning"] = result.tuning.to_dict()
    if len(validations) > 1 and data["validation"] is not None:
        # The section's own figures are the first runtime's; each runtime's pass is timed on its own.
        data["validation"]["runtimes"] = {
            rt: {"images_per_s": round(v.run.images_per_s, 2), "seconds": round(v.run.seconds, 3)}
            for rt, v in validations.items()
        }
    data["fidelity"] = fidelity.to_dict() if fidelity is not None else None
    if result.bias_correction is not None:
        data["bias_correction"] = result.bias_correction.to_dict()
    if result.runtime_form is not None:
        data["runtime_form"] = result.runtime_form.to_dict()
    if result.channel_pads:
        data["channel_pads"] = [pad.to_dict() for pad in result.channel_pads]
    return data


def sweep_report(result, command: Sequence[str], grid: str) -> dict:
    """report.json of `rq sweep` (`quantize.sweep.run_sweep`'s `SweepResult`): FP32 and one variant per recipe,
    per runtime."""
    from quantize.measure.cpu import advise_int8
    from quantize.measure.stats import paired_drop
    from quantize.sweep import unsupported_values, variant_name

    labels = result.labels
    runtimes = result.runtimes
    fp32_by_runtime = result.fp32_by_runtime or {
        runtimes[0]: (result.fp32_predictions, result.fp32_top5_correct)
    }
    # One name per recipe (labels that leave a varied field out get the digest), then " · <runtime>" for
    # every runtime after the first, as `rq quantize --runtime` names its rows.
    names: dict[str, str] = {}
    for entry in result.entries:
        digest = entry.recipe.digest()
        if digest not in names:
            name = variant_name(entry.recipe)
            if name == "FP32" or name in names.values():
                name = f"{name} ({digest[:6]})"
            names[digest] = name
    variants = []
    for rt in runtimes:
        suffix = "" if rt == runtimes[0] else f" · {rt}"
        fp32_pred, fp32_top5 = fp32_by_runtime[rt]
        fp32_correct = fp32_pred == labels
        fp32 = variant(
            f"FP32{suffix}",
            "fp32",
            result.model,
            accuracy={
                "top1": round(100 * float(fp32_correct.mean()), 4),
                "top5": round(100 * float(fp32_top5.mean()), 4),
                "images": len(labels),
            },
            bench=bench_by_batch(result.bench, 0, rt),
        )
        fp32["runtime"] = rt
        variants.append(fp32)
        for entry in (e for e in result.entries if e.runtime == rt):
            correct = entry.predictions == labels
            drop = paired_drop(
                fp32_correct, correct, disagreements=int((entry.predictions != fp32_pred).sum())
            )
            item = variant(
                names[entry.recipe.digest()] + suffix,
                "int8",
                entry.model_path,
                recipe=entry.recipe,
                accuracy={
                    "top1": round(100 * float(correct.mean()), 4),
                    "top5": round(100 * float(entry.top5_correct.mean()), 4),
                    "images": len(labels),
                },
                drop=drop,
                bench=bench_by_batch(result.bench, entry.model_index, rt),
            )
            item["quantized_ops"] = entry.quantized_ops
            item["cached"] = entry.cached
            item["runtime"] = rt
            variants.append(item)
    notes = [f"grid {grid!r}: {len(names)} recipes; cache {result.cache_dir}"]
    dropped = unsupported_values(grid, result.entries[0].recipe if result.entries else QuantRecipe())
    if dropped:
        notes.append(f"left out of the grid (this rq's recipe does not support them): {dropped}")
    cached = len({e.recipe.digest() for e in result.entries if e.cached})
    if len(runtimes) > 1:
        notes.append(f"every recipe validated and benchmarked in {', '.join(runtimes)}")
    if cached:
        notes.append(f"{cached} recipe(s) reused from the cache of an earlier (interrupted) sweep")
    return build_report(
        command=command,
        model=result.model,
        cpu=result.cpu,
        advice=advise_int8(result.cpu),
        preprocess=result.preprocess,
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


def inspect_report(
    command: Sequence[str], fp32: Path, int8: Path, prepared, cpu: CpuInfo, used: int, nodes, spec=None
) -> dict:
    """report.json of `rq inspect`: the two models and every node's errors (`quantize.graph.inspection`)."""
    data = build_report(
        command=command,
        model=fp32,
        cpu=cpu,
        advice=None,
        prepared=prepared,
        variants=[variant("FP32", "fp32", fp32), variant("INT8", "int8", int8)],
        label="inspect",
        preprocess=spec.to_dict() if spec is not None else None,
    )
    data["inspection"] = {"images": used, "nodes": [n.to_dict() for n in nodes]}
    return data
