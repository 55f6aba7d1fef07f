"""The `rq` command line: thin typer commands over the library.

Exit codes: one contract, in quantize/exits.py (documented in the README): 0 success, 1 internal error,
2 bad input (nothing written), 3 gate failed, 4 quantization failed, 5 environment failure (disk full,
permission lost), 6 model written but report failed, 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP.
"""

from __future__ import annotations

import contextlib
import math
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
from calibration.errors import RqEnvironmentError, RqInputError
from quantize.exits import (
    EXIT_BAD_INPUT,
    EXIT_ENVIRONMENT,
    EXIT_GATE_FAILED,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_QUANTIZATION_FAILED,
    EXIT_REPORT_FAILED,
    ReportFailed,
    classify,
    handle_signals,
    quiet_onnxruntime,
)
from quantize.files import json_text, work_folder
from quantize.recipe import CALIBRATION_METHODS, FORMATS, INT8_TYPES, QuantRecipe

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_ENVIRONMENT",
    "EXIT_GATE_FAILED",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_QUANTIZATION_FAILED",
    "EXIT_REPORT_FAILED",
    "app",
]

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
    """Turn every failure into one line on stderr and its documented exit code (quantize/exits.py).

    SIGTERM and SIGHUP are handled like Ctrl-C for the block: the work folder is removed, no half-written
    file is left, and rq exits with 128 + the signal number.
    """
    with handle_signals():
        try:
            quiet_onnxruntime()
            yield
        except typer.Exit:
            raise
        except BaseException as exc:
            if not isinstance(exc, Exception | KeyboardInterrupt):
                raise  # SystemExit, GeneratorExit
            outcome = classify(exc)
            if outcome.code == EXIT_INTERNAL and os.environ.get("RQ_DEBUG"):
                raise
            hint = " (set RQ_DEBUG=1 for the traceback)" if outcome.code == EXIT_INTERNAL else ""
            err.print(
                f"[bold red]rq: {outcome.label}:[/] {escape(outcome.message)}{hint}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(outcome.code) from None


def _json(data) -> str:
    """`--json` output: strict JSON (a non-finite number is null, never a bare NaN)."""
    return json_text(data, indent=2)


def check_finite(value: float | None, option: str) -> None:
    """Every float option must be a real number: `nan` and `inf` parse as floats and would pass range checks."""
    if value is not None and not math.isfinite(value):
        raise RqInputError(f"{option} must be a finite number, got {value}")


def check_workers(workers: int | None) -> None:
    if workers is not None and workers < 1:
        raise RqInputError(f"--workers must be ≥ 1, got {workers}")


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
    if not all(math.isfinite(v) for v in values):
        raise RqInputError(f"{option} takes three finite numbers, got {text!r}")
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
RuntimeOpt = Annotated[
    str,
    typer.Option(
        "--runtime",
        help="Where to run the models: ort | openvino | ort-openvino, or several comma-separated (ort).",
    ),
]
RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="auto|local|ADDRESS",
        help="Validate on a Ray cluster (the ray extra): auto (RAY_ADDRESS, a `ray start` cluster on this "
        "machine, else a local one), local (a new local Ray), or the head's HOST:PORT.",
    ),
]


@contextlib.contextmanager
def ray_session(address: str | None):
    """A connected `quantize.distributed.RayRunner` for `--ray`, or None; Ray is shut down afterwards."""
    if address is None:
        yield None
        return
    from quantize.distributed import RayRunner

    runner = RayRunner(address)
    try:
        cluster = runner.connect()
        err.print(f"[dim]· {escape(cluster.describe())}[/]", highlight=False)
        yield runner
    finally:
        runner.close()


# The recipe's own messages name its fields; when a value came from a flag, the message names the flag.
# (field, how the recipe's messages start, the flag)
_FLAG_MESSAGES = (
    ("num_bins", "num_bins must", "--bins must"),
    ("num_bins", "histogram bins apply", "--bins applies"),
    ("samples", "samples must", "--samples must"),
    ("seed", "recipe seed must", "--seed must"),
    ("batch_size", "batch size must", "--batch-size must"),
    ("percentile", "percentile must", "--percentile must"),
    ("format", "format must", "--format must"),
    ("backend", "backend must", "--backend must"),
    ("calibration", "calibration must", "--calibration must"),
    ("activation_type", "activation type must", "--activation-type must"),
    ("weight_type", "weight type must", "--weight-type must"),
    ("op_types", "op_types must", "--op-types must"),
)


def _recipe_from_options(base: QuantRecipe, **options) -> QuantRecipe:
    changes = {k: v for k, v in options.items() if v is not None}
    try:
        return base.with_changes(**changes)
    except RqInputError as exc:
        message = str(exc)
        for name, start, flag in _FLAG_MESSAGES:
            if name in changes and message.startswith(start):
                raise RqInputError(flag + message[len(start) :]) from None
        raise


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
    calib: Annotated[Path, typer.Option("--calib", help="Folder of calibration images (labels not needed).")],
    model: Annotated[
        str | None,
        typer.Argument(
            metavar="MODEL",
            help="FP32 ONNX classifier (any opset; zoo opset-7 files are upgraded), or a model of "
            "models/manifest.json by name (resnet50-v2, resnet50-v2-7), fetched into models/ when absent. "
            "Default: the manifest's default model (resnet50-v2).",
        ),
    ] = None,
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
    gate_on: Annotated[
        str,
        typer.Option(
            "--gate-on",
            help="What --max-drop is compared with: point (the measured drop) or ci (the upper bound of its "
            "95% interval: a pass then means these images show the goal is met).",
        ),
    ] = "point",
    holdout_images: Annotated[
        int | None,
        typer.Option(
            help="Held-back calibration images (--calib images calibration did not read; no labels needed). "
            "Without --val, INT8's agreement with FP32, logits SQNR and softmax KL are measured on this many "
            "(500); with --tune, they join the tuning images in the tuner's fidelity objective (all). 0: none.",
        ),
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
    eval_batch: Annotated[int, typer.Option(help="Batch size of the validation and tuning passes.")] = 32,
    ray: RayOpt = None,
    bench: Annotated[
        bool, typer.Option("--bench", help="Benchmark FP32 vs INT8 (interleaved) afterwards.")
    ] = False,
    bench_batch: Annotated[str, typer.Option(help="Batch sizes for --bench.")] = "1,8",
    bench_runs: Annotated[int, typer.Option(help="Timed runs per model and batch for --bench.")] = 20,
    runtime: RuntimeOpt = "ort",
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

    from quantize.fetch import fetch_with_progress, model_argument
    from quantize.measure import runtimes
    from quantize.measure.bench import bench_models
    from quantize.measure.fidelity import DEFAULT_HOLDOUT_IMAGES
    from quantize.measure.validate import GATE_ON, Gate, validate, validation_samples
    from quantize.pipeline import Progress, quantize_model
    from quantize.report import write_report
    from quantize.tune import TuneRequest, split_for_tuning

    with user_errors(), contextlib.ExitStack() as stack:
        base = QuantRecipe()
        if recipe_file is not None:
            if not recipe_file.is_file():
                raise RqInputError(f"recipe file not found: {recipe_file}")
            try:
                # utf-8-sig: a byte-order mark (Windows editors write one) is accepted, as in labels files.
                text = recipe_file.read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as exc:
                raise RqInputError(f"cannot read recipe file {recipe_file}: {exc}") from None
            try:
                base = QuantRecipe.from_json(text)
            except RqInputError as exc:
                raise RqInputError(f"recipe file {recipe_file}: {exc}") from None
        check_finite(percentile, "--percentile")
        check_finite(max_drop, "--max-drop")
        check_finite(tune_fraction, "--tune-fraction")
        check_workers(workers)
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
        if gate_on not in GATE_ON:
            raise RqInputError(f"--gate-on must be one of {', '.join(GATE_ON)}, not {gate_on!r}")
        if holdout_images is not None and holdout_images < 0:
            raise RqInputError("--holdout-images must be ≥ 0")
        if tune and (val is None or max_drop is None):
            raise RqInputError("--tune needs --val (images to measure on) and --max-drop (the goal)")
        if max_trials < 1:
            raise RqInputError("--max-trials must be ≥ 1")
        if eval_batch < 1:
            raise RqInputError("--eval-batch must be ≥ 1")
        bench_batches = _parse_batches(bench_batch, "--bench-batch") if bench else []
        if bench and bench_runs < 1:
            raise RqInputError("--bench-runs must be ≥ 1")
        chosen_runtimes = runtimes.parse(runtime)
        if ray is not None and chosen_runtimes != ["ort"]:
            raise RqInputError("--ray runs models in onnxruntime only; drop --runtime or --ray")
        if ray is not None and val is None:
            raise RqInputError("--ray runs the validation on a Ray cluster: it needs --val")
        # Last of the option checks, first of the work: a named or default model may be downloaded.
        model = model_argument(
            model, fetcher=lambda entry, dest: fetch_with_progress(entry, dest, console=err)
        )
        runner = stack.enter_context(ray_session(ray))
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
                tune_request = TuneRequest(
                    max_drop,
                    tuple(tune_samples),
                    max_trials=max_trials,
                    holdout_images=holdout_images if holdout_images is not None else 1_000_000,
                    never_use=tuple(s.path for s in val_samples),
                    ray=runner,
                    eval_batch=eval_batch,
                )
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
            validation = gate = bench_result = fidelity = None
            validations = {}
            if val_dataset is not None:
                for rt in chosen_runtimes:
                    where = "" if chosen_runtimes == ["ort"] else f" in {rt}"
                    err.print(
                        f"[dim]· validate (FP32 and INT8 on the same images{where})[/]", highlight=False
                    )
                    vtask = bar.add_task(f"validating{where}", total=len(val_samples))
                    validations[rt] = validate(
                        model,
                        result.output,
                        val_dataset,
                        val_samples,
                        spec,
                        batch_size=eval_batch,
                        calibration_files=result.calibration_files,
                        workers=workers,
                        on_images=lambda n, vtask=vtask: bar.advance(vtask, n),
                        ray=runner,
                        runtime=rt,
                    )
                validation = validations[chosen_runtimes[0]]
                result.seconds["validate"] = sum(v.run.seconds for v in validations.values())
                if max_drop is not None:
                    tuning = result.tuning
                    chosen = tuning.chosen_step if tuning else None
                    # Integer arithmetic differs between runtimes: the gate holds in every one validated.
                    worst_rt = max(validations, key=lambda rt: validations[rt].drop.drop_pt)
                    gated = f"INT8 {result.recipe.label()}" + (
                        "" if worst_rt == chosen_runtimes[0] else f" · {worst_rt}"
                    )
                    gate = Gate.from_drop(
                        max_drop,
                        validations[worst_rt].drop,
                        EXIT_GATE_FAILED,
                        gated,
                        gate_on=gate_on,
                        tuning_goal_met=tuning.goal_met if tuning else None,
                        tuning_best_drop_pt=chosen.drop_pt if chosen else None,
                    )
            elif holdout_images != 0:
                limit = DEFAULT_HOLDOUT_IMAGES if holdout_images is None else holdout_images
                fidelity = _holdout_fidelity(model, result, spec, limit, eval_batch, workers, bar)
        if bench_batches:
            err.print("[dim]· bench (FP32 and INT8 interleaved)[/]", highlight=False)
            started = time.perf_counter()
            bench_result = bench_models(
                [model, result.output], batch_sizes=bench_batches, runs=bench_runs, runtimes=chosen_runtimes
            )
            result.seconds["bench"] = time.perf_counter() - started
        run_report = _quantize_report(
            result, validation, gate, bench_result, fidelity, validations, chosen_runtimes
        )
        paths = _write_report_after_model(write_report, run_report, report_dir, result.output)
        if as_json:
            typer.echo(_json(run_report))
        else:
            console = out_console()
            console.print(_summary_table(result))
            for rt, validated in validations.items():
                console.print(_validation_table(validated, None if chosen_runtimes == ["ort"] else rt))
            if fidelity is not None:
                console.print(_fidelity_table(fidelity))
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


def _write_report_after_model(write_report, data: dict, report_dir: Path, model: Path) -> dict:
    """The INT8 model is already published: a report that fails now must not say "nothing was written"."""
    run_dir = report_dir / data["run_id"]
    # The folders write_report would create, outermost first: removed again (when empty) if it fails.
    created = [p for p in (*reversed(run_dir.parents), run_dir) if not p.exists()]
    try:
        return write_report(data, run_dir)
    except (RqInputError, RqEnvironmentError, OSError) as exc:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ReportFailed(
            f"the INT8 model was written to {model}, but the report could not be written: {reason}"
        ) from None


def _holdout_fidelity(model, result, spec, limit, batch_size, workers, bar):
    """Agreement / SQNR / KL of INT8 vs FP32 on calibration images calibration did not read (no labels)."""
    from quantize.measure.fidelity import held_back_samples, measure_fidelity

    held = held_back_samples(result.calibration_dataset, result.calibration_files, limit, result.recipe.seed)
    if not held:
        err.print(
            "[yellow]note:[/] every --calib image was used for calibration: no held-back image is left to "
            "check INT8's agreement with FP32 (use more calibration images than --samples, or --val)",
            highlight=False,
        )
        return None
    err.print(
        f"[dim]· fidelity (FP32 vs INT8 on {len(held)} held-back calibration images)[/]", highlight=False
    )
    task = bar.add_task("fidelity", total=len(held))
    fidelity = measure_fidelity(
        model,
        result.output,
        held,
        spec,
        source=f"{len(held)} held-back calibration images (not used to calibrate; no labels needed)",
        batch_size=batch_size,
        workers=workers,
        on_images=lambda n: bar.advance(task, n),
    )
    result.seconds["fidelity"] = fidelity.seconds
    return fidelity


def _fidelity_table(fidelity) -> Table:
    table = Table(
        title="Fidelity to FP32 (label-free)", title_justify="left", show_header=False, min_width=100
    )
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("images", fidelity.source)
    table.add_row(
        "top-1 agreement",
        f"{fidelity.agreement_pct:.2f}% (95% CI [{fidelity.agreement_ci_low_pct:.2f}, "
        f"{fidelity.agreement_ci_high_pct:.2f}]); {fidelity.disagreements} of {fidelity.images} predictions differ",
    )
    table.add_row("logits SQNR", f"{fidelity.logits_sqnr_db:.1f} dB")
    table.add_row("softmax KL", f"{fidelity.softmax_kl:.4f} nats (mean per image)")
    table.caption = "A top-1 drop can never exceed the disagreement rate; with labels (--val) rq measures the drop itself."
    table.caption_justify = "left"
    return table


def check_evaluable(model: Path) -> None:
    from quantize.measure.evaluate import check_classifier_outputs, open_session

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


def _quantize_report(
    result, validation, gate, bench_result, fidelity=None, validations=None, runtimes=("ort",)
) -> dict:
    from quantize.report.data import accuracy_of, bench_by_batch, build_report, variant

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
    data["fidelity"] = fidelity.to_dict() if fidelity is not None else None
    if result.bias_correction is not None:
        data["bias_correction"] = result.bias_correction.to_dict()
    return data


def _validation_table(validation, runtime: str | None = None) -> Table:
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
        f"top-1 drop {d.drop_pt:.2f} pt, 95% CI [{d.ci_low_pt:.2f}, {d.ci_high_pt:.2f}] ({d.method}, {verdict}); "
        f"top-1 agreement with FP32 {d.agreement_pct:.2f}%: predictions differ on {d.disagreements} images "
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
    runtime: RuntimeOpt = "ort",
    ray: RayOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Top-1 and top-5 accuracy of ONNX classifiers on a labelled ImageNet folder."""

    from quantize.measure import runtimes
    from quantize.measure.evaluate import evaluate
    from quantize.measure.stats import paired_drop
    from quantize.measure.validate import validation_samples

    with user_errors():
        if batch < 1:
            raise RqInputError("--batch must be ≥ 1")
        check_workers(workers)
        chosen = runtimes.parse(runtime)
        if ray is not None and chosen != ["ort"]:
            raise RqInputError("--ray runs models in onnxruntime only; drop --runtime or --ray")
        spec = build_spec(preset_name, mean, std, resize, crop, interpolation)
        dataset, samples = validation_samples(data, labels, limit, seed)
        by_runtime = {}
        with ray_session(ray) as runner, progress_bar() as bar:
            for name in chosen:
                task = bar.add_task(
                    f"evaluating ({name})" if chosen != ["ort"] else "evaluating", total=len(samples)
                )
                by_runtime[name] = evaluate(
                    models,
                    samples,
                    spec,
                    batch_size=batch,
                    workers=workers,
                    on_images=lambda n, task=task: bar.advance(task, n),
                    ray=runner,
                    runtime=name,
                )
        run = by_runtime[chosen[0]]

        def drops_of(r):
            # With several models, each is compared with the first (typically FP32) on the same images.
            return [None] + [
                paired_drop(
                    r.models[0].correct_top1,
                    m.correct_top1,
                    disagreements=int((m.predictions != r.models[0].predictions).sum()),
                )
                if r.images
                else None
                for m in r.models[1:]
            ]

        drops = drops_of(run)
        if as_json:
            payload = run.to_dict()
            payload.update(
                {
                    "folder": str(dataset.root),
                    "layout": dataset.layout,
                    "preprocess": spec.to_dict(),
                    "runtime": chosen[0],
                    "runtimes": {name: r.to_dict() for name, r in by_runtime.items()},
                }
            )
            for entry, drop in zip(payload["models"], drops, strict=True):
                entry["vs_first"] = drop.to_dict() if drop else None
            typer.echo(_json(payload))
            return
        table = Table(
            title=f"{run.images} images of {dataset.root} (layout {dataset.layout}), batch {batch}",
            title_justify="left",
        )
        multi = chosen != ["ort"]
        columns = ["model", *(["runtime"] if multi else []), "top-1 %", "top-5 %", "model img/s"]
        if len(run.models) > 1:
            columns += ["drop vs first pt [95% CI]", "agreement with first %"]
        for col in columns:
            table.add_column(col, justify="left" if col in ("model", "runtime") else "right")
        for name, r in by_runtime.items():
            for m, drop in zip(r.models, drops_of(r), strict=True):
                rate = r.images / m.inference_seconds if m.inference_seconds else 0.0
                row = [
                    escape(str(m.path)),
                    *([name] if multi else []),
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
        if run.cluster:
            notes.append(f"ran on {cluster_text(run.cluster)}; model img/s is per inference actor (one core)")
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
    ray: RayOpt = None,
    runtime: RuntimeOpt = "ort",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Quantize, validate and benchmark a grid of recipes; report the accuracy/speed Pareto front.

    Finished recipes are cached under REPORT_DIR/.sweep-cache/, so an interrupted sweep resumes.
    """
    from quantize.report import write_report
    from quantize.sweep import run_sweep, sweep_report

    with user_errors(), contextlib.ExitStack() as stack:
        check_workers(workers)
        spec = build_spec(preset_name, mean, std, resize, crop, interpolation)
        base = _recipe_from_options(QuantRecipe(), samples=samples, seed=seed)
        batches = (
            [] if bench_batch.strip().lower() == "none" else _parse_batches(bench_batch, "--bench-batch")
        )
        if batches and bench_runs < 1:
            raise RqInputError("--bench-runs must be ≥ 1")
        if eval_batch < 1:
            raise RqInputError("--eval-batch must be ≥ 1")
        from quantize.measure import runtimes

        chosen_runtimes = runtimes.parse(runtime)
        if ray is not None and chosen_runtimes != ["ort"]:
            raise RqInputError("--ray runs models in onnxruntime only; drop --runtime or --ray")
        ensure_writable_dir(report_dir)
        runner = stack.enter_context(ray_session(ray))
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
            ray=runner,
            runtimes=chosen_runtimes,
        )
        data = sweep_report(result, ["rq", *sys.argv[1:]], grid)
        paths = write_report(data, report_dir / data["run_id"])
        if as_json:
            typer.echo(_json(data))
        else:
            out_console().print(_sweep_table(data))
        err.print(f"report: {paths['html']}", highlight=False, soft_wrap=True)


def _sweep_table(data: dict) -> Table:
    table = Table(
        title="rq sweep (★ = on the top-1/speed Pareto front, ◆ = on the agreement/speed front)",
        title_justify="left",
    )
    batches = sorted({int(b) for v in data["variants"] if v["bench"] for b in v["bench"]})
    for col in [
        "variant",
        "top-1 %",
        "drop pt [95% CI]",
        "agree %",
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
            f"{drop['agreement_pct']:.2f}" if drop and drop.get("agreement_pct") is not None else "—",
            str(drop["disagreements"]) if drop else "—",
            *speeds,
            f"{ops['quantized']}/{ops['candidates']}" if ops else "—",
            ("★" if v.get("pareto") else "") + ("◆" if v.get("pareto_agreement") else ""),
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
    from quantize.graph.inspection import inspect_models
    from quantize.graph.prepare import prepare_model
    from quantize.measure.cpu import detect_cpu
    from quantize.report import write_report
    from quantize.report.data import build_report, variant

    with user_errors():
        if samples < 1:
            raise RqInputError("--samples must be ≥ 1")
        spec = build_spec(preset_name, mean, std, resize, crop, interpolation)
        dataset = discover_dataset(calib, labels)
        chosen = select_samples(dataset, samples, 0)
        ensure_writable_dir(report_dir)
        with work_folder("rq-inspect-") as tmp:
            # The INT8 model was made from the prepared graph: compare against the same graph (same names).
            prepared = prepare_model(fp32, tmp)
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
            typer.echo(_json(data["inspection"]))
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
    runtime: RuntimeOpt = "ort",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Latency and throughput of models, run interleaved (A B A B …) so drift hits all alike."""
    from quantize.measure import runtimes
    from quantize.measure.bench import bench_models

    with user_errors():
        batches = _parse_batches(batch)
        chosen = runtimes.parse(runtime)
        result = bench_models(
            models, batch_sizes=batches, threads=threads, runs=runs, warmup=warmup, runtimes=chosen
        )
        if as_json:
            typer.echo(_json(result.to_dict()))
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
