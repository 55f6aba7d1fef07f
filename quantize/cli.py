"""The `rq` command line: thin typer commands over the library.

Exit codes (documented in the README):
  0  success
  1  an unexpected internal error (one line; RQ_DEBUG=1 shows the traceback)
  2  bad input: a path, a folder, a labels file, a model, an option
  3  the accuracy gate failed (--max-drop): the artifact and report are still written
  130 interrupted (Ctrl-C): nothing half-written is left behind
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from calibration import PRESETS, PreprocessSpec, preset
from calibration.errors import RqInputError
from quantize.recipe import CALIBRATION_METHODS, FORMATS, INT8_TYPES, QuantRecipe

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

app = typer.Typer(
    name="rq",
    help="INT8 post-training quantization of ONNX image classifiers, validated and measured.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Progress and messages go to stderr so that `--json` output on stdout stays machine-readable.
err = Console(stderr=True)


def out_console() -> Console:
    """Console for tables on stdout; piped output gets a wide fixed width instead of rich's 80 columns."""
    return Console() if sys.stdout.isatty() else Console(width=160)


@contextlib.contextmanager
def user_errors():
    """Turn every failure into one line on stderr and a documented exit code; never a traceback."""
    try:
        yield
    except typer.Exit:
        raise
    except RqInputError as exc:
        err.print(f"[bold red]rq: error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        # NothingToQuantize carries exit code 3: the input is valid, but no INT8 model can come of it.
        raise typer.Exit(getattr(exc, "exit_code", EXIT_BAD_INPUT)) from None
    except KeyboardInterrupt:
        # Outputs are written through temporary files: nothing is half-written, but files finished before
        # the interrupt (an INT8 model before its validation, sweep cache entries) are kept.
        err.print(
            "[bold red]rq: interrupted[/]; no half-written file was left (files completed before stay)",
            highlight=False,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as exc:
        if os.environ.get("RQ_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        err.print(
            f"[bold red]rq: internal error:[/] {escape(type(exc).__name__)}: {escape(first)} "
            "(set RQ_DEBUG=1 for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_INTERNAL) from None


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
    )


def _floats3(text: str | None, option: str) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise RqInputError(f"{option} takes three comma-separated numbers, got {text!r}") from None
    if len(values) != 3:
        raise RqInputError(f"{option} takes three comma-separated numbers, got {text!r}")
    return values  # type: ignore[return-value]


def build_spec(
    preset_name: str | None,
    mean: str | None,
    std: str | None,
    resize: int | None,
    crop: int | None,
    interpolation: str | None,
) -> PreprocessSpec:
    base = preset(preset_name) if preset_name else PreprocessSpec()
    return base.with_overrides(
        mean=_floats3(mean, "--mean"),
        std=_floats3(std, "--std"),
        resize=resize,
        crop=crop,
        interpolation=interpolation,
    )


def _csv(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(t for t in (p.strip() for p in text.split(",")) if t)


# Options shared by commands that read images.
PresetOpt = Annotated[
    str | None,
    typer.Option("--preset", help=f"Preprocessing preset: {', '.join(PRESETS)} (default resnet50-v2)."),
]
MeanOpt = Annotated[str | None, typer.Option(help="Per-channel mean, e.g. 0.485,0.456,0.406.")]
StdOpt = Annotated[str | None, typer.Option(help="Per-channel std, e.g. 0.229,0.224,0.225.")]
ResizeOpt = Annotated[int | None, typer.Option(help="Resize the shorter side to this many pixels (256).")]
CropOpt = Annotated[int | None, typer.Option(help="Center crop size (224).")]
InterpOpt = Annotated[
    str | None, typer.Option(help="Resize filter: bilinear, bicubic, nearest, lanczos, box, hamming.")
]
LabelsOpt = Annotated[
    Path | None, typer.Option(help="Labels file for a flat folder: Caffe val.txt or LOC_val_solution.csv.")
]
WorkersOpt = Annotated[int | None, typer.Option(help="Image decoding threads (default: CPU count).")]


def _recipe_from_options(base: QuantRecipe, **options) -> QuantRecipe:
    changes = {k: v for k, v in options.items() if v is not None}
    return base.with_changes(**changes)


def _summary_table(result) -> Table:
    data = result.to_dict()
    table = Table(title=f"rq quantize → {result.output}", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    calib = data["calibration"]
    table.add_row("calibration folder", f"{calib['folder']} (layout: {calib['layout']})")
    for note in calib["notes"]:
        table.add_row("", note)
    skipped = calib["skipped"]
    table.add_row(
        "images",
        f"{calib['images_used']} used of {calib['images_requested']} sampled "
        f"({calib['images_available']} available), {len(skipped)} skipped",
    )
    for path, reason in skipped[:10]:
        table.add_row("  skipped", f"{path}: {reason}")
    if len(skipped) > 10:
        table.add_row("  skipped", f"… and {len(skipped) - 10} more")
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
    if result.tuning is not None:
        t = result.tuning
        steps = "; ".join(
            f"step {st.step}: {len(st.fallback)} FP32, drop {st.drop_pt:.2f} pt" for st in t.steps
        )
        table.add_row(
            "tuning",
            f"goal ≤ {t.max_drop_pt:.2f} pt on {t.tune_images} images {'met' if t.goal_met else 'NOT met'}; "
            f"chosen step {t.chosen} ({', '.join(t.fallback_nodes) or 'nothing'} in FP32). {steps}",
        )
    mb = 1_000_000  # decimal MB, as in the report
    table.add_row(
        "size",
        f"{result.fp32_bytes / mb:.1f} MB FP32 → {result.int8_bytes / mb:.1f} MB INT8 "
        f"({result.fp32_bytes / max(result.int8_bytes, 1):.2f}× smaller)",
    )
    table.add_row("seconds", ", ".join(f"{k} {v:.1f}" for k, v in data["seconds"].items()))
    table.add_row("CPU", result.cpu.describe())
    source = "chosen by rq for this CPU" if result.reduce_range_source == "cpu" else "set by you"
    table.add_row("reduce_range", f"{result.recipe.reduce_range} ({source}): {result.advice.reason}")
    return table


@app.command()
def quantize(
    model: Annotated[
        Path, typer.Argument(help="FP32 ONNX classifier (any opset; zoo opset-7 files are upgraded).")
    ],
    calib: Annotated[Path, typer.Option("--calib", help="Folder of calibration images (labels not needed).")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output file (default: <model>-int8.onnx in this folder)."),
    ] = None,
    labels: LabelsOpt = None,
    samples: Annotated[int | None, typer.Option(help="Calibration images to use (100).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the calibration sample (0).")] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Calibration batch size (8).")
    ] = None,
    recipe_file: Annotated[
        Path | None,
        typer.Option("--recipe", help="Start from a recipe JSON file; options below override it."),
    ] = None,
    fmt: Annotated[str | None, typer.Option("--format", help=f"{' | '.join(FORMATS)} (qdq).")] = None,
    calibration: Annotated[
        str | None, typer.Option("--calibration", help=f"{' | '.join(CALIBRATION_METHODS)} (percentile).")
    ] = None,
    percentile: Annotated[
        float | None, typer.Option(help="Percentile for --calibration percentile (99.999).")
    ] = None,
    bins: Annotated[int | None, typer.Option(help="Histogram bins for entropy/percentile (2048).")] = None,
    per_channel: Annotated[
        bool | None, typer.Option("--per-channel/--per-tensor", help="Per-channel weight scales (on).")
    ] = None,
    bias_correction: Annotated[
        bool | None,
        typer.Option(
            "--bias-correction/--no-bias-correction",
            help="Fold INT8's mean output shift of each Conv/Gemm channel into its bias (see docs/placement.md).",
        ),
    ] = None,
    reduce_range: Annotated[
        bool | None,
        typer.Option(
            "--reduce-range/--no-reduce-range",
            help="7-bit weights. Default: decided from the CPU (on without VNNI).",
        ),
    ] = None,
    activation_type: Annotated[str | None, typer.Option(help=f"{' | '.join(INT8_TYPES)} (uint8).")] = None,
    weight_type: Annotated[str | None, typer.Option(help=f"{' | '.join(INT8_TYPES)} (int8).")] = None,
    op_types: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated op types to quantize (default: placement decided from the graph, "
            "see docs/placement.md)."
        ),
    ] = None,
    exclude_nodes: Annotated[
        str | None, typer.Option(help="Comma-separated node names to keep in FP32.")
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="Quantization backend: ort (default) or inc (needs the inc extra).")
    ] = None,
    preset_name: PresetOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    interpolation: InterpOpt = None,
    workers: WorkersOpt = None,
    val: Annotated[
        Path | None,
        typer.Option("--val", help="Labelled images: evaluate FP32 and INT8 on them after quantizing."),
    ] = None,
    val_labels: Annotated[Path | None, typer.Option(help="Labels file for a flat --val folder.")] = None,
    val_limit: Annotated[int | None, typer.Option(help="Evaluate on this many --val images (all).")] = None,
    max_drop: Annotated[
        float | None,
        typer.Option(help="Accuracy gate: fail (exit code 3) when INT8 loses more top-1 points than this."),
    ] = None,
    tune: Annotated[
        bool,
        typer.Option(
            "--tune",
            help="Accuracy-aware tuning: fall nodes back to FP32 until the drop fits --max-drop (needs --val).",
        ),
    ] = False,
    max_trials: Annotated[int, typer.Option(help="Most tuning steps (fallbacks or INC trials).")] = 12,
    tune_fraction: Annotated[
        float, typer.Option(help="Share of --val images used to tune; the rest confirms the result.")
    ] = 0.5,
    eval_batch: Annotated[int, typer.Option(help="Batch size of the validation pass.")] = 32,
    bench: Annotated[
        bool, typer.Option("--bench", help="Benchmark FP32 vs INT8 (interleaved) afterwards.")
    ] = False,
    bench_batch: Annotated[str, typer.Option(help="Batch sizes for --bench.")] = "1,8",
    bench_runs: Annotated[int, typer.Option(help="Timed runs per model and batch for --bench.")] = 20,
    report_dir: Annotated[
        Path, typer.Option(help="Reports go to REPORT_DIR/<run-id>/ (report.json, report.md, report.html).")
    ] = Path("reports"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Quantize an FP32 ONNX classifier to INT8 with calibration images; write a checked model and a report.

    With --val, FP32 and INT8 are evaluated on the same images and the top-1 drop is reported with a paired
    95% confidence interval; with --max-drop the run fails (exit code 3) when the drop exceeds it, though the
    model and the report are still written.
    """

    from quantize.bench import bench_models
    from quantize.pipeline import Progress, quantize_model
    from quantize.report import write_report
    from quantize.tune import TuneRequest, split_for_tuning
    from quantize.validate import Gate, validate, validation_samples

    with user_errors():
        base = QuantRecipe()
        if recipe_file is not None:
            if not recipe_file.is_file():
                raise RqInputError(f"recipe file not found: {recipe_file}")
            try:
                text = recipe_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise RqInputError(f"cannot read recipe file {recipe_file}: {exc}") from None
            base = QuantRecipe.from_json(text)
        recipe = _recipe_from_options(
            base,
            backend=backend,
            format=fmt,
            activation_type=activation_type,
            weight_type=weight_type,
            per_channel=per_channel,
            reduce_range=reduce_range,
            bias_correction=bias_correction,
            calibration=calibration,
            percentile=percentile,
            num_bins=bins,
            samples=samples,
            seed=seed,
            batch_size=batch_size,
            op_types=_csv(op_types),
            exclude_nodes=_csv(exclude_nodes),
        )
        spec = build_spec(preset_name, mean, std, resize, crop, interpolation)
        # Check everything the later stages need before the expensive ones start.
        if max_drop is not None and val is None:
            raise RqInputError("--max-drop needs --val (the images to measure the drop on)")
        if max_drop is not None and max_drop < 0:
            raise RqInputError("--max-drop must be ≥ 0")
        if tune and (val is None or max_drop is None):
            raise RqInputError("--tune needs --val (images to measure on) and --max-drop (the goal)")
        if max_trials < 1:
            raise RqInputError("--max-trials must be ≥ 1")
        if eval_batch < 1:
            raise RqInputError("--eval-batch must be ≥ 1")
        bench_batches = _parse_batches(bench_batch, "--bench-batch") if bench else []
        if bench and bench_runs < 1:
            raise RqInputError("--bench-runs must be ≥ 1")
        val_dataset = val_samples = None
        tune_request = None
        if val is not None:
            # The FP32 model must be one rq can evaluate (ImageNet classes) before any INT8 file is written.
            check_evaluable(model)
            val_dataset, val_samples = validation_samples(val, val_labels, val_limit)
            if tune:
                # Tune on one part of the images, confirm (and gate) on the other: the drop reported is not
                # the one the tuner optimized.
                tune_samples, val_samples = split_for_tuning(val_samples, tune_fraction)
                tune_request = TuneRequest(max_drop, tuple(tune_samples), max_trials=max_trials)
        ensure_writable_dir(report_dir)
        with progress_bar() as bar:
            task = {}

            def on_stage(name: str) -> None:
                if name != "calibrate":
                    err.print(f"[dim]· {name}[/]", highlight=False)

            def on_start(total: int) -> None:
                task["id"] = bar.add_task("calibrating", total=total)

            def on_advance(n: int) -> None:
                bar.advance(task["id"], n)

            result = quantize_model(
                model,
                calib,
                output=out,
                recipe=recipe,
                spec=spec,
                labels=labels,
                workers=workers,
                progress=Progress(stage=on_stage, calibration_start=on_start, calibration_advance=on_advance),
                tune=tune_request,
                log=lambda msg: err.print(f"[dim]  {escape(msg)}[/]", highlight=False),
            )
            validation = gate = bench_result = None
            if val_dataset is not None:
                err.print("[dim]· validate (FP32 and INT8 on the same images)[/]", highlight=False)
                vtask = bar.add_task("validating", total=len(val_samples))
                validation = validate(
                    model,
                    result.output,
                    val_dataset,
                    val_samples,
                    spec,
                    batch_size=eval_batch,
                    calibration_files=result.calibration_files,
                    workers=workers,
                    on_images=lambda n: bar.advance(vtask, n),
                )
                result.seconds["validate"] = validation.run.seconds
                if max_drop is not None:
                    tuning = result.tuning
                    chosen = tuning.chosen_step if tuning else None
                    gate = Gate(
                        max_drop,
                        validation.drop.drop_pt,
                        EXIT_GATE_FAILED,
                        f"INT8 {result.recipe.label()}",
                        tuning_goal_met=tuning.goal_met if tuning else None,
                        tuning_best_drop_pt=chosen.drop_pt if chosen else None,
                    )
        if bench_batches:
            err.print("[dim]· bench (FP32 and INT8 interleaved)[/]", highlight=False)
            started = time.perf_counter()
            bench_result = bench_models([model, result.output], batch_sizes=bench_batches, runs=bench_runs)
            result.seconds["bench"] = time.perf_counter() - started
        run_report = _quantize_report(result, validation, gate, bench_result)
        paths = write_report(run_report, report_dir / run_report["run_id"])
        if as_json:
            typer.echo(json.dumps(run_report, indent=2))
        else:
            console = out_console()
            console.print(_summary_table(result))
            if validation is not None:
                console.print(_validation_table(validation))
            if bench_result is not None:
                console.print(bench_result.render_table())
        if validation is not None and validation.overlap_with_calibration:
            err.print(
                f"[yellow]warning:[/] {validation.overlap_with_calibration} validation images are also "
                "calibration images: the measured drop is optimistic",
                highlight=False,
            )
        err.print(f"report: {paths['html']}", highlight=False, soft_wrap=True)
        if gate is not None:
            style = "bold green" if gate.passed else "bold red"
            err.print(f"[{style}]{escape(gate.message)}[/]", highlight=False)
            if not gate.passed:
                raise typer.Exit(EXIT_GATE_FAILED)


def check_evaluable(model: Path) -> None:
    from quantize.evaluate import check_classifier_outputs, open_session

    if model.is_file():
        check_classifier_outputs(open_session(model), model)


def ensure_writable_dir(directory: Path) -> None:
    """Check a report can be written under `directory` (before any long work) without creating it yet."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RqInputError(f"report folder is not writable: {directory} ({existing} is not a folder)")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise RqInputError(f"report folder is not writable: {directory} ({exc.strerror or exc})") from None


def _quantize_report(result, validation, gate, bench_result) -> dict:
    from quantize.report_data import accuracy_of, bench_by_batch, build_report, variant

    variants = [
        variant(
            "FP32",
            "fp32",
            result.prepared.source,
            accuracy=accuracy_of(validation, 0),
            bench=bench_by_batch(bench_result, 0),
        ),
        variant(
            f"INT8 {result.recipe.label()}",
            "int8",
            result.output,
            recipe=result.recipe,
            quantized_ops=result.quantized_ops,
            accuracy=accuracy_of(validation, 1),
            drop=validation.drop if validation else None,
            bench=bench_by_batch(bench_result, 1),
        ),
    ]
    calibration = result.to_dict()["calibration"]
    notes = []
    if validation is not None and validation.overlap_with_calibration:
        notes.append(
            f"{validation.overlap_with_calibration} validation images are also calibration images: "
            "the measured drop is optimistic"
        )
    if result.bias_correction is not None:
        notes.append(f"bias correction: {result.bias_correction.describe()}")
    if result.tuning is not None:
        tuning = result.tuning
        notes.append(
            f"tuning ({tuning.backend}): {len(tuning.fallback_nodes)} node(s) fell back to FP32; the validation "
            "figures are on the images held out from tuning"
        )
    data = build_report(
        command=["rq", *sys.argv[1:]],
        model=result.prepared.source,
        cpu=result.cpu,
        advice=result.advice,
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
    if result.bias_correction is not None:
        data["bias_correction"] = result.bias_correction.to_dict()
    return data


def _validation_table(validation) -> Table:
    """One row per model; the drop, its CI and the disagreements as rows too, so nothing wraps narrowly."""
    d = validation.drop
    table = Table(
        title=f"Validation: {validation.run.images} images of {validation.dataset.root} "
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
        f"top-1 drop {d.drop_pt:.2f} pt, 95% CI [{d.ci_low_pt:.2f}, {d.ci_high_pt:.2f}] ({d.method}, {verdict}); "
        f"predictions differ on {d.disagreements} images (FP32-only right {d.a_only}, INT8-only right {d.b_only})",
    )
    return table


@app.command("eval")
def eval_(
    models: Annotated[
        list[Path], typer.Argument(help="ONNX classifier(s); several are run on the same batches.")
    ],
    data: Annotated[Path, typer.Option("--data", help="Labelled ImageNet folder (any layout rq detects).")],
    labels: LabelsOpt = None,
    limit: Annotated[
        int | None, typer.Option(help="Evaluate a deterministic sample of this many images.")
    ] = None,
    batch: Annotated[int, typer.Option(help="Batch size.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the --limit sample.")] = 0,
    preset_name: PresetOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    interpolation: InterpOpt = None,
    workers: WorkersOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Top-1 and top-5 accuracy of ONNX classifiers on a labelled ImageNet folder."""

    from quantize.evaluate import evaluate
    from quantize.validate import validation_samples

    with user_errors():
        if batch < 1:
            raise RqInputError("--batch must be ≥ 1")
        spec = build_spec(preset_name, mean, std, resize, crop, interpolation)
        dataset, samples = validation_samples(data, labels, limit, seed)
        with progress_bar() as bar:
            task = bar.add_task("evaluating", total=len(samples))
            run = evaluate(
                models,
                samples,
                spec,
                batch_size=batch,
                workers=workers,
                on_images=lambda n: bar.advance(task, n),
            )
        if as_json:
            payload = run.to_dict()
            payload.update(
                {"folder": str(dataset.root), "layout": dataset.layout, "preprocess": spec.to_dict()}
            )
            typer.echo(json.dumps(payload, indent=2))
            return
        table = Table(
            title=f"{run.images} images of {dataset.root} (layout {dataset.layout}), batch {batch}",
            title_justify="left",
        )
        for col in ("model", "top-1 %", "top-5 %", "model img/s"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for m in run.models:
            rate = run.images / m.inference_seconds if m.inference_seconds else 0.0
            table.add_row(escape(str(m.path)), f"{m.top1:.2f}", f"{m.top5:.2f}", f"{rate:.1f}")
        notes = [f"pipeline: {run.images_per_s:.1f} images/s (decode in parallel + every model)"]
        if run.skipped:
            notes.append(
                f"{len(run.skipped)} unreadable images skipped, e.g. {run.skipped[0][0]}: {run.skipped[0][1]}"
            )
        notes.extend(run.notes)
        table.caption = "\n".join(notes)
        table.caption_justify = "left"
        out_console().print(table)


@app.command()
def sweep(
    model: Annotated[Path, typer.Argument(help="FP32 ONNX classifier.")],
    calib: Annotated[Path, typer.Option("--calib", help="Folder of calibration images.")],
    val: Annotated[Path, typer.Option("--val", help="Labelled validation images.")],
    grid: Annotated[
        str,
        typer.Option(
            help="Recipe grid: default, full, calibration, formats, parity (ORT vs INC; needs the inc extra)."
        ),
    ] = "default",
    labels: LabelsOpt = None,
    val_labels: Annotated[Path | None, typer.Option(help="Labels file for a flat --val folder.")] = None,
    val_limit: Annotated[int | None, typer.Option(help="Evaluate on this many --val images (all).")] = None,
    samples: Annotated[int | None, typer.Option(help="Calibration images to use (100).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the calibration sample (0).")] = None,
    bench_batch: Annotated[str, typer.Option(help="Batch sizes to benchmark; 'none' to skip.")] = "1,8",
    bench_runs: Annotated[int, typer.Option(help="Timed runs per model and batch.")] = 10,
    eval_batch: Annotated[int, typer.Option(help="Batch size of the validation passes.")] = 32,
    report_dir: Annotated[Path, typer.Option(help="Reports go to REPORT_DIR/<run-id>/.")] = Path("reports"),
    preset_name: PresetOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    interpolation: InterpOpt = None,
    workers: WorkersOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Quantize, validate and benchmark a grid of recipes; report the accuracy/speed Pareto front.

    Finished recipes are cached under REPORT_DIR/.sweep-cache/, so an interrupted sweep resumes.
    """
    from quantize.report import write_report
    from quantize.sweep import run_sweep, sweep_report

    with user_errors():
        spec = build_spec(preset_name, mean, std, resize, crop, interpolation)
        base = _recipe_from_options(QuantRecipe(), samples=samples, seed=seed)
        batches = (
            [] if bench_batch.strip().lower() == "none" else _parse_batches(bench_batch, "--bench-batch")
        )
        if batches and bench_runs < 1:
            raise RqInputError("--bench-runs must be ≥ 1")
        if eval_batch < 1:
            raise RqInputError("--eval-batch must be ≥ 1")
        ensure_writable_dir(report_dir)
        result = run_sweep(
            model,
            calib,
            val,
            grid=grid,
            base=base,
            spec=spec,
            labels=labels,
            val_labels=val_labels,
            val_limit=val_limit,
            report_dir=report_dir,
            bench_batches=batches,
            bench_runs=bench_runs,
            eval_batch=eval_batch,
            workers=workers,
            log=lambda msg: err.print(f"[dim]· {escape(msg)}[/]", highlight=False),
        )
        data = sweep_report(result, ["rq", *sys.argv[1:]], grid)
        paths = write_report(data, report_dir / data["run_id"])
        if as_json:
            typer.echo(json.dumps(data, indent=2))
        else:
            out_console().print(_sweep_table(data))
        err.print(f"report: {paths['html']}", highlight=False, soft_wrap=True)


def _sweep_table(data: dict) -> Table:
    table = Table(title="rq sweep (★ = on the accuracy/speed Pareto front)", title_justify="left")
    batches = sorted({int(b) for v in data["variants"] if v["bench"] for b in v["bench"]})
    for col in [
        "variant",
        "top-1 %",
        "drop pt [95% CI]",
        "differ",
        *[f"speed b{b}" for b in batches],
        "ops",
        "★",
    ]:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for v in data["variants"]:
        drop = v["drop"]
        drop_text = (
            f"{drop['drop_pt']:.2f} [{drop['ci_low_pt']:.2f}, {drop['ci_high_pt']:.2f}]" if drop else "—"
        )
        speeds = [f"{v['bench'][str(b)]['ratio_to_fp32']:.2f}×" if v["bench"] else "—" for b in batches]
        ops = v["quantized_ops"]
        table.add_row(
            escape(v["name"]),
            f"{v['accuracy']['top1']:.2f}" if v["accuracy"] else "—",
            drop_text,
            str(drop["disagreements"]) if drop else "—",
            *speeds,
            f"{ops['quantized']}/{ops['candidates']}" if ops else "—",
            "★" if v.get("pareto") else "",
        )
    return table


@app.command()
def inspect(
    fp32: Annotated[Path, typer.Argument(help="The FP32 model the INT8 one was made from.")],
    int8: Annotated[Path, typer.Argument(help="The INT8 model (QDQ format).")],
    calib: Annotated[Path, typer.Option("--calib", help="Images to run both models on.")],
    labels: LabelsOpt = None,
    samples: Annotated[int, typer.Option(help="Images to use.")] = 16,
    top: Annotated[int, typer.Option(help="Rows to print (worst first); the report has them all.")] = 15,
    report_dir: Annotated[Path, typer.Option(help="Reports go to REPORT_DIR/<run-id>/.")] = Path("reports"),
    preset_name: PresetOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    interpolation: InterpOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the per-node errors as JSON on stdout.")
    ] = False,
) -> None:
    """Per-node weight and activation SQNR / cosine of an INT8 model against FP32, worst first."""
    from calibration import BatchStream, discover_dataset, select_samples
    from quantize.cpu import detect_cpu
    from quantize.inspection import inspect_models
    from quantize.prepare import prepare_model
    from quantize.report import write_report
    from quantize.report_data import build_report, variant

    with user_errors():
        if samples < 1:
            raise RqInputError("--samples must be ≥ 1")
        spec = build_spec(preset_name, mean, std, resize, crop, interpolation)
        dataset = discover_dataset(calib, labels)
        chosen = select_samples(dataset, samples, 0)
        ensure_writable_dir(report_dir)
        with tempfile.TemporaryDirectory(prefix="rq-inspect-") as tmp:
            # The INT8 model was made from the prepared graph: compare against the same graph (same names).
            prepared = prepare_model(fp32, Path(tmp))
            with BatchStream(chosen, spec, batch_size=8) as stream:
                nodes = inspect_models(prepared.path, int8, (b.images for b in stream))
                used = stream.used
        rows = [n.to_dict() for n in nodes]
        data = build_report(
            command=["rq", *sys.argv[1:]],
            model=fp32,
            cpu=detect_cpu(),
            advice=None,
            prepared=prepared,
            variants=[variant("FP32", "fp32", fp32), variant("INT8", "int8", int8)],
            label="inspect",
        )
        data["inspection"] = {"images": used, "nodes": rows}
        paths = write_report(data, report_dir / data["run_id"])
        if as_json:
            typer.echo(json.dumps(data["inspection"], indent=2))
        else:
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
            out_console().print(table)
        err.print(f"report: {paths['html']}", highlight=False, soft_wrap=True)


@app.command()
def report(
    directory: Annotated[Path, typer.Argument(help="A report folder holding report.json.")],
) -> None:
    """Re-render report.md and report.html from a report folder's report.json."""
    from quantize.report import render_report

    with user_errors():
        paths = render_report(directory)
        for path in paths.values():
            typer.echo(str(path))


@app.command()
def fetch(
    name: Annotated[str, typer.Argument(help="Model name from the manifest, e.g. resnet50-v2.")],
    dest: Annotated[Path, typer.Option(help="Folder to download into.")] = Path("models"),
    manifest: Annotated[
        Path | None, typer.Option(help="Manifest file (default: models/manifest.json).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Download again even if a verified copy exists.")] = False,
) -> None:
    """Download a model from the manifest, verify its size and sha256, write it atomically."""
    from quantize.fetch import fetch_with_progress, load_manifest, resolve

    with user_errors():
        entry = resolve(name, load_manifest(manifest))
        path = fetch_with_progress(entry, dest, force=force, console=err)
        typer.echo(str(path))


@app.command()
def bench(
    models: Annotated[list[Path], typer.Argument(help="ONNX models; ratios are relative to the first.")],
    batch: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8",
    threads: Annotated[int | None, typer.Option(help="Intra-op threads (default: physical cores).")] = None,
    runs: Annotated[int, typer.Option(help="Timed runs per model and batch size.")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Latency and throughput of models, run interleaved (A B A B …) so drift hits all alike."""
    from quantize.bench import bench_models

    with user_errors():
        batches = _parse_batches(batch)
        result = bench_models(models, batch_sizes=batches, threads=threads, runs=runs, warmup=warmup)
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2))
        else:
            out_console().print(result.render_table())


def _parse_batches(text: str, option: str = "--batch") -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RqInputError(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise RqInputError(f"{option} must be ≥ 1")
    return values


def main() -> None:  # pragma: no cover - console entry for `python -m quantize.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
