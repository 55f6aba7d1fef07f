"""The document model of a report: a list of blocks that both renderers walk, so Markdown and HTML always
say the same thing.

Conventions the blocks rely on:

* accuracies (``accuracy.top1``/``top5``, ``drop.top1_a``/``top1_b``) are percentages (0–100) and
  drops are percentage points, ``drop_pt = FP32 top-1 − variant top-1`` (positive = INT8 lost accuracy);
* ``bench`` of a variant maps a batch size (a string in JSON) to that batch's latency figures, with
  ``ratio_to_fp32`` = FP32 median / variant median (> 1 means faster than FP32);
* ``gate`` may carry the optional keys ``variant`` (the variant it judged) and ``drop_pt``; without them
  the verdict quotes the smallest INT8 drop in the report.

Every optional section may be ``null``: it renders as "not measured" instead of failing, so a report of a
run without ``--val`` or ``--bench`` is still complete.
"""

from __future__ import annotations

from typing import Any

from calibration.config import type_name
from calibration.errors import RqInputError
from quantize.measure.cpu import NO_VNNI_GAINS
from quantize.report.plot import bench_of, model_name, runtimes_of, variants_of
from quantize.report.schema import FLAG_LABELS, is_int, is_number
from quantize.report.sections import (
    NOT_MEASURED,
    Block,
    all_batches,
    artifact_blocks,
    drop_cell,
    fmt_mb,
    fmt_num,
    fmt_pct,
    fmt_seconds,
    inspection_blocks,
    json_block_text,
    notes_blocks,
    package_blocks,
    runtimes_text,
    same_file_groups,
    stage_blocks,
    tuning_blocks,
)

SKIPPED_SHOWN = 20  # skipped-file lists longer than this are cut, with "… and K more"
NO_VNNI_NOTE = f"{NO_VNNI_GAINS} (three instructions per u8×s8 multiply-accumulate step, one with VNNI)"
PLOT_MISSING = (
    "The accuracy-vs-speed plot needs --val and --bench: no INT8 variant has both accuracy and "
    "benchmark figures."
)


# ---------------------------------------------------------------------------------------------------------
# Document model: a list of blocks that both renderers walk, so MD and HTML always say the same thing.
# ---------------------------------------------------------------------------------------------------------


def _gated_drop(data: dict, gate: dict) -> tuple[str | None, float | None]:
    """(variant name, drop pt) the gate verdict quotes; see the module docstring for the fallback."""
    int8 = [v for v in variants_of(data) if v.get("kind") == "int8" and isinstance(v.get("drop"), dict)]
    named = gate.get("variant")
    if isinstance(named, str):
        for v in int8:
            if v.get("name") == named:
                return named, float(v["drop"]["drop_pt"])
    if is_number(gate.get("drop_pt")):
        return (named if isinstance(named, str) else None), float(gate["drop_pt"])
    measured = [v for v in int8 if is_number(v["drop"].get("drop_pt"))]
    if not measured:
        return None, None
    best = min(measured, key=lambda v: v["drop"]["drop_pt"])
    return best.get("name"), float(best["drop"]["drop_pt"])


def _gate_blocks(data: dict) -> list[Block]:
    gate = data.get("gate")
    if not isinstance(gate, dict):
        return [("verdict", "none", "Accuracy gate: not applied (no maximum drop was set).")]
    passed = bool(gate.get("passed"))
    word = "PASSED" if passed else "FAILED"
    limit = gate.get("max_drop_pt")
    name, drop = _gated_drop(data, gate)
    if gate.get("gate_on") == "ci" and is_number(gate.get("ci_high_pt")) and is_number(limit):
        high = float(gate["ci_high_pt"])
        sign = "≤" if high <= limit else ">"
        text = f"{word}: upper bound of the INT8 top-1 drop's interval {fmt_num(high)} pt {sign} {fmt_num(limit)} pt"
    elif drop is not None and is_number(limit):
        sign = "≤" if drop <= limit else ">"
        text = f"{word}: INT8 top-1 drop {fmt_num(drop)} pt {sign} {fmt_num(limit)} pt"
    else:
        text = f"{word}: INT8 top-1 drop {NOT_MEASURED} (limit {fmt_num(limit)} pt)"
    if not passed:
        text += f" (exit code {gate.get('exit_code')})"
    blocks: list[Block] = [("verdict", "passed" if passed else "failed", text)]
    details = []
    if name:
        details.append(f"Gated variant: {name}.")
    message = gate.get("message")
    if isinstance(message, str) and message.strip() and message.strip() != text:
        details.append(message.strip())
    if details:
        blocks.append(("p", " ".join(details)))
    return blocks


def _cpu_text(cpu: dict) -> tuple[str, bool]:
    """The CPU line, and whether the CPU lacks VNNI (then the no-VNNI note applies)."""
    flags = cpu.get("isa")
    if not isinstance(flags, dict):  # a report holding only the copy earlier rq also wrote
        flags = cpu.get("flags_summary") if isinstance(cpu.get("flags_summary"), dict) else None
    head = (
        f"CPU: {cpu.get('model') or 'unknown CPU'} ({cpu.get('arch') or 'unknown arch'}, "
        f"{cpu.get('logical_cores') if cpu.get('logical_cores') is not None else '?'} logical cores)"
    )
    if flags is None:
        return f"{head}; ISA flags {NOT_MEASURED}", False
    parts = []
    for key, label in FLAG_LABELS:
        if key in flags:
            parts.append(f"{label} {'yes' if flags[key] else 'no'}")
    source = ""
    if cpu.get("flags_source") not in (None, "proc"):
        # RQ_CPU_FLAGS changes rq's decisions, not the instructions onnxruntime ran: say so beside the flags.
        source = f" [flags from {cpu['flags_source']}, not read from the CPU]"
    x86 = str(cpu.get("arch") or "").lower() in ("x86_64", "amd64", "x86", "i686")
    return f"{head}; ISA: {', '.join(parts)}{source}", x86 and flags.get("vnni") is False


def _run_blocks(data: dict) -> list[Block]:
    items = [
        f"Run id: {data.get('run_id', '?')}",
        f"Created: {data.get('created', '?')}",
        f"Command: {data.get('command', '?')}",
        f"rq version: {data.get('rq_version', '?')}",
    ]
    cpu = data.get("cpu")
    if isinstance(cpu, dict):
        line, no_vnni = _cpu_text(cpu)
        items.append(line + (f". {NO_VNNI_NOTE}." if no_vnni else ""))
    else:
        items.append(f"CPU: {NOT_MEASURED}")
    advice = data.get("advice")
    if isinstance(advice, dict):
        items.append(f"INT8 advice: reduce_range={advice.get('reduce_range')} — {advice.get('reason', '')}")
    if isinstance(data.get("preprocess"), dict):
        items.append(f"Preprocessing: {_preprocess_text(data['preprocess'])}")
    return [("h2", "Run"), ("list", items)]


def _preprocess_text(spec: dict) -> str:
    from calibration import PreprocessSpec

    try:
        return PreprocessSpec.from_dict(spec).describe()
    except Exception:  # a report written by another rq version: its fields as they are
        return ", ".join(f"{k} {v}" for k, v in spec.items())


def _method_text(drop: dict) -> str:
    method = drop.get("method")
    if method == "score":
        return "Tango's score interval for paired proportions"
    if method == "exact":
        return (
            "exact McNemar / Clopper–Pearson interval on the discordant images, conditional on their number"
        )
    if method == "bootstrap":
        return "paired bootstrap percentile interval"
    return f"{method} interval"


def _agreement_cell(drop: dict | None) -> str:
    """Top-1 agreement with FP32 in percent: from ``agreement_pct``, or from the counts of older reports."""
    if not isinstance(drop, dict):
        return NOT_MEASURED
    if is_number(drop.get("agreement_pct")):
        return fmt_num(drop["agreement_pct"])
    n, differ = drop.get("n"), drop.get("disagreements")
    if is_int(n) and is_int(differ) and n > 0:
        return fmt_num(100.0 * (n - differ) / n)
    return NOT_MEASURED


def _fidelity_blocks(data: dict) -> list[Block]:
    """Label-free fidelity on held-back calibration images (runs without --val)."""
    fid = data.get("fidelity")
    if not isinstance(fid, dict):
        return []
    rows = [
        ["Images", str(fid.get("source", "?"))],
        ["Runtime", "onnxruntime (--runtime applies to --val and --bench)"],
        [
            "Top-1 agreement with FP32",
            f"{fmt_num(fid.get('agreement_pct'))}% [{fmt_num(fid.get('agreement_ci_low_pct'))}, "
            f"{fmt_num(fid.get('agreement_ci_high_pct'))}] ({fid.get('disagreements')} of {fid.get('images')} differ)",
        ],
        [
            "Logits SQNR"
            if fid.get("outputs", "logits") == "logits"
            else "Log-probability SQNR (outputs: probabilities)",
            f"{fmt_num(fid.get('logits_sqnr_db'), 1)} dB",
        ],
        ["Softmax KL (mean per image)", f"{fmt_num(fid.get('softmax_kl'), 4)} nats"],
    ]
    return [
        ("h2", "Fidelity to FP32 (label-free)"),
        ("table", ["Measure", "Value"], rows),
        (
            "p",
            "Measured on calibration images that calibration did not use; no labels needed. A top-1 drop can "
            "never exceed the disagreement rate. With --val, rq measures the drop itself.",
        ),
    ]


def _results_blocks(data: dict) -> list[Block]:
    variants = variants_of(data)
    if not variants:
        return [("h2", "Results"), ("p", f"No variants: {NOT_MEASURED}.")]
    batches = all_batches(variants)
    drops = [v["drop"] for v in variants if isinstance(v.get("drop"), dict)]
    confs = {d.get("confidence") for d in drops}
    ci_label = f"{fmt_pct(next(iter(confs)))}% CI" if len(confs) == 1 else "CI"
    runtimes = runtimes_of(variants)
    by_runtime = bool(runtimes) and runtimes != ["ort"]  # say where each row ran unless it is all ORT
    headers = [
        "Variant",
        *(["Runtime"] if by_runtime else []),
        "Kind",
        "Top-1 %",
        "Top-5 %",
        f"Drop pt [{ci_label}]",
        "Agreement %",
        "Disagreements",
    ]
    headers += [f"Speedup b{b}" for b in batches] or ["Speedup"]
    headers += ["Size MB", "Quantized ops", "Pareto"]
    rows = []
    # Without --val, the agreement measured on held-back calibration images (the Fidelity section) fills the
    # INT8 rows that ran in ONNX Runtime, marked as such, rather than "not measured" beside a measured figure.
    fid = data.get("fidelity")
    held_back = (NOT_MEASURED, NOT_MEASURED)
    if isinstance(fid, dict) and is_number(fid.get("agreement_pct")):
        held_back = (
            f"{fmt_num(fid['agreement_pct'])} (held-back calib.)",
            str(fid.get("disagreements", "?")),
        )
    for v in variants:
        is_fp32 = v.get("kind") == "fp32"
        acc = v.get("accuracy") if isinstance(v.get("accuracy"), dict) else {}
        drop = v.get("drop") if isinstance(v.get("drop"), dict) else None
        bench = bench_of(v)
        fallback = held_back if v.get("runtime") in (None, "ort") else (NOT_MEASURED, NOT_MEASURED)
        row = [
            str(v.get("name", "?")),
            *([str(v.get("runtime") or "?")] if by_runtime else []),
            str(v.get("kind", "?")).upper(),
            fmt_num(acc.get("top1")),
            fmt_num(acc.get("top5")),
            "reference" if is_fp32 and drop is None else drop_cell(drop),
            "100 (reference)" if is_fp32 and drop is None else _agreement_cell(drop) if drop else fallback[0],
            "—" if is_fp32 and drop is None else (str(drop.get("disagreements")) if drop else fallback[1]),
        ]
        if not batches:
            row.append(NOT_MEASURED)
        for b in batches:
            if not bench:
                row.append(NOT_MEASURED)
            elif b in bench:
                row.append(_ratio_cell(bench[b]))
            else:
                row.append("—")  # this variant was benchmarked, just not at this batch
        ops = v.get("quantized_ops")
        if isinstance(ops, dict):
            ops_text = f"{ops.get('quantized')}/{ops.get('candidates')}"
        else:
            ops_text = "—" if is_fp32 else NOT_MEASURED
        row += [
            fmt_mb(v.get("size_bytes")),
            ops_text,
            ("★" if v.get("pareto") else "") + ("◆" if v.get("pareto_agreement") else ""),
        ]
        rows.append(row)
    blocks: list[Block] = [("h2", "Results"), ("table", headers, rows)]
    if drops:
        d = drops[0]
        blocks.append(
            (
                "p",
                f"Drop = FP32 top-1 − variant top-1 in percentage points (positive: INT8 lost accuracy), on "
                f"the same {d.get('n')} images; interval: {_method_text(d)} at {fmt_pct(d.get('confidence'))}% "
                "confidence. Agreement = share of images where the variant predicts FP32's class; "
                "Disagreements = images where the two models predicted different classes. "
                "★ = on the top-1/speed Pareto front; ◆ = on the agreement/speed Pareto front."
                + (
                    " Speedup: against FP32 in the same runtime; the fronts (and the plot) compare the "
                    "speedups against ONNX Runtime's FP32 (Benchmark table), one axis for every runtime."
                    if len(runtimes) > 1 and "ort" in runtimes
                    else ""
                ),
            )
        )
        significant = [
            str(v.get("name"))
            for v in variants
            if isinstance(v.get("drop"), dict) and v["drop"].get("significant")
        ]
        if significant:
            blocks.append(
                ("p", f"The interval excludes 0 (a real accuracy change) for: {', '.join(significant)}.")
            )
    else:
        blocks.append(("p", f"Accuracy drop: {NOT_MEASURED} (run with --val)."))
    if not batches:
        blocks.append(("p", f"Speed: {NOT_MEASURED} (run with --bench)."))
    else:
        text = "Speedup = FP32 median latency / variant median latency at that batch size"
        if any("ratio_to_fp32_interval" in f for v in variants for f in bench_of(v).values()):
            text += "; [low, high]: its 95% interval over this run's interleaved rounds (Benchmark section)"
        blocks.append(("p", text + "."))
    return blocks


def _ratio_cell(figures: dict) -> str:
    """``3.08× [3.01, 3.14]``: the speedup against FP32 and, when measured, its 95% interval over the rounds."""
    text = f"{fmt_num(figures.get('ratio_to_fp32'))}×"
    interval = figures.get("ratio_to_fp32_interval")
    if isinstance(interval, list) and len(interval) == 2 and all(is_number(x) for x in interval):
        text += f" [{fmt_num(interval[0])}, {fmt_num(interval[1])}]"
    return text


def _bench_blocks(data: dict) -> list[Block]:
    blocks: list[Block] = [("h2", "Benchmark")]
    rows = []
    multi = len(runtimes_of(variants_of(data))) > 1 or any(
        v.get("runtime") not in (None, "ort") for v in variants_of(data)
    )
    for v in variants_of(data):
        for b, f in sorted(bench_of(v).items()):
            row = [
                str(v.get("name", "?")),
                str(b),
                fmt_num(f.get("median_ms")),
                fmt_num(f.get("p90_ms")),
                fmt_num(f.get("images_per_s"), 1),
                _ratio_cell(f),
            ]
            if multi:
                ort_ratio = f.get("ratio_to_ort_fp32")
                row[1:1] = [str(f.get("runtime", v.get("runtime", "?"))), str(f.get("precision", "?"))]
                row.append(f"{fmt_num(ort_ratio)}×" if is_number(ort_ratio) else "—")
            rows.append(row)
    bench = data.get("bench")
    if not rows and not isinstance(bench, dict):
        return [*blocks, ("p", f"Latency: {NOT_MEASURED} (run with --bench).")]
    if rows:
        headers = ["Variant", "Batch", "Median ms", "p90 ms", "Images/s", "vs FP32"]
        if multi:
            headers = ["Variant", "Runtime", "Precision", "Batch", "Median ms", "p90 ms", "Images/s"]
            headers += ["vs FP32 (same runtime)", "vs ORT FP32"]
        blocks.append(("table", headers, rows))
    if isinstance(bench, dict):
        context = []
        versions = bench.get("runtime_versions")
        if isinstance(versions, dict) and set(versions) - {"ort"}:
            # Several runtimes (or one other than ORT): each named once, ORT with its provider.
            provider = f" ({bench['provider']})" if bench.get("provider") else ""
            context.append(
                "runtimes: "
                + ", ".join(f"{v}{provider}" if rt == "ort" else str(v) for rt, v in versions.items())
            )
        else:
            if bench.get("onnxruntime_version"):
                context.append(f"onnxruntime {bench['onnxruntime_version']}")
            if bench.get("provider"):
                context.append(str(bench["provider"]))
        if bench.get("threads") is not None:
            context.append(f"{bench['threads']} intra-op thread(s)")
        if bench.get("runs") is not None:
            context.append(
                f"median of {bench['runs']} interleaved runs per model and batch (+{bench.get('warmup', 0)} warmup)"
            )
        if any("ratio_to_fp32_interval" in f for v in variants_of(data) for f in bench_of(v).values()):
            context.append(
                "[low, high]: 95% interval of the speedup against FP32 in the same runtime, bootstrap over the rounds of "
                "this run (another run, under other load, can move it further)"
            )
        if context:
            blocks.append(("p", "; ".join(context) + "."))
        notes = [str(n) for n in bench.get("notes") or []]
        if notes:
            blocks.append(("list", notes))
    return blocks


def _recipe_blocks(data: dict) -> list[Block]:
    blocks: list[Block] = [("h2", "Recipes")]
    variants = variants_of(data)
    int8 = [v for v in variants if v.get("kind") == "int8"]
    several = len(runtimes_of(variants)) > 1

    # One recipe per file: the same INT8 file run in several runtimes is listed once.
    def same_file(v):
        return (v["sha256"], json_block_text(v.get("recipe"))) if v.get("sha256") else id(v)

    for group in same_file_groups(int8, same_file):
        v = group[0]
        name = str(v.get("name")) + (f" (runs in {runtimes_text(group)})" if several else "")
        recipe = v.get("recipe")
        if isinstance(recipe, dict):
            blocks += [("p", f"{name}:"), ("code", json_block_text(recipe))]
        else:
            blocks.append(("p", f"{name}: recipe not recorded."))
    if not int8:
        blocks.append(("p", "No INT8 variants."))
    return blocks


def _skipped_items(skipped: Any, joiner: str = " — ") -> list[str]:
    if not isinstance(skipped, list):
        return []
    items = []
    for entry in skipped[:SKIPPED_SHOWN]:
        if isinstance(entry, (list, tuple)) and len(entry) == 2:
            items.append(f"{entry[0]}{joiner}{entry[1]}")
        else:
            items.append(str(entry))
    if len(skipped) > SKIPPED_SHOWN:
        items.append(f"… and {len(skipped) - SKIPPED_SHOWN} more")
    return items


def _model_blocks(data: dict) -> list[Block]:
    model = data.get("model")
    blocks: list[Block] = [("h2", "Model")]
    if not isinstance(model, dict):
        return [*blocks, ("p", NOT_MEASURED)]
    prep = model.get("preparation") if isinstance(model.get("preparation"), dict) else {}
    blocks.append(
        (
            "list",
            [
                f"Path: {model.get('path', '?')}",
                f"SHA-256: {model.get('sha256', '?')}",
                f"Size: {fmt_mb(model.get('size_bytes'))} MB",
                f"Preparation time: {fmt_seconds(prep.get('seconds'))}",
            ],
        )
    )
    steps = [str(s) for s in prep.get("steps") or []]
    blocks += [("p", "Preparation steps:"), ("list", steps) if steps else ("p", "none")]
    warnings = [str(w) for w in prep.get("warnings") or []]
    if warnings:
        blocks += [("p", "Preparation warnings:"), ("list", warnings)]
    if isinstance(model.get("signature"), dict) and model["signature"]:
        blocks += [("p", "Signature:"), ("code", json_block_text(model["signature"]))]
    return blocks


def _dataset_blocks(data: dict, key: str, title: str) -> list[Block]:
    section = data.get(key)
    blocks: list[Block] = [("h2", title)]
    if not isinstance(section, dict):
        flag = "--calib" if key == "calibration" else "--val"
        return [*blocks, ("p", f"{NOT_MEASURED} (no {flag} folder in this run).")]
    items = [f"Folder: {section.get('folder', '?')}", f"Layout: {section.get('layout', '?')}"]
    # A quantize run that validated in several runtimes times each pass: {runtime: {images_per_s, seconds}}.
    per_runtime = section.get("runtimes") if isinstance(section.get("runtimes"), dict) else {}
    if key == "calibration":
        requested = section.get("images_requested")
        sampled = f" of {requested} sampled" if is_int(requested) else ""
        items += [
            f"Images used: {section.get('images_used', '?')}{sampled}",
            f"File list SHA-256: {section.get('file_list_sha256', '?')}",
        ]
    else:
        overlap = section.get("overlap_with_calibration")
        items += [f"Images: {section.get('images', '?')}", f"Overlap with calibration images: {overlap}"]
        if per_runtime:
            items.append(
                "Evaluation throughput (decode + both models): "
                + ", ".join(
                    f"{fmt_num(f.get('images_per_s'), 1)} images/s in {rt} ({fmt_seconds(f.get('seconds'))})"
                    for rt, f in per_runtime.items()
                    if isinstance(f, dict)
                )
            )
        elif is_number(section.get("images_per_s")):
            items.append(f"Evaluation throughput: {fmt_num(section['images_per_s'], 1)} images/s")
        cluster = section.get("cluster")
        if isinstance(cluster, dict):
            nodes = cluster.get("nodes")
            items.append(
                f"Ran on: Ray cluster at {cluster.get('address', '?')}, {nodes} node{'s' if nodes != 1 else ''}, "
                f"{fmt_num(cluster.get('cpus'), 0)} CPUs, {cluster.get('actors', '?')} inference actors"
            )
    seconds = [
        f["seconds"] for f in per_runtime.values() if isinstance(f, dict) and is_number(f.get("seconds"))
    ]
    total = sum(float(x) for x in seconds) if seconds else section.get("seconds")
    items.append(f"Time: {fmt_seconds(total)}")
    blocks.append(("list", items))
    if (
        key == "validation"
        and is_int(section.get("overlap_with_calibration"))
        and section["overlap_with_calibration"]
    ):
        blocks.append(
            (
                "p",
                "Warning: some validation images were also used for calibration; accuracy may be optimistic.",
            )
        )
    notes = [str(n) for n in section.get("notes") or []]
    if notes:
        # What discovery understood of the folder (its layout, broken links, subfolders without class ids).
        blocks += [("p", "Folder notes:"), ("list", notes)]
    skipped = section.get("skipped") or []
    if skipped:
        blocks += [("p", f"Skipped files ({len(skipped)}):"), ("list", _skipped_items(skipped))]
    else:
        blocks.append(("p", "Skipped files: none."))
    replaced = section.get("replaced") or []
    if replaced:
        # Calibration draws another image (of the same class where it can) for each unreadable one.
        blocks += [
            ("p", f"Unreadable images replaced ({len(replaced)}), unreadable → replacement:"),
            ("list", _skipped_items(replaced, " → ")),
        ]
    return blocks


def title(data: dict) -> str:
    return f"rq report: {model_name(data)} — run {data.get('run_id', '?')}"


def document(data: dict) -> list[Block]:
    if not isinstance(data, dict):
        raise RqInputError(f"invalid report: expected a JSON object, got {type_name(data)}")
    return [
        *_gate_blocks(data),
        *_run_blocks(data),
        *_results_blocks(data),
        *_fidelity_blocks(data),
        ("h2", "Accuracy vs speed"),
        ("plot",),
        *_bench_blocks(data),
        *tuning_blocks(data),
        *inspection_blocks(data),
        *_recipe_blocks(data),
        *_model_blocks(data),
        *_dataset_blocks(data, "calibration", "Calibration"),
        *_dataset_blocks(data, "validation", "Validation"),
        *stage_blocks(data),
        *artifact_blocks(data),
        *package_blocks(data),
        *notes_blocks(data),
    ]
