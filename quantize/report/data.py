"""Assemble `report.json` (schema rq.report/1) from the results of the stages; validation, writing and rendering are quantize.report."""

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
from quantize.graph.prepare import PreparedModel
from quantize.measure.bench import BenchResult
from quantize.measure.cpu import CpuInfo, IntegerKernelAdvice
from quantize.measure.stats import PairedDrop, pareto_front
from quantize.measure.validate import Gate, Validation
from quantize.recipe import QuantRecipe
from quantize.report.schema import SCHEMA

PACKAGES = ("onnxruntime", "onnx", "numpy", "pillow", "typer", "rich", "matplotlib", "neural-compressor")


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
    """
    measured = [v for v in variants if v["accuracy"] and v["bench"]]
    if not measured:
        return
    batch = max(int(b) for b in measured[0]["bench"])
    points = [(v["bench"][str(batch)]["ratio_to_fp32"], v["accuracy"]["top1"]) for v in measured]
    front = set(pareto_front(points))
    for i, v in enumerate(measured):
        v["pareto"] = i in front
    agreed = [v for v in measured if _agreement_pct(v) is not None]
    if len(agreed) > 1:
        points = [(v["bench"][str(batch)]["ratio_to_fp32"], _agreement_pct(v)) for v in agreed]
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
        "calibration": calibration,
        "validation": validation.to_dict() if validation else None,
        "variants": variants,
        "gate": gate.to_dict() if gate else None,
        "stages": {k: round(v, 3) for k, v in (stages or {}).items()},
        "bench": bench.to_dict() if bench else None,
        "notes": list(notes),
    }
