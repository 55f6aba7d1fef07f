"""The options of the `rq` commands (typer declarations, `--help` panels) and what turns them into rq's types.

`opt.X` in a command's signature is one option declared here; the shared ones (preprocessing, workers,
runtime, Ray) read the same in every command. Typer checks counts (`min=`) and closed sets (enums) itself;
quantize.cli.RqCommand prints its errors as one line, exit code 2, like rq's own.
"""

from __future__ import annotations

import contextlib
import math
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from typer.core import TyperCommand

from calibration import PRESETS, PreprocessSpec, preset
from calibration.errors import RqInputError
from quantize.console import err
from quantize.exits import EXIT_BAD_INPUT
from quantize.measure.validate import GATE_ON
from quantize.recipe import (
    BACKENDS,
    CALIBRATION_METHODS,
    FORMATS,
    INT8_TYPES,
    PLACEMENT_RUNTIMES,
    QuantRecipe,
)


class RqCommand(TyperCommand):
    """Typer's own checks (`min=`, choices, a missing option) fail like rq's: one line, exit code 2."""

    def parse_args(self, ctx, args):
        given = list(args)  # the parser consumes `args`
        try:
            return super().parse_args(ctx, args)
        except typer.BadParameter as exc:
            err.print(
                f"[bold red]rq: error:[/] {escape(_usage_message(exc, given))}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(EXIT_BAD_INPUT) from None


def _usage_message(exc: typer.BadParameter, args: list[str]) -> str:
    param = exc.param
    if param is None or not getattr(param, "opts", None) or not exc.message:
        return exc.format_message()
    flag, value = param.opts[0], None
    for i, arg in enumerate(args):  # the value the user typed (the last one wins, as in click)
        for name in param.opts:
            if arg == name and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(name + "="):
                value = arg[len(name) + 1 :]
    choices = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if value is not None and isinstance(choices, type) and issubclass(choices, Enum):
        return f"{flag} must be one of {', '.join(c.value for c in choices)}, not {value!r}"
    low = getattr(param, "min", None)
    with contextlib.suppress(ValueError):
        if value is not None and low is not None and float(value) < low:
            return f"{flag} must be ≥ {low}, not {value}"
    return f"{flag}: {exc.message}"


def check_finite(value: float | None, option: str) -> None:
    """Every float option must be a real number: `nan` and `inf` parse as floats and would pass range checks."""
    if value is not None and not math.isfinite(value):
        raise RqInputError(f"{option} must be a finite number, got {value}")


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


def build_spec(preset_name, mean, std, resize, crop, interpolation) -> PreprocessSpec:
    base = preset(preset_name) if preset_name else PreprocessSpec()
    return base.with_overrides(
        mean=_floats3(mean, "--mean"),
        std=_floats3(std, "--std"),
        resize=resize,
        crop=crop,
        interpolation=interpolation,
    )


def spec_for_models(
    models, preset_name, mean, std, resize, crop, interpolation
) -> tuple[PreprocessSpec, str]:
    """The preprocessing to evaluate `models` with, and where it came from (in words).

    Like timm's data config: a model rq quantized carries its preprocessing (`rq.preprocess` in its metadata),
    and it is the default; a preset replaces it, and each option given overrides one field. Models that carry
    different ones need the options to say which. Then each model's input size is checked against it, in one
    line naming the model (not ONNX Runtime's error from the first batch)."""
    import json

    from quantize.graph.prepare import classifier_signature, load_model
    from quantize.pipeline import PREPROCESS_METADATA_KEY, check_spec_matches

    stored: dict[str, tuple[Path, PreprocessSpec]] = {}
    loaded = []
    for path in models:
        try:
            model = load_model(Path(path), load_weights=False)
        # A missing or broken file: the runtime says so, in its own one line, when it opens it.
        except Exception:
            continue
        loaded.append((Path(path), model))
        entry = next((p.value for p in model.metadata_props if p.key == PREPROCESS_METADATA_KEY), None)
        if entry is None:
            continue
        try:
            spec = PreprocessSpec.from_dict(json.loads(entry))
        except (ValueError, RqInputError):
            continue  # an unreadable record is no default; the options (or the built-in default) apply
        stored.setdefault(json.dumps(spec.to_dict(), sort_keys=True), (Path(path), spec))
    options_given = any(v is not None for v in (preset_name, mean, std, resize, crop, interpolation))
    with_options = ", with the options given" if options_given else ""
    if preset_name is not None:
        base, source = preset(preset_name), f"preset {preset_name}{with_options}"
    elif len(stored) == 1:
        path, base = next(iter(stored.values()))
        source = f"{path.name}'s rq.preprocess metadata{with_options}"
    elif not stored:
        base = PreprocessSpec()
        source = "the options given" if options_given else "rq's default (the ImageNet transform, crop 224)"
    else:
        # Several specs: the options must settle every field in which they differ (filling one from a built-in
        # default would quietly mix two models' preprocessing); the fields they share stay as stored.
        given = {
            k for k, v in {"resize": resize, "crop": crop, "mean": mean, "std": std}.items() if v is not None
        }
        given |= {"interpolation"} if interpolation is not None else set()
        dicts = [spec.to_dict() for _, spec in stored.values()]
        differing = sorted(k for k in dicts[0] if any(d.get(k) != dicts[0].get(k) for d in dicts[1:]))
        if not set(differing) <= given:
            names = ", ".join(path.name for path, _ in stored.values())
            settable = [
                f"--{k}" for k in differing if k in ("resize", "crop", "mean", "std", "interpolation")
            ]
            how = (
                f"with {', '.join(settable)}"
                if len(settable) == len(differing)
                else "with --preset and options"
            )
            raise RqInputError(
                f"{names} were quantized with different preprocessing ({', '.join(differing)}); say which {how}"
            )
        path, base = next(iter(stored.values()))
        source = f"the options given, the rest as stored in {path.name}'s rq.preprocess metadata"
    spec = base.with_overrides(
        mean=_floats3(mean, "--mean"),
        std=_floats3(std, "--std"),
        resize=resize,
        crop=crop,
        interpolation=interpolation,
    )
    for path, model in loaded:
        try:
            signature = classifier_signature(model, path.name)
        except Exception:
            continue  # not a classifier rq knows: evaluation says why
        try:
            check_spec_matches(signature, spec)
        except RqInputError as exc:
            raise RqInputError(f"{path.name}: {exc}") from None
    return spec, source


def refuse_idle_options(ctx: typer.Context, rules: list[tuple[tuple[str, ...], bool, str]]) -> None:
    """One line for options given on the command line that the run would ignore, as ``--bins`` with minmax is
    refused: each rule is (parameter names, whether they take effect, what they need)."""
    for names, active, needs in rules:
        given = [
            "--" + name.replace("_", "-")
            for name in names
            # by name: typer ships its own click, whose ParameterSource enum is not public API
            if getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")
        ]
        if given and not active:
            verb, pronoun = ("applies", "it") if len(given) == 1 else ("apply", "them")
            raise RqInputError(f"{' and '.join(given)} {verb} only {needs}; add it or drop {pronoun}")


def _csv(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(t for t in (p.strip() for p in text.split(",")) if t)


def _parse_batches(text: str, option: str = "--batch") -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RqInputError(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise RqInputError(f"{option} must be ≥ 1")
    return values


def _choices(name: str, values) -> type[StrEnum]:
    """A closed set of option values, as typer wants it (an enum; the CLI passes on `.value`)."""
    return StrEnum(name, [(v, v) for v in values])


def _value(choice) -> str | None:
    return None if choice is None else str(choice.value)


Formats = _choices("Formats", FORMATS)
Methods = _choices("Methods", CALIBRATION_METHODS)
Int8Types = _choices("Int8Types", INT8_TYPES)
Backends = _choices("Backends", BACKENDS)
PlacementRuntimes = _choices("PlacementRuntimes", PLACEMENT_RUNTIMES)
GateModes = _choices("GateModes", GATE_ON)

# Options shared by commands that read images.
PREP = "Preprocessing"
Preset = Annotated[
    str | None,
    typer.Option(
        "--preset",
        help=f"Preprocessing preset: {', '.join(PRESETS)} (default: what an rq model carries in its rq.preprocess "
        "metadata (eval, inspect), else resnet50-v2).",
        rich_help_panel=PREP,
    ),
]
Mean = Annotated[
    str | None, typer.Option(help="Per-channel mean, e.g. 0.485,0.456,0.406.", rich_help_panel=PREP)
]
Std = Annotated[
    str | None, typer.Option(help="Per-channel std, e.g. 0.229,0.224,0.225.", rich_help_panel=PREP)
]
Resize = Annotated[
    int | None,
    typer.Option(min=1, help="Resize the shorter side to this many pixels (256).", rich_help_panel=PREP),
]
Crop = Annotated[int | None, typer.Option(min=1, help="Center crop size (224).", rich_help_panel=PREP)]
Interpolation = Annotated[
    str | None,
    typer.Option(
        help="Resize filter: bilinear, bicubic, nearest, lanczos, box, hamming.", rich_help_panel=PREP
    ),
]
Labels = Annotated[
    Path | None, typer.Option(help="Labels file for a flat folder: Caffe val.txt or LOC_val_solution.csv.")
]
Workers = Annotated[
    int | None,
    typer.Option(min=1, help="Image decoding threads (default: CPU count).", rich_help_panel="Speed"),
]
Runtime = Annotated[
    str,
    typer.Option(
        "--runtime",
        help="Where to run the models: ort | openvino | ort-openvino, or several comma-separated (ort).",
        rich_help_panel="Speed",
    ),
]
Ray = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="auto|local|ADDRESS",
        help="Validate on a Ray cluster (the ray extra): auto (RAY_ADDRESS, a `ray start` cluster on this "
        "machine, else a local one), local (a new local Ray), or the head's HOST:PORT.",
        rich_help_panel="Cluster",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
ReportDir = Annotated[Path, typer.Option(help="Reports go to REPORT_DIR/<run-id>/.")]


# When a recipe value came from a flag, the message names the flag (the recipe's own names its field).
# (field, how the recipe's message starts, the flag)
_FLAG_MESSAGES = (
    ("num_bins", "histogram bins apply", "--bins applies"),
    ("seed", "recipe seed must", "--seed must"),
    ("percentile", "percentile must", "--percentile must"),
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


def _read_recipe(recipe_file: Path | None) -> QuantRecipe:
    return QuantRecipe() if recipe_file is None else QuantRecipe.from_file(recipe_file)


# `rq quantize`'s own options, by --help panel.
CAL, REC, VAL, TUNE, OUT = "Calibration", "Recipe", "Validation & gate", "Tuning", "Output"

Calib = Annotated[
    Path,
    typer.Option("--calib", help="Folder of calibration images (labels not needed).", rich_help_panel=CAL),
]
Model = Annotated[
    str | None,
    typer.Argument(
        metavar="MODEL",
        help="FP32 ONNX classifier (any opset; zoo opset-7 files are upgraded), or a model of "
        "models/manifest.json by name (resnet50-v2, resnet50-v2-7), fetched into models/ when absent. "
        "Default: the manifest's default model (resnet50-v2).",
    ),
]
Out = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Output file (default: <model>-int8.onnx in this folder).",
        rich_help_panel=OUT,
    ),
]
CalibLabels = Annotated[
    Path | None,
    typer.Option(
        help="Labels file for a flat folder: Caffe val.txt or LOC_val_solution.csv.", rich_help_panel=CAL
    ),
]
Samples = Annotated[
    int | None, typer.Option(min=1, help="Calibration images to use (100).", rich_help_panel=CAL)
]
Seed = Annotated[int | None, typer.Option(help="Seed of the calibration sample (0).", rich_help_panel=CAL)]
BatchSize = Annotated[
    int | None,
    typer.Option("--batch-size", min=1, help="Calibration batch size (8).", rich_help_panel=CAL),
]
RecipeFile = Annotated[
    Path | None,
    typer.Option(
        "--recipe", help="Start from a recipe JSON file; options below override it.", rich_help_panel=REC
    ),
]
Format = Annotated[
    Formats | None, typer.Option("--format", help="Quantized model format (qdq).", rich_help_panel=REC)
]
Method = Annotated[
    Methods | None,
    typer.Option("--calibration", help="Range estimator (percentile).", rich_help_panel=CAL),
]
Percentile = Annotated[
    float | None,
    typer.Option(help="Percentile for --calibration percentile (99.999).", rich_help_panel=CAL),
]
Bins = Annotated[
    int | None,
    typer.Option(min=128, help="Histogram bins for entropy/percentile (2048).", rich_help_panel=CAL),
]
PerChannel = Annotated[
    bool | None,
    typer.Option("--per-channel/--per-tensor", help="Per-channel weight scales (on).", rich_help_panel=REC),
]
BiasCorrection = Annotated[
    bool | None,
    typer.Option(
        "--bias-correction/--no-bias-correction",
        help="Fold INT8's mean output shift of each Conv/Gemm channel into its bias (see docs/placement.md).",
        rich_help_panel=REC,
    ),
]
ReduceRange = Annotated[
    bool | None,
    typer.Option(
        "--reduce-range/--no-reduce-range",
        help="7-bit weights. Default: decided from the CPU (on without VNNI).",
        rich_help_panel=REC,
    ),
]
ActivationType = Annotated[
    Int8Types | None, typer.Option(help="Activation type (uint8).", rich_help_panel=REC)
]
WeightType = Annotated[Int8Types | None, typer.Option(help="Weight type (int8).", rich_help_panel=REC)]
OpTypes = Annotated[
    str | None,
    typer.Option(
        help="Comma-separated op types to quantize (default: placement decided from the graph, "
        "see docs/placement.md).",
        rich_help_panel=REC,
    ),
]
ExcludeNodes = Annotated[
    str | None, typer.Option(help="Comma-separated node names to keep in FP32.", rich_help_panel=REC)
]
Backend = Annotated[
    Backends | None,
    typer.Option(
        help="Quantization backend: ort (default) or inc (needs the inc extra).", rich_help_panel=REC
    ),
]
PlacementRuntime = Annotated[
    PlacementRuntimes | None,
    typer.Option(
        help="Runtime the Q/DQ placement is made for: ort (default) or openvino (also quantizes the classifier "
        "head; see docs/placement.md).",
        rich_help_panel=REC,
    ),
]
Val = Annotated[
    Path | None,
    typer.Option(
        "--val",
        help="Labelled images: evaluate FP32 and INT8 on them after quantizing.",
        rich_help_panel=VAL,
    ),
]
ValLabels = Annotated[
    Path | None, typer.Option(help="Labels file for a flat --val folder.", rich_help_panel=VAL)
]
ValLimit = Annotated[
    int | None, typer.Option(min=1, help="Evaluate on this many --val images (all).", rich_help_panel=VAL)
]
MaxDrop = Annotated[
    float | None,
    typer.Option(
        help="Accuracy gate: fail (exit code 3) when INT8 loses more top-1 points than this.",
        rich_help_panel=VAL,
    ),
]
GateOn = Annotated[
    GateModes,
    typer.Option(
        "--gate-on",
        help="What --max-drop is compared with: point (the measured drop) or ci (the upper bound of its "
        "95% interval: a pass then means these images show the goal is met).",
        rich_help_panel=VAL,
    ),
]
HoldoutImages = Annotated[
    int | None,
    typer.Option(
        min=0,
        help="Held-back calibration images (--calib images calibration did not read; no labels needed). "
        "Without --val, INT8's agreement with FP32, logits SQNR and softmax KL are measured on this many "
        "(500); with --tune, they join the tuning images in the tuner's fidelity objective (all). 0: none.",
        rich_help_panel=VAL,
    ),
]
Tune = Annotated[
    bool,
    typer.Option(
        "--tune",
        help="Accuracy-aware tuning: fall nodes back to FP32 until the drop fits --max-drop (needs --val).",
        rich_help_panel=TUNE,
    ),
]
MaxTrials = Annotated[
    int, typer.Option(min=1, help="Most tuning steps (fallbacks or INC trials).", rich_help_panel=TUNE)
]
TuneFraction = Annotated[
    float,
    typer.Option(
        help="Share of --val images used to tune; the rest confirms the result.", rich_help_panel=TUNE
    ),
]
EvalBatch = Annotated[
    int, typer.Option(min=1, help="Batch size of the validation and tuning passes.", rich_help_panel=VAL)
]
Bench = Annotated[
    bool,
    typer.Option("--bench", help="Benchmark FP32 vs INT8 (interleaved) afterwards.", rich_help_panel="Speed"),
]
BenchBatch = Annotated[str, typer.Option(help="Batch sizes for --bench.", rich_help_panel="Speed")]
BenchRuns = Annotated[
    int, typer.Option(min=1, help="Timed runs per model and batch for --bench.", rich_help_panel="Speed")
]
QuantizeReportDir = Annotated[
    Path,
    typer.Option(
        help="Reports go to REPORT_DIR/<run-id>/ (report.json, report.md, report.html).",
        rich_help_panel=OUT,
    ),
]
SummaryJson = Annotated[
    bool, typer.Option("--json", help="Print the summary as JSON on stdout.", rich_help_panel=OUT)
]
