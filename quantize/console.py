"""What the `rq` commands print: rich tables on stdout, progress and messages on stderr.

Progress and messages go to stderr (`err`) so that `--json` output on stdout stays machine-readable.
"""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from quantize.files import json_text
from quantize.graph.channel_pad import describe_channel_pads

err = Console(stderr=True)


def out_console() -> Console:
    """Console for tables on stdout; piped output gets a wide fixed width instead of rich's 80 columns."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def progress_bar():
    """The rich progress bar every image-reading command draws on stderr (removed when done)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        # Not drawn when stderr is no terminal: there a stopped bar leaves only an empty line, which put a blank
        # line before a one-line error in logs and CI output.
        disable=not err.is_terminal,
    )


def say(message: str, style: str = "dim", prefix: str = "· ") -> None:
    """One progress message on stderr."""
    err.print(f"[{style}]{prefix}{escape(message)}[/]", highlight=False)


class BarProgress:
    """The `calibration.progress.Progress` the CLI draws a run with: each stage on stderr (`say`), each counted
    pass as a line of `bar` (a `progress_bar()`) labelled with its stage, notes as dim lines."""

    def __init__(self, bar) -> None:
        self.bar = bar
        self.label = ""
        self.task = None

    def stage(self, name: str) -> None:
        if name.startswith("bench"):
            self.bar.stop()  # nothing to draw while timing: the refresh thread would only add noise
        if name != "calibrate":
            say(name)
        self.label, self.task = name.split(" (")[0], None

    def total(self, n: int) -> None:
        self.task = self.bar.add_task(self.label, total=n)

    def advance(self, n: int = 1) -> None:
        if self.task is not None:
            self.bar.advance(self.task, n)

    def note(self, text: str) -> None:
        say(text, prefix="  ")


class _ConsoleLogHandler(logging.Handler):
    """rq's loggers on stderr: warnings always, as `warning: …`; the rest only with --verbose."""

    def emit(self, record: logging.LogRecord) -> None:
        message = escape(record.getMessage())
        if record.levelno >= logging.WARNING:
            err.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
        else:
            err.print(f"[dim]rq {record.name}: {message}[/]", highlight=False, soft_wrap=True)


def setup_logging(verbose: bool = False) -> None:
    """Show rq's own log records (the `quantize` and `calibration` loggers, never onnx/ORT/PIL's): warnings, and
    with `verbose` the debug diagnostics too (preparation steps, skipped images, bias correction, …)."""
    for name in ("quantize", "calibration"):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not isinstance(h, _ConsoleLogHandler)]
        handler = _ConsoleLogHandler(logging.DEBUG if verbose else logging.WARNING)
        logger.addHandler(handler)
        # The logger's own level is only raised for --verbose (NOTSET otherwise: whatever the root allows,
        # WARNING by default), so a host program's logging setup keeps working.
        logger.setLevel(logging.DEBUG if verbose else logging.NOTSET)


def print_json(data) -> None:
    """`--json` output: strict JSON (a non-finite number is null, never a bare NaN)."""
    typer.echo(json_text(data, indent=2))


def print_run(result, as_json: bool) -> None:
    """`rq quantize`'s output for a `quantize.run.RunResult`; the gate's verdict last."""
    if as_json:
        print_json(result.report)
    else:
        console = out_console()
        console.print(summary_table(result.quantized))
        single = list(result.validations) == ["ort"]
        for rt, validated in result.validations.items():
            console.print(validation_table(validated, None if single else rt))
        if result.fidelity is not None:
            console.print(fidelity_table(result.fidelity))
        if result.bench is not None:
            console.print(result.bench.render_table())
    validation = result.validation
    if validation is not None and validation.overlap_with_calibration:
        err.print(
            f"[yellow]warning:[/] {validation.overlap_with_calibration} validation images are also "
            "calibration images: the measured drop is optimistic",
            highlight=False,
        )
    if result.report_paths is not None:
        err.print(f"report: {result.report_paths['html']}", highlight=False, soft_wrap=True)
    if result.gate is not None:
        style = "bold green" if result.gate.passed else "bold red"
        err.print(f"[{style}]{escape(result.gate.message)}[/]", highlight=False)


#: The drop interval's method, as the report names it.
METHOD_NAMES = {
    "score": "Tango's score interval",
    "exact": "conditional Clopper–Pearson",
    "bootstrap": "paired bootstrap",
}


def _bytes_text(size: int) -> str:
    """Decimal units, as in the report; kB under one MB (a tiny model is not "0.0 MB")."""
    return f"{size / 1e6:.1f} MB" if size >= 1_000_000 else f"{size / 1e3:.1f} kB"


def size_text(fp32_bytes: int, int8_bytes: int) -> str:
    """`97.8 MB FP32 → 25.6 MB INT8 (3.82× smaller)`; a model that grew (the Q/DQ nodes of a tiny one weigh more
    than its weights shrank) says "larger"."""
    text = f"{_bytes_text(fp32_bytes)} FP32 → {_bytes_text(int8_bytes)} INT8"
    if int8_bytes <= fp32_bytes:
        return f"{text} ({fp32_bytes / max(int8_bytes, 1):.2f}× smaller)"
    return f"{text} ({int8_bytes / max(fp32_bytes, 1):.2f}× larger)"


def summary_table(result) -> Table:
    data = result.to_dict()
    replaced = " (replaced the file that was there)" if getattr(result, "replaced_existing", False) else ""
    table = Table(title=f"rq quantize → {result.output}{replaced}", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    calib = data["calibration"]
    table.add_row("calibration folder", f"{calib['folder']} (layout: {calib['layout']})")
    for note in calib["notes"]:
        table.add_row("", note)
    skipped, replaced = calib["skipped"], calib["replaced"]
    table.add_row(
        "images",
        f"{calib['images_used']} used of {calib['images_requested']} sampled "
        f"({calib['images_available']} available), {len(skipped)} skipped"
        + (f", {len(replaced)} replaced by other images" if replaced else ""),
    )
    for path, reason in skipped[:10]:
        table.add_row("  skipped", f"{path}: {reason}")
    if len(skipped) > 10:
        table.add_row("  skipped", f"… and {len(skipped) - 10} more")
    for old, new in replaced[:10]:
        table.add_row("  replaced", f"{old} → {new}")
    if len(replaced) > 10:
        table.add_row("  replaced", f"… and {len(replaced) - 10} more")
    prep = data["preparation"]
    for i, step in enumerate(prep["steps"]):
        table.add_row("preparation" if i == 0 else "", step)
    for warning in prep["warnings"]:
        table.add_row("warning", warning)
    r = result.recipe
    table.add_row(
        "recipe",
        f"{r.label()}: {r.format}, {r.activation_type} activations / {r.weight_type} weights, "
        f"{'per-channel' if r.per_channel else 'per-tensor'}, reduce_range={r.reduce_range}, "
        f"{r.calibration}"
        + (f" {r.percentile:g}%" if r.calibration == "percentile" else "")
        + (f" ({r.bins} bins)" if r.bins else ""),
    )
    table.add_row("ops quantized", result.quantized_ops.describe())
    if result.bias_correction is not None:
        table.add_row("bias correction", result.bias_correction.describe())
    if result.runtime_form is not None:
        table.add_row("runtime form", result.runtime_form.describe())
    if result.channel_pads:
        table.add_row("input channels", describe_channel_pads(result.channel_pads))
    if result.tuning is not None:
        t = result.tuning
        steps = "; ".join(
            f"step {st.step}: {len(st.fallback)} FP32, drop {st.drop_pt:.2f} pt"
            + (f", agreement {st.agreement_pct:.2f}%" if st.agreement_pct is not None else "")
            for st in t.steps
        )
        pool = (
            f" (fidelity on {t.pool_images} images: these and {t.holdout_images} held-back calibration images)"
            if t.pool_images
            else ""
        )
        table.add_row(
            "tuning",
            f"goal ≤ {t.max_drop_pt:.2f} pt on {t.tune_images} images{pool} {'met' if t.goal_met else 'NOT met'}; "
            f"chosen step {t.chosen} ({', '.join(t.fallback_nodes) or 'nothing'} in FP32). {steps}",
        )
    table.add_row("size", size_text(result.fp32_bytes, result.int8_bytes))
    table.add_row("seconds", ", ".join(f"{k} {v:.1f}" for k, v in data["seconds"].items()))
    table.add_row("CPU", result.cpu.describe())
    source = "chosen by rq for this CPU" if result.reduce_range_source == "cpu" else "set by you"
    table.add_row("reduce_range", f"{result.recipe.reduce_range} ({source}): {result.advice.reason}")
    return table


def fidelity_table(fidelity) -> Table:
    table = Table(
        title="Fidelity to FP32 (label-free)", title_justify="left", show_header=False, min_width=100
    )
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("images", fidelity.source)
    # --runtime applies to --val and --bench; this check is always onnxruntime's (say so beside an OpenVINO bench).
    table.add_row("runtime", "onnxruntime")
    table.add_row(
        "top-1 agreement",
        f"{fidelity.agreement_pct:.2f}% (95% CI [{fidelity.agreement_ci_low_pct:.2f}, "
        f"{fidelity.agreement_ci_high_pct:.2f}]); {fidelity.disagreements} of {fidelity.images} predictions differ",
    )
    sqnr = "logits SQNR" if fidelity.outputs == "logits" else "log-probability SQNR (outputs: probabilities)"
    table.add_row(sqnr, f"{fidelity.logits_sqnr_db:.1f} dB")
    table.add_row("softmax KL", f"{fidelity.softmax_kl:.4f} nats (mean per image)")
    table.caption = "A top-1 drop can never exceed the disagreement rate; with labels (--val) rq measures the drop itself."
    table.caption_justify = "left"
    return table


def validation_table(validation, runtime: str | None = None) -> Table:
    """One row per model; the drop, its CI and the disagreements as rows too, so nothing wraps narrowly."""
    d = validation.drop
    where = f" in {runtime}" if runtime else ""
    table = Table(
        title=f"Validation{where}: {validation.run.images} images of {validation.dataset.root} "
        f"({validation.run.images_per_s:.1f} images/s, decode + both models)",
        title_justify="left",
        min_width=100,
    )
    table.add_column("model")
    table.add_column("top-1 %", justify="right")
    table.add_column("top-5 %", justify="right")
    table.add_column("", overflow="fold")
    verdict = "significant" if d.significant else "within noise"
    table.add_row("FP32", f"{validation.fp32.top1:.2f}", f"{validation.fp32.top5:.2f}", "")
    table.add_row(
        "INT8",
        f"{validation.int8.top1:.2f}",
        f"{validation.int8.top5:.2f}",
        f"top-1 drop {d.drop_pt:.2f} pt, 95% CI [{d.ci_low_pt:.2f}, {d.ci_high_pt:.2f}] "
        f"({METHOD_NAMES.get(d.method, d.method)}, {verdict}); "
        f"top-1 agreement with FP32 {d.agreement_pct:.2f}%: predictions differ on {d.disagreements} "
        f"image{'' if d.disagreements == 1 else 's'} "
        f"(FP32-only right {d.a_only}, INT8-only right {d.b_only})",
    )
    if validation.run.cluster:
        table.caption = f"ran on {cluster_text(validation.run.cluster)}"
        table.caption_justify = "left"
    return table


def cluster_text(cluster: dict) -> str:
    """`Ray at ADDRESS: N nodes, C CPUs` from a run's cluster dict."""
    nodes = cluster.get("nodes")
    return (
        f"Ray cluster at {cluster.get('address')}: {nodes} node{'s' if nodes != 1 else ''}, "
        f"{cluster.get('cpus'):g} CPUs, {cluster.get('actors')} inference actors"
    )


def sweep_table(data: dict) -> Table:
    table = Table(
        title="rq sweep (★ = on the top-1/speed Pareto front, ◆ = on the agreement/speed front)",
        title_justify="left",
    )
    from quantize.report.plot import runtimes_of, speed_key

    batches = sorted({int(b) for v in data["variants"] if v["bench"] for b in v["bench"]})
    # Several runtimes: each row names its own, "speed" is against FP32 in that runtime, and the fronts (★ ◆)
    # put every row on one axis, the speedup against ONNX Runtime's FP32, shown beside it.
    multi = len(runtimes_of(data["variants"])) > 1
    common = speed_key(data["variants"]) if multi else "ratio_to_fp32"
    shared_axis = common != "ratio_to_fp32"
    for col in [
        "variant",
        *(["runtime"] if multi else []),
        "top-1 %",
        "drop pt [95% CI]",
        "agree %",
        "differ",
        *[f"speed b{b}" for b in batches],
        *([f"vs ORT FP32 b{b}" for b in batches] if shared_axis else []),
        "ops",
        "★",
    ]:
        table.add_column(col, justify="left" if col in ("variant", "runtime") else "right")
    if shared_axis and batches:
        table.caption = (
            "speed bN: against FP32 in the row's runtime; vs ORT FP32 bN: against ONNX Runtime's FP32, the axis "
            "of the ★ and ◆ fronts"
        )

    def ratio(v: dict, b: int, key: str) -> str:
        figures = v["bench"].get(str(b)) if v["bench"] else None
        value = figures.get(key) if figures else None
        return f"{value:.2f}×" if value is not None else "—"

    for v in data["variants"]:
        drop = v["drop"]
        drop_text = (
            f"{drop['drop_pt']:.2f} [{drop['ci_low_pt']:.2f}, {drop['ci_high_pt']:.2f}]" if drop else "—"
        )
        speeds = [ratio(v, b, "ratio_to_fp32") for b in batches]
        if shared_axis:
            speeds += [ratio(v, b, common) for b in batches]
        ops = v["quantized_ops"]
        table.add_row(
            escape(v["name"]),
            *([escape(str(v.get("runtime") or "?"))] if multi else []),
            f"{v['accuracy']['top1']:.2f}" if v["accuracy"] else "—",
            drop_text,
            f"{drop['agreement_pct']:.2f}" if drop and drop.get("agreement_pct") is not None else "—",
            str(drop["disagreements"]) if drop else "—",
            *speeds,
            f"{ops['quantized']}/{ops['candidates']}" if ops else "—",
            ("★" if v.get("pareto") else "") + ("◆" if v.get("pareto_agreement") else ""),
        )
    return table


def drops_vs_first(run) -> list:
    """With several models evaluated, each one's paired drop against the first (typically FP32)."""
    from quantize.measure.stats import paired_drop

    first = run.models[0]
    return [None] + [
        paired_drop(
            first.correct_top1, m.correct_top1, disagreements=int((m.predictions != first.predictions).sum())
        )
        if run.images
        else None
        for m in run.models[1:]
    ]


def eval_json(by_runtime: dict, dataset, spec) -> dict:
    """`rq eval --json`: the first runtime's run, its models' drops against the first, every runtime's run."""
    first = next(iter(by_runtime))
    payload = by_runtime[first].to_dict()
    payload.update(folder=str(dataset.root), layout=dataset.layout, preprocess=spec.to_dict(), runtime=first)
    payload["runtimes"] = {name: r.to_dict() for name, r in by_runtime.items()}
    # Each runtime's models against that runtime's first model, as the table prints them; the first runtime's
    # are also the top-level models.
    for name, run in by_runtime.items():
        drops = [drop.to_dict() if drop else None for drop in drops_vs_first(run)]
        for entry, drop in zip(payload["runtimes"][name]["models"], drops, strict=True):
            entry["vs_first"] = drop
        if name == first:
            for entry, drop in zip(payload["models"], drops, strict=True):
                entry["vs_first"] = drop
    return payload


def eval_table(by_runtime: dict, dataset, batch: int) -> Table:
    """`rq eval`: one row per model (and runtime), with its drop against the first model."""
    run = next(iter(by_runtime.values()))
    chosen = list(by_runtime)
    table = Table(
        title=f"{run.images} images of {dataset.root} (layout {dataset.layout}), batch {batch}",
        title_justify="left",
    )
    multi = chosen != ["ort"]
    # Where precision can differ from what the file says (OpenVINO's bf16, emulated Q/DQ); ORT's is in --json.
    precision = multi and any(m.precision for r in by_runtime.values() for m in r.models)
    columns = ["model", *(["runtime"] if multi else []), *(["precision"] if precision else [])]
    columns += ["top-1 %", "top-5 %", "model img/s"]
    if len(run.models) > 1:
        columns += ["drop vs first pt [95% CI]", "agreement with first %"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "runtime") else "right")
    for name, r in by_runtime.items():
        for m, drop in zip(r.models, drops_vs_first(r), strict=True):
            rate = r.images / m.inference_seconds if m.inference_seconds else 0.0
            row = [
                escape(str(m.path)),
                *([name] if multi else []),
                *([m.precision or "—"] if precision else []),
                f"{m.top1:.2f}",
                f"{m.top5:.2f}",
                f"{rate:.1f}",
            ]
            if len(r.models) > 1:
                row += (
                    [
                        f"{drop.drop_pt:.2f} [{drop.ci_low_pt:.2f}, {drop.ci_high_pt:.2f}]",
                        f"{drop.agreement_pct:.2f} ({drop.disagreements} differ)",
                    ]
                    if drop
                    else ["—", "—"]
                )
            table.add_row(*row)
    notes = [f"pipeline: {run.images_per_s:.1f} images/s (decode in parallel + every model)"]
    if not run.cluster:
        from quantize.measure.cpu import detect_cpu

        notes.append(f"CPU: {detect_cpu().describe()}")
    versions = [r.runtime_version for r in by_runtime.values() if r.runtime_version]
    if versions:
        notes.append("runtimes: " + ", ".join(versions))
    if run.cluster:
        notes.append(f"ran on {cluster_text(run.cluster)}; model img/s is per inference actor (one core)")
    if run.skipped:
        notes.append(
            f"{len(run.skipped)} unreadable images skipped, e.g. {run.skipped[0][0]}: {run.skipped[0][1]}"
        )
    for r in by_runtime.values():
        notes.extend(n for n in r.notes if n not in notes)
    table.caption = "\n".join(notes)
    table.caption_justify = "left"
    return table


def inspect_table(nodes, used: int, top: int) -> Table:
    """`rq inspect`: the `top` nodes with the worst activation SQNR."""
    table = Table(
        title=f"Per-node error on {used} images (worst activation SQNR first)", title_justify="left"
    )
    for col in ("node", "op", "weight SQNR dB", "activation SQNR dB", "cosine"):
        table.add_column(col, justify="left" if col in ("node", "op") else "right")
    for n in nodes[:top]:
        table.add_row(
            escape(n.node),
            n.op_type,
            "—" if n.weight_sqnr_db is None else f"{n.weight_sqnr_db:.1f}",
            "—" if n.activation_sqnr_db is None else f"{n.activation_sqnr_db:.1f}",
            "—" if n.activation_cosine is None else f"{n.activation_cosine:.4f}",
        )
    return table
