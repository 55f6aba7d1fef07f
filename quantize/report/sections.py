"""Formatting helpers of the report's views and its appendix sections (stage timings, artifacts, packages,
tuning, per-node error, notes). The headline blocks and the document's order are in quantize.report.blocks.
"""

from __future__ import annotations

import json
import math
from typing import Any

from quantize.report.plot import bench_of, runtimes_of, variants_of
from quantize.report.schema import is_number

# ("h2", text) | ("p", text) | ("verdict", "passed"|"failed"|"none", text) | ("list", [text])
# | ("table", [header], [[cell]]) | ("code", text) | ("plot",)
Block = tuple

NOT_MEASURED = "not measured"
STAGES = ("prepare", "calibrate", "quantize", "validate", "bench")

# ---------------------------------------------------------------------------------------------------------
# Formatting helpers
# ---------------------------------------------------------------------------------------------------------


def fmt_num(x: Any, digits: int = 2) -> str:
    """Fixed-point with a real minus sign (−); a rounded −0.00 shows as 0.00."""
    if not is_number(x):
        return NOT_MEASURED if x is None else str(x)
    x = float(x)
    if math.isnan(x):
        return "n/a"
    text = f"{x:.{digits}f}"
    if float(text) == 0.0:
        text = f"{0.0:.{digits}f}"
    return text.replace("-", "−")


def fmt_mb(size: Any) -> str:
    if not is_number(size):
        return NOT_MEASURED
    mb = size / 1e6
    return f"{mb:.1f}" if mb >= 10 else f"{mb:.2f}"


def fmt_seconds(s: Any) -> str:
    if not is_number(s):
        return "not run"
    return f"{s:.1f} s" if s >= 10 else f"{s:.2f} s"


def fmt_pct(conf: Any) -> str:
    if not is_number(conf):
        return "?"
    return f"{100 * conf:g}"


def drop_cell(drop: dict | None) -> str:
    """``0.15 [−0.08, 0.38]``: the drop and its interval, in percentage points."""
    if not isinstance(drop, dict):
        return NOT_MEASURED
    return f"{fmt_num(drop.get('drop_pt'))} [{fmt_num(drop.get('ci_low_pt'))}, {fmt_num(drop.get('ci_high_pt'))}]"


def all_batches(variants: list[dict]) -> list[int]:
    return sorted({b for v in variants for b in bench_of(v)})


def json_block_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def stage_blocks(data: dict) -> list[Block]:
    stages = data.get("stages")
    if not isinstance(stages, dict) or not stages:
        return [("h2", "Stage timings"), ("p", NOT_MEASURED)]
    names = [s for s in STAGES if s in stages] + [s for s in stages if s not in STAGES]
    rows = [[name, fmt_seconds(stages[name])] for name in names]
    total = sum(float(stages[n]) for n in names if is_number(stages[n]))
    rows.append(["total", fmt_seconds(total)])
    return [("h2", "Stage timings"), ("table", ["Stage", "Time"], rows)]


def _ops_by_type(ops) -> str:
    """`Conv 53/53, Relu 49/49 fused; FP32: 1 excluded by the user` from a `quantized_ops` dict."""
    if not isinstance(ops, dict) or not isinstance(ops.get("by_type"), dict):
        return ""
    fused = ops.get("fused") if isinstance(ops.get("fused"), dict) else {}
    parts = []
    for kind, counts in sorted(ops["by_type"].items()):
        if isinstance(counts, list) and len(counts) == 2:
            parts.append(f"{kind} {counts[0]}/{counts[1]}" + (" fused" if fused.get(kind) else ""))
        else:
            parts.append(f"{kind} {counts}")
    text = ", ".join(parts)
    fp32 = ops.get("fp32") if isinstance(ops.get("fp32"), dict) else {}
    reasons: dict[str, int] = {}
    for entry in fp32.values():
        if isinstance(entry, list) and len(entry) == 2:
            reasons[str(entry[1])] = reasons.get(str(entry[1]), 0) + 1
    if reasons:
        text += "; FP32: " + ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
    return text


def same_file_groups(variants: list[dict], key) -> list[list[dict]]:
    """`variants` grouped by `key(v)` in first-seen order: a file validated and timed in several runtimes is
    one variant per runtime in the report, but one file (and one recipe) in its appendix."""
    groups: dict[Any, list[dict]] = {}
    for v in variants:
        groups.setdefault(key(v), []).append(v)
    return list(groups.values())


def runtimes_text(group: list[dict]) -> str:
    runtimes = [str(v["runtime"]) for v in group if isinstance(v.get("runtime"), str)]
    return ", ".join(dict.fromkeys(runtimes)) or "—"


def artifact_blocks(data: dict) -> list[Block]:
    variants = variants_of(data)
    several = len(runtimes_of(variants)) > 1
    # Without a path or a digest there is nothing to say two rows are the same file.
    groups = same_file_groups(
        variants, lambda v: (v.get("path"), v.get("sha256")) if v.get("sha256") else id(v)
    )
    rows = []
    for group in groups:
        v = group[0]
        rows.append(
            [
                str(v.get("name", "?")),
                *([runtimes_text(group)] if several else []),
                str(v.get("path") or "—"),
                str(v.get("sha256") or "—"),
                fmt_mb(v.get("size_bytes")) if v.get("size_bytes") is not None else "—",
                _ops_by_type(v.get("quantized_ops")) or "—",
            ]
        )
    if not rows:
        return [("h2", "Artifacts"), ("p", "none")]
    runs_in = ["Runs in"] if several else []
    headers = ["Variant", *runs_in, "Path", "SHA-256", "Size MB", "Quantized by type"]
    return [("h2", "Artifacts"), ("table", headers, rows)]


def package_blocks(data: dict) -> list[Block]:
    packages = data.get("packages")
    if not isinstance(packages, dict) or not packages:
        return [("h2", "Packages"), ("p", NOT_MEASURED)]
    rows = [[str(k), str(v) if v is not None else "not installed"] for k, v in sorted(packages.items())]
    return [("h2", "Packages"), ("table", ["Package", "Version"], rows)]


def tuning_blocks(data: dict) -> list[Block]:
    """Accuracy-aware tuning: every step, what fell back, the drop on the tuning images and the speed it cost."""
    tuning = data.get("tuning")
    if not isinstance(tuning, dict):
        return []
    blocks: list[Block] = [("h2", "Tuning")]
    verdict = "met" if tuning.get("goal_met") else "NOT met"
    blocks.append(
        (
            "p",
            f"Backend {tuning.get('backend', '?')}: goal drop ≤ {fmt_num(tuning.get('max_drop_pt'))} pt on "
            f"{tuning.get('tune_images', '?')} tuning images (FP32 top-1 there "
            f"{fmt_num(tuning.get('fp32_top1_on_tune_images'))}%): goal {verdict}; chosen step "
            f"{tuning.get('chosen_step', '?')}, {len(tuning.get('fallback_nodes') or [])} node(s) kept in FP32.",
        )
    )
    if tuning.get("pool_images"):
        blocks.append(
            (
                "p",
                f"Objective: fidelity to FP32 on {tuning.get('pool_images')} images (the tuning images and "
                f"{tuning.get('holdout_calibration_images', 0)} held-back calibration images, no labels needed); "
                "the images held out for validation were not used to choose. A step meets the goal when the "
                "drop on the tuning images and the drop predicted from the agreement (disagreement rate × "
                f"{fmt_num(tuning.get('loss_per_disagreement'), 3)}, the net loss per disagreement at step 0) "
                "are both within the goal.",
            )
        )
    rows = []
    for step in tuning.get("steps") or []:
        speed = step.get("speed_ratio_to_fp32") or {}
        rows.append(
            [
                str(step.get("step")),
                str(len(step.get("fallback_nodes") or [])),
                str(step.get("added") or "—"),
                fmt_num(step.get("agreement_pct")),
                fmt_num(step.get("softmax_kl"), 4),
                fmt_num(step.get("top1")),
                fmt_num(step.get("drop_pt")),
                fmt_num(step.get("predicted_drop_pt")),
                ", ".join(f"b{b}: {fmt_num(r)}×" for b, r in speed.items()) or NOT_MEASURED,
                str(step.get("error") or ""),
            ]
        )
    if rows:
        headers = ["Step", "FP32 nodes", "Fell back", "Agreement %", "Softmax KL", "Top-1 %", "Drop pt"]
        headers += ["Predicted drop pt", "Speed vs FP32", "Error"]
        blocks.append(("table", headers, rows))
    sensitivity = tuning.get("sensitivity") or []
    if sensitivity:
        worst = ", ".join(
            f"{s.get('node')} ({fmt_num(s.get('added_noise_sqnr_db', s.get('logits_sqnr_db')), 1)} dB)"
            for s in sensitivity[:10]
        )
        blocks.append(("p", f"Most sensitive nodes (SQNR of the noise each adds, one pass): {worst}."))
    notes = [str(n) for n in tuning.get("notes") or []]
    if notes:
        blocks.append(("list", notes))
    return blocks


def inspection_blocks(data: dict) -> list[Block]:
    """Per-node weight/activation error of an INT8 model, worst first."""
    inspection = data.get("inspection")
    if not isinstance(inspection, dict):
        return []
    nodes = inspection.get("nodes") or []
    blocks: list[Block] = [
        ("h2", "Per-node error"),
        (
            "p",
            f"{len(nodes)} nodes, {inspection.get('images', '?')} images; SQNR in dB (higher is better), "
            "activation = the node's output in the INT8 model vs FP32.",
        ),
    ]
    rows = [
        [
            str(n.get("node")),
            str(n.get("op_type")),
            fmt_num(n.get("weight_sqnr_db"), 1),
            fmt_num(n.get("activation_sqnr_db"), 1),
            fmt_num(n.get("activation_cosine"), 4),
        ]
        for n in nodes
    ]
    if rows:
        blocks.append(("table", ["Node", "Op", "Weight SQNR", "Activation SQNR", "Cosine"], rows))
    return blocks


def notes_blocks(data: dict) -> list[Block]:
    notes = [str(n) for n in data.get("notes") or []]
    return [("h2", "Notes"), ("list", notes) if notes else ("p", "none")]
