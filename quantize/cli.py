"""The `rq` command line: typer commands that parse options, call the library once and print the result.

Exit codes: one contract, in quantize/exits.py (documented in the README): 0 success, 1 internal error,
2 bad input (nothing written), 3 gate failed, 4 quantization failed, 5 environment failure (disk full,
permission lost), 6 model written but report failed, 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from calibration.errors import RqInputError
from calibration.progress import ProgressCallbacks
from quantize import cli_options as opt
from quantize.cli_options import (
    RqCommand,
    _csv,
    _parse_batches,
    _read_recipe,
    _recipe_from_options,
    _value,
    build_spec,
    check_finite,
    refuse_idle_options,
    spec_for_models,
)
from quantize.console import err, out_console, print_json, progress_bar, say, setup_logging
from quantize.exits import (
    EXIT_INTERNAL,
    EXIT_OK,
    classify,
    handle_signals,
    quiet_onnxruntime,
)
from quantize.files import ensure_writable_dir
from quantize.recipe import QuantRecipe

__all__ = ["app"]


app = typer.Typer(
    name="rq",
    help="INT8 post-training quantization of ONNX image classifiers, validated and measured.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def options(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Also show rq's diagnostics (preparation steps, skipped images…)."
        ),
    ] = False,
) -> None:
    """INT8 post-training quantization of ONNX image classifiers, validated and measured."""
    setup_logging(verbose)


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
        say(cluster.describe())
        yield runner
    finally:
        runner.close()


@app.command(cls=RqCommand)
def quantize(
    ctx: typer.Context,
    calib: opt.Calib,
    model: opt.Model = None,
    out: opt.Out = None,
    labels: opt.CalibLabels = None,
    samples: opt.Samples = None,
    seed: opt.Seed = None,
    batch_size: opt.BatchSize = None,
    recipe_file: opt.RecipeFile = None,
    fmt: opt.Format = None,
    calibration: opt.Method = None,
    percentile: opt.Percentile = None,
    bins: opt.Bins = None,
    per_channel: opt.PerChannel = None,
    bias_correction: opt.BiasCorrection = None,
    reduce_range: opt.ReduceRange = None,
    activation_type: opt.ActivationType = None,
    weight_type: opt.WeightType = None,
    op_types: opt.OpTypes = None,
    exclude_nodes: opt.ExcludeNodes = None,
    backend: opt.Backend = None,
    placement_runtime: opt.PlacementRuntime = None,
    preset_name: opt.Preset = None,
    mean: opt.Mean = None,
    std: opt.Std = None,
    resize: opt.Resize = None,
    crop: opt.Crop = None,
    interpolation: opt.Interpolation = None,
    workers: opt.Workers = None,
    val: opt.Val = None,
    val_labels: opt.ValLabels = None,
    val_limit: opt.ValLimit = None,
    max_drop: opt.MaxDrop = None,
    gate_on: opt.GateOn = "point",
    holdout_images: opt.HoldoutImages = None,
    tune: opt.Tune = False,
    max_trials: opt.MaxTrials = 12,
    tune_fraction: opt.TuneFraction = 0.5,
    eval_batch: opt.EvalBatch = 32,
    ray: opt.Ray = None,
    bench: opt.Bench = False,
    bench_batch: opt.BenchBatch = "1,8",
    bench_runs: opt.BenchRuns = 20,
    runtime: opt.Runtime = "ort",
    report_dir: opt.QuantizeReportDir = Path("reports"),
    as_json: opt.SummaryJson = False,
) -> None:
    """Quantize an FP32 ONNX classifier to INT8 with calibration images; write a checked model and a report.

    With --val, FP32 and INT8 are evaluated on the same images (top-1 drop with a paired 95% interval); with
    --max-drop the run fails (exit code 3) when the drop exceeds it, the model and report still written."""
    from quantize.console import BarProgress, print_run
    from quantize.fetch import fetch_with_progress, model_argument
    from quantize.measure import runtimes
    from quantize.run import RunRequest, run

    with user_errors(), contextlib.ExitStack() as stack:
        for value, option in (
            (percentile, "--percentile"),
            (tune_fraction, "--tune-fraction"),
            (max_drop, "--max-drop"),
        ):
            check_finite(value, option)  # before whether it applies: a NaN is wrong either way
        refuse_idle_options(
            ctx,
            [
                (("gate_on",), max_drop is not None, "with --max-drop (the limit it gates on)"),
                (("max_trials", "tune_fraction"), tune, "with --tune"),
                (("bench_batch", "bench_runs"), bench, "with --bench"),
                (("val_limit", "val_labels"), val is not None, "with --val"),
                # Without --val, held-back calibration images are the fidelity check; with it, only tuning
                # holds images back.
                (("holdout_images",), val is None or tune, "without --val, or with --tune"),
                # The batch of the validation passes, or of the held-back check (none with --holdout-images 0).
                (("eval_batch",), val is not None or holdout_images != 0, "when images are evaluated"),
            ],
        )
        recipe = _recipe_from_options(
            _read_recipe(recipe_file),
            backend=_value(backend),
            placement_runtime=_value(placement_runtime),
            format=_value(fmt),
            activation_type=_value(activation_type),
            weight_type=_value(weight_type),
            per_channel=per_channel,
            reduce_range=reduce_range,
            bias_correction=bias_correction,
            calibration=_value(calibration),
            percentile=percentile,
            num_bins=bins,
            samples=samples,
            seed=seed,
            batch_size=batch_size,
            op_types=_csv(op_types),
            exclude_nodes=_csv(exclude_nodes),
        )
        refuse_idle_options(
            ctx, [(("percentile",), recipe.calibration == "percentile", "with --calibration percentile")]
        )
        options = dict(
            calib=calib, output=out, labels=labels, workers=workers, val=val, val_labels=val_labels
        )
        options.update(val_limit=val_limit, max_drop=max_drop, gate_on=_value(gate_on), tune=tune)
        options.update(holdout_images=holdout_images, max_trials=max_trials, tune_fraction=tune_fraction)
        options.update(eval_batch=eval_batch, bench_runs=bench_runs, report_dir=report_dir)
        request = RunRequest(
            model=None,
            recipe=recipe,
            spec=build_spec(preset_name, mean, std, resize, crop, interpolation),
            bench_batches=_parse_batches(bench_batch, "--bench-batch") if bench else (),
            runtimes=runtimes.parse(runtime),
            command=["rq", *sys.argv[1:]],
            **options,
        )
        request.check(ray=ray is not None)  # every option checked before a model is downloaded
        model_path = model_argument(
            model, fetcher=lambda entry, dest: fetch_with_progress(entry, dest, console=err)
        )
        runner = stack.enter_context(ray_session(ray))
        with progress_bar() as bar:
            result = run(
                dataclasses.replace(request, model=model_path),
                progress=BarProgress(bar),
                ray=runner,
            )
        print_run(result, as_json)
        if result.exit_code != EXIT_OK:
            raise typer.Exit(result.exit_code)


@app.command("eval", cls=RqCommand)
def eval_(
    models: Annotated[
        list[Path], typer.Argument(help="ONNX classifier(s); several are run on the same batches.")
    ],
    data: Annotated[Path, typer.Option("--data", help="Labelled ImageNet folder (any layout rq detects).")],
    labels: opt.Labels = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Evaluate a deterministic sample of this many images.")
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="Batch size.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the --limit sample.")] = 0,
    preset_name: opt.Preset = None,
    mean: opt.Mean = None,
    std: opt.Std = None,
    resize: opt.Resize = None,
    crop: opt.Crop = None,
    interpolation: opt.Interpolation = None,
    workers: opt.Workers = None,
    runtime: opt.Runtime = "ort",
    ray: opt.Ray = None,
    as_json: opt.Json = False,
) -> None:
    """Top-1 and top-5 accuracy of ONNX classifiers on a labelled ImageNet folder."""
    from quantize.console import BarProgress, eval_json, eval_table
    from quantize.measure import runtimes
    from quantize.measure.validate import validation_samples
    from quantize.run import evaluate_in

    with user_errors():
        chosen = runtimes.parse(runtime)
        if ray is not None and chosen != ["ort"]:
            raise RqInputError("--ray runs models in onnxruntime only; drop --runtime or --ray")
        spec, spec_source = spec_for_models(models, preset_name, mean, std, resize, crop, interpolation)
        dataset, samples = validation_samples(data, labels, limit, seed)
        with ray_session(ray) as runner, progress_bar() as bar:
            by_runtime = evaluate_in(chosen, models, samples, spec, batch, workers, runner, BarProgress(bar))
        if as_json:
            print_json(eval_json(by_runtime, dataset, spec) | {"preprocess_source": spec_source})
        else:
            out_console().print(eval_table(by_runtime, dataset, batch))
            out_console().print(f"preprocessing from {escape(spec_source)}: {escape(spec.describe())}")


@app.command(cls=RqCommand)
def sweep(
    model: Annotated[Path, typer.Argument(help="FP32 ONNX classifier.")],
    calib: Annotated[Path, typer.Option("--calib", help="Folder of calibration images.")],
    val: Annotated[Path, typer.Option("--val", help="Labelled validation images.")],
    grid: Annotated[
        str,
        typer.Option(
            help="Recipe grid: default, full, calibration, ranges, weights, formats, parity (ORT vs INC; needs "
            "the inc extra)."
        ),
    ] = "default",
    labels: opt.Labels = None,
    val_labels: Annotated[Path | None, typer.Option(help="Labels file for a flat --val folder.")] = None,
    val_limit: Annotated[
        int | None, typer.Option(min=1, help="Evaluate on this many --val images (all).")
    ] = None,
    samples: Annotated[int | None, typer.Option(min=1, help="Calibration images to use (100).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the calibration sample (0).")] = None,
    bench_batch: Annotated[str, typer.Option(help="Batch sizes to benchmark; 'none' to skip.")] = "1,8",
    # 20, as rq quantize --bench: from 20 rounds up each speedup has its interval
    bench_runs: Annotated[int, typer.Option(min=1, help="Timed runs per model and batch.")] = 20,
    eval_batch: Annotated[int, typer.Option(min=1, help="Batch size of the validation passes.")] = 32,
    report_dir: opt.ReportDir = Path("reports"),
    preset_name: opt.Preset = None,
    mean: opt.Mean = None,
    std: opt.Std = None,
    resize: opt.Resize = None,
    crop: opt.Crop = None,
    interpolation: opt.Interpolation = None,
    workers: opt.Workers = None,
    ray: opt.Ray = None,
    runtime: opt.Runtime = "ort",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Quantize, validate and benchmark a grid of recipes; report the accuracy/speed Pareto front.

    Finished recipes are cached under REPORT_DIR/.sweep-cache/, so an interrupted sweep resumes.
    """
    from quantize.console import sweep_table
    from quantize.measure import runtimes
    from quantize.report import write_report
    from quantize.report.data import sweep_report
    from quantize.sweep import run_sweep

    with user_errors(), contextlib.ExitStack() as stack:
        spec = build_spec(preset_name, mean, std, resize, crop, interpolation)
        base = _recipe_from_options(QuantRecipe(), samples=samples, seed=seed)
        batches = (
            [] if bench_batch.strip().lower() == "none" else _parse_batches(bench_batch, "--bench-batch")
        )
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
            progress=ProgressCallbacks(on_stage=say),
            ray=runner,
            runtimes=chosen_runtimes,
        )
        data = sweep_report(result, ["rq", *sys.argv[1:]], grid)
        paths = write_report(data, report_dir / data["run_id"])
        print_json(data) if as_json else out_console().print(sweep_table(data))
        err.print(f"report: {paths['html']}", highlight=False, soft_wrap=True)


@app.command(cls=RqCommand)
def inspect(
    fp32: Annotated[Path, typer.Argument(help="The FP32 model the INT8 one was made from.")],
    int8: Annotated[Path, typer.Argument(help="The INT8 model (QDQ format).")],
    calib: Annotated[Path, typer.Option("--calib", help="Images to run both models on.")],
    labels: opt.Labels = None,
    samples: Annotated[int, typer.Option(min=1, help="Images to use.")] = 16,
    top: Annotated[
        int, typer.Option(min=0, help="Rows to print (worst first); the report has them all.")
    ] = 15,
    report_dir: opt.ReportDir = Path("reports"),
    preset_name: opt.Preset = None,
    mean: opt.Mean = None,
    std: opt.Std = None,
    resize: opt.Resize = None,
    crop: opt.Crop = None,
    interpolation: opt.Interpolation = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the per-node errors as JSON on stdout.")
    ] = False,
) -> None:
    """Per-node weight and activation SQNR / cosine of an INT8 model against FP32, worst first."""
    from quantize.console import inspect_table
    from quantize.run import inspect_run

    with user_errors():
        from quantize.graph.inspection import check_pair

        check_pair(fp32, int8)  # a pair that does not belong together says so before any size is checked
        # The INT8 file carries the preprocessing it was calibrated with; both models must take its size.
        spec, spec_source = spec_for_models([int8, fp32], preset_name, mean, std, resize, crop, interpolation)
        err.print(f"preprocessing from {spec_source}: {spec.describe()}", highlight=False, soft_wrap=True)
        command = ["rq", *sys.argv[1:]]
        data, paths, nodes = inspect_run(fp32, int8, calib, labels, samples, spec, report_dir, command)
        used = data["inspection"]["images"]
        print_json(data["inspection"]) if as_json else out_console().print(inspect_table(nodes, used, top))
        err.print(f"report: {paths['html']}", highlight=False, soft_wrap=True)


@app.command(cls=RqCommand)
def report(directory: Annotated[Path, typer.Argument(help="A report folder holding report.json.")]) -> None:
    """Re-render report.md and report.html from a report folder's report.json."""
    from quantize.report import render_report

    with user_errors():
        for path in render_report(directory).values():
            typer.echo(str(path))


@app.command(cls=RqCommand)
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
        typer.echo(str(fetch_with_progress(entry, dest, force=force, console=err)))


@app.command(cls=RqCommand)
def bench(
    models: Annotated[list[Path], typer.Argument(help="ONNX models; ratios are relative to the first.")],
    batch: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8",
    threads: Annotated[
        int | None, typer.Option(min=1, help="Intra-op threads (default: physical cores).")
    ] = None,
    runs: Annotated[int, typer.Option(min=1, help="Timed runs per model and batch size.")] = 20,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed runs first.")] = 3,
    runtime: opt.Runtime = "ort",
    input_shape: Annotated[
        str | None,
        typer.Option(
            "--input-shape",
            help="Non-batch input dims for models whose input leaves them free, e.g. 3,224,224.",
        ),
    ] = None,
    as_json: opt.Json = False,
) -> None:
    """Latency and throughput of models, run interleaved (A B A B …) so drift hits all alike."""
    from quantize.measure import runtimes
    from quantize.measure.bench import bench_models

    with user_errors():
        result = bench_models(
            models,
            batch_sizes=_parse_batches(batch),
            threads=threads,
            runs=runs,
            warmup=warmup,
            runtimes=runtimes.parse(runtime),
            image_shape=_parse_batches(input_shape, "--input-shape") if input_shape else None,
        )
        print_json(result.to_dict()) if as_json else out_console().print(result.render_table())


def main() -> None:  # pragma: no cover - console entry for `python -m quantize.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
