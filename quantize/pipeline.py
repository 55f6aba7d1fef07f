"""`quantize_model`: prepare → calibrate → (tune) → quantize, and publish a checked INT8 model.

The stages are the same for every backend (quantize.backends): the backend only turns the prepared model and
the calibration into an INT8 file in scratch (`produce_int8`); `publish_int8` checks and publishes it, also
after a backend's own tuner (and, for files laid out for ONNX Runtime, pads 3-channel convolution inputs to
4: quantize.graph.channel_pad). `quantize.run.run` adds validate → gate → bench → report on top (`rq quantize`);
`quantize.sweep` reuses `run_calibration` and `quantize_prepared` over a grid of recipes.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from calibration import (
    BatchStream,
    ImageCalibrationReader,
    ImageDataset,
    PreprocessSpec,
    Sample,
    Spares,
    discover_dataset,
    select_with_spares,
)
from calibration.errors import RqInputError
from calibration.loader import pad_batch
from calibration.progress import NO_PROGRESS, Progress
from quantize import __version__, backends
from quantize.backends.ort import QuantizedOps, count_quantized
from quantize.bias_correction import BiasCorrectionReport
from quantize.calibrate import CalibrationRanges, calibrate
from quantize.exits import QuantizerError, one_line
from quantize.files import atomic_output, check_output_path, work_folder
from quantize.graph.channel_pad import ChannelPad, pad_conv_input_channels
from quantize.graph.openvino_form import OpenVinoForm
from quantize.graph.placement import place, require_something
from quantize.graph.prepare import ModelError, PreparedModel, load_model, prepare_model
from quantize.measure.cpu import CpuInfo, IntegerKernelAdvice, advise_int8, detect_cpu
from quantize.measure.evaluate import evaluate
from quantize.measure.fidelity import held_back_samples
from quantize.measure.runtimes import ort_session
from quantize.recipe import METADATA_KEY, QuantRecipe
from quantize.tune import TuneReport, TuneRequest, tune_fallback

PREPROCESS_METADATA_KEY = "rq.preprocess"


class QuantizationFailed(QuantizerError):
    """The quantizer crashed or the quantized model did not pass rq's own checks; nothing was written.

    Not the user's input: its own exit code (4, quantize/exits.py), not 2.
    """


@dataclass
class QuantizeResult:
    """Everything `rq quantize` reports, in one place."""

    output: Path
    recipe: QuantRecipe
    spec: PreprocessSpec
    cpu: CpuInfo
    advice: IntegerKernelAdvice
    reduce_range_source: str  # "cpu" (rq decided) or "user"
    prepared: PreparedModel
    calibration_dataset: ImageDataset
    calibration_files: list[Path]  # the sample drawn, then the replacements of its unreadable images
    images_requested: int
    images_used: int
    skipped: list[tuple[Path, str]]
    ranges: CalibrationRanges
    quantized_ops: QuantizedOps
    fp32_bytes: int
    int8_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)
    tuning: TuneReport | None = None
    bias_correction: BiasCorrectionReport | None = None
    runtime_form: OpenVinoForm | None = None  # placement_runtime="openvino": what the OpenVINO form changed
    channel_pads: list[ChannelPad] = field(default_factory=list)  # inputs padded for ORT's direct int8 kernel
    replaced_existing: bool = False  # a file was already at `output` and was replaced
    replaced_images: list[tuple[Path, Path]] = field(default_factory=list)  # (unreadable, its replacement)

    def to_dict(self) -> dict:
        return {
            "output": str(self.output),
            "replaced_existing": self.replaced_existing,
            "recipe": self.recipe.to_dict(),
            "preprocess": self.spec.to_dict(),
            "cpu": self.cpu.to_dict(),
            "advice": self.advice.to_dict(),
            "reduce_range_source": self.reduce_range_source,
            "preparation": self.prepared.to_dict(),
            "calibration": {
                "folder": str(self.calibration_dataset.root),
                "layout": self.calibration_dataset.layout,
                "notes": list(self.calibration_dataset.notes),
                "images_available": len(self.calibration_dataset.samples),
                "images_requested": self.images_requested,
                "images_used": self.images_used,
                "skipped": [[str(p), reason] for p, reason in self.skipped],
                "replaced": [[str(old), str(new)] for old, new in self.replaced_images],
                "method": self.recipe.calibration,
                # INC calibrates inside its own run: rq has no range table to count then.
                "tensors": len(self.ranges.tensors.data) if self.ranges else None,
                "file_list_sha256": file_list_sha256(self.calibration_files, self.calibration_dataset.root),
                "seconds": round(self.seconds.get("calibrate", 0.0), 3),
            },
            "quantized_ops": self.quantized_ops.to_dict(),
            "size_bytes": {"fp32": self.fp32_bytes, "int8": self.int8_bytes},
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "tuning": self.tuning.to_dict() if self.tuning else None,
            "bias_correction": self.bias_correction.to_dict() if self.bias_correction else None,
            "runtime_form": self.runtime_form.to_dict() if self.runtime_form else None,
            "channel_pads": [pad.to_dict() for pad in self.channel_pads],
        }


def _name_in(folder: Path, file: Path) -> str:
    # No resolve(): a symlinked image may point outside the folder; its name inside the folder is what counts.
    return Path(os.path.relpath(os.path.abspath(file), os.path.abspath(folder))).as_posix()


def file_list_sha256(files: list[Path], root: Path) -> str:
    """sha256 of the sorted calibration file list (paths relative to its folder), to tell runs apart."""
    return hashlib.sha256("\n".join(sorted(_name_in(root, f) for f in files)).encode()).hexdigest()


def file_states_sha256(files: list[Path], root: Path) -> str:
    """sha256 over the sorted (name relative to `root`, size, modification time, inode) of every file: what a
    cached result computed on these images depends on, without reading them (a calibration folder can be all of
    ImageNet train). Names alone let images replaced under the same names reuse results measured on the old
    ones; a rewrite changes the time, a swap by renaming the inode."""
    entries = []
    for f in files:
        st = os.stat(f)
        entries.append(f"{_name_in(root, f)}\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ino}")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()


def default_output_path(model: Path, directory: Path | None = None) -> Path:
    """`resnet50-v2-7.onnx` → `resnet50-v2-int8.onnx`: the zoo's trailing `-<opset>` is dropped."""
    stem = re.sub(r"-\d+$", "", Path(model).stem) or Path(model).stem
    return (directory or Path.cwd()) / f"{stem}-int8.onnx"


def resolve_recipe(recipe: QuantRecipe, cpu: CpuInfo) -> tuple[QuantRecipe, IntegerKernelAdvice, str]:
    """Fill the CPU-dependent choices the user left open (reduce_range=None)."""
    advice = advise_int8(cpu)
    if recipe.reduce_range is None:
        return recipe.with_changes(reduce_range=advice.reduce_range), advice, "cpu"
    return recipe, advice, "user"


class ModelBatches:
    """The decoded batches of `samples` for a prepared model, padded when its batch dimension is fixed.

    Iterate once; `used`/`skipped` count the images read, `first` keeps up to two images of the first batch
    (to check the INT8 model runs). Close it (or use it as a context manager) to stop the decoding threads.
    """

    def __init__(
        self,
        prepared: PreparedModel,
        samples: list[Sample],
        spec: PreprocessSpec,
        batch_size: int,
        *,
        workers: int | None = None,
        progress: Progress | None = None,
        spares: Spares | None = None,
    ):
        self.fixed = prepared.signature.fixed_batch
        self.batch = self.fixed or batch_size
        self.stream = BatchStream(
            samples, spec, batch_size=self.batch, workers=workers, progress=progress, spares=spares
        )
        # The public calibration reader (calibration.ImageCalibrationReader) is what every pass reads through.
        self.reader = ImageCalibrationReader(
            self.stream, prepared.signature.input_name, fixed_batch=self.fixed
        )
        self.first: np.ndarray | None = None

    def __iter__(self):
        for feed in iter(self.reader.get_next, None):
            images = feed[self.reader.input_name]
            if self.first is None:
                self.first = images[: min(len(images), 2)].copy()
            yield images

    @property
    def used(self) -> int:
        return self.stream.used

    @property
    def skipped(self) -> list[tuple[Path, str]]:
        return list(self.stream.skipped)

    @property
    def replaced(self) -> list[tuple[Path, Path]]:
        return list(self.stream.replaced)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> ModelBatches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def model_batches(
    prepared: PreparedModel,
    samples,
    spec: PreprocessSpec,
    batch_size: int,
    *,
    workers: int | None = None,
    spares: Spares | None = None,
) -> ModelBatches:
    return ModelBatches(prepared, list(samples), spec, batch_size, workers=workers, spares=spares)


def calibration_batches(
    prepared: PreparedModel, calibration: CalibrationRun, spec: PreprocessSpec, batch_size: int
):
    """Another pass over the calibration images: the same sample, the same replacements for its unreadable
    images (bias correction, INC's trials)."""
    return model_batches(
        prepared,
        calibration.samples,
        spec,
        batch_size,
        workers=calibration.workers,
        spares=calibration.spares,
    )


def _stamp_metadata(model: onnx.ModelProto, recipe: QuantRecipe, spec: PreprocessSpec, source: Path) -> None:
    import json

    entries = {
        METADATA_KEY: recipe.to_json(),
        PREPROCESS_METADATA_KEY: json.dumps(spec.to_dict(), sort_keys=True),
        "rq.version": __version__,
        "rq.source_model": source.name,
    }
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def _smoke_test(path: Path, input_name: str, sample: np.ndarray, fp32_path: Path) -> None:
    """The INT8 model must load and run in ONNX Runtime and give finite outputs of the FP32 model's shape."""
    try:
        out = ort_session(path, log_severity=None).run(None, {input_name: sample})[0]
    except Exception as exc:  # ORT raises its own exception types
        raise QuantizationFailed(f"the quantized model fails in onnxruntime: {one_line(exc)}") from None
    reference = ort_session(fp32_path, log_severity=None).run(None, {input_name: sample})[0]
    if out.shape != reference.shape or not np.all(np.isfinite(out)):
        raise QuantizationFailed(
            f"the quantized model gives output {out.shape}, FP32 gives {reference.shape}"
        )


def check_spec_matches(signature, spec: PreprocessSpec) -> None:
    """The preprocessing must produce the image size the model takes."""
    channels = signature.input_shape[1]
    height, width = signature.spatial
    expected = spec.input_shape(1)[1:]
    actual = (channels, height, width) if spec.layout == "NCHW" else (height, width, channels)
    if any(isinstance(a, int) and a != e for a, e in zip(actual, expected, strict=True)):
        raise RqInputError(
            f"model input {signature.input_name} expects {list(actual)} per image, preprocessing gives "
            f"{list(expected)}: adjust --crop/--preset"
        )


def check_recipe_matches(prepared: PreparedModel, recipe: QuantRecipe) -> None:
    """The recipe must name op types and nodes the model has: a typo would quantize nothing, or silently less."""
    model = load_model(prepared.path, load_weights=False)
    names = {n.name for n in model.graph.node}
    unknown = [n for n in recipe.exclude_nodes if n not in names]
    if unknown:
        raise RqInputError(f"--exclude-nodes names node(s) the model does not have: {', '.join(unknown[:5])}")
    require_something(model, place(model, recipe), recipe)


@dataclass
class CalibrationRun:
    """Calibration images read and the activation ranges they gave."""

    dataset: ImageDataset
    samples: list[Sample]  # the sample drawn; unreadable ones are replaced from `spares` in every pass
    ranges: CalibrationRanges | None  # None for the INC backend, which calibrates by itself
    used: int
    skipped: list[tuple[Path, str]]
    smoke_sample: np.ndarray  # a couple of real images, to check the INT8 model runs
    seconds: float
    bias_correction: BiasCorrectionReport | None = None  # of the last model quantized with these ranges
    runtime_form: OpenVinoForm | None = None  # likewise: the OpenVINO form's changes, if the recipe asked
    channel_pads: list[ChannelPad] = field(default_factory=list)  # likewise: convolution inputs padded
    # Input means bias correction computed with these ranges: tuning's steps reuse them.
    bias_statistics: dict = field(default_factory=dict)
    # Image-decoding processes (`--workers`): INC's own calibration passes use them too.
    workers: int | None = None
    spares: Spares | None = None
    replaced: list[tuple[Path, Path]] = field(default_factory=list)  # (unreadable image, its replacement)

    def files(self) -> list[Path]:
        """Every calibration file a pass reads: the sample and the replacements of its unreadable images."""
        return [s.path for s in self.samples] + [new for _, new in self.replaced]

    def readable_samples(self) -> list[Sample]:
        """The images the calibration pass read, in order: each replacement in its unreadable image's place."""
        replacement = dict(self.replaced)
        unreadable = {path for path, _ in self.skipped}
        return [
            Sample(replacement[s.path], None) if s.path in replacement else s
            for s in self.samples
            if s.path in replacement or s.path not in unreadable
        ]


def calibration_key(recipe: QuantRecipe) -> tuple:
    """Recipes with the same key share calibration ranges (format, per-channel, reduce_range do not matter)."""
    return (
        recipe.backend,  # INC calibrates by itself: its CalibrationRun carries no ranges
        recipe.calibration,
        recipe.percentile,
        recipe.bins,
        recipe.samples,
        recipe.seed,
        recipe.op_types,
    )


def run_calibration(
    prepared: PreparedModel,
    dataset: ImageDataset,
    recipe: QuantRecipe,
    spec: PreprocessSpec,
    workdir: Path,
    *,
    workers: int | None = None,
    progress: Progress | None = None,
) -> CalibrationRun:
    """Stream a deterministic sample of `dataset` through the prepared model's calibrator.

    A backend that calibrates by itself (`uses_rq_ranges` False) gets no ranges: only a smoke-test sample is
    read here, and the backend reads the same samples again.
    """
    started = time.perf_counter()
    samples, spares = select_with_spares(dataset, recipe.samples, recipe.seed)
    batches = ModelBatches(
        prepared, samples, spec, recipe.batch_size, workers=workers, progress=progress, spares=spares
    )
    with batches:
        if backends.get(recipe.backend).uses_rq_ranges:
            ranges = calibrate(prepared.path, prepared.signature.input_name, iter(batches), recipe, workdir)
        else:
            next(iter(batches))
            ranges = None
    sample = batches.first
    if batches.fixed:
        sample = pad_batch(sample[:1], batches.fixed)
    return CalibrationRun(
        dataset=dataset,
        samples=samples,
        ranges=ranges,
        used=batches.used,
        skipped=batches.skipped,
        smoke_sample=sample,
        seconds=time.perf_counter() - started,
        workers=workers,
        spares=spares,
        replaced=batches.replaced,
    )


def produce_int8(
    prepared: PreparedModel,
    calibration: CalibrationRun,
    recipe: QuantRecipe,
    spec: PreprocessSpec,
    scratch: Path,
    workdir: Path,
) -> None:
    """Run the recipe's backend (quantize.backends) into `scratch`."""
    backends.get(recipe.backend).quantize(prepared, calibration, recipe, spec, scratch, workdir)


def publish_int8(
    prepared: PreparedModel,
    calibration: CalibrationRun,
    recipe: QuantRecipe,
    spec: PreprocessSpec,
    scratch: Path,
    output: Path,
    *,
    tuning_fallback: tuple[str, ...] = (),
    pad_channels: bool = True,
) -> QuantizedOps:
    """Stamp the recipe and spec, check (onnx.checker + a real inference), publish atomically at `output`.

    `pad_channels`: pad 3-channel convolution inputs for ONNX Runtime (graph/channel_pad.py) when the file is
    laid out for it; off for the fallback tuner's step models, which it matches to the FP32 graph by tensor name.
    """
    int8 = load_model(scratch)
    for_ort = recipe.placement_runtime == "ort" and recipe.format == "qdq"
    calibration.channel_pads = pad_conv_input_channels(int8) if pad_channels and for_ort else []
    _stamp_metadata(int8, recipe, spec, prepared.source)
    try:
        onnx.checker.check_model(int8)
    except onnx.checker.ValidationError as exc:
        raise QuantizationFailed(
            f"the quantized model fails onnx.checker: {str(exc).splitlines()[0]}"
        ) from None
    ops = count_quantized(load_model(prepared.path), int8, recipe, tuning_fallback=tuning_fallback)
    if ops.quantized == 0:
        raise QuantizationFailed(
            f"nothing was quantized: none of the {ops.candidates} candidate node(s) of the model was converted "
            "(check --op-types and --exclude-nodes)"
        )
    onnx.save_model(int8, str(scratch))
    _smoke_test(scratch, prepared.signature.input_name, calibration.smoke_sample, prepared.path)
    # Not atomic_save: its up-front folder checks would call a permission lost mid-run bad input (exit 2);
    # check_output_path checked the folder before the work, so a failure now is the machine's (exit 5).
    with atomic_output(output) as tmp:
        onnx.save_model(int8, str(tmp))
    scratch.unlink()
    return ops


def quantize_prepared(
    prepared: PreparedModel,
    calibration: CalibrationRun,
    recipe: QuantRecipe,
    spec: PreprocessSpec,
    output: Path,
    workdir: Path,
    *,
    tuning_fallback: tuple[str, ...] = (),
    pad_channels: bool = True,
) -> QuantizedOps:
    """Quantize a prepared model with the recipe's backend, check the result, publish it atomically at `output`.

    `tuning_fallback`: the recipe's excluded nodes that tuning (not the user) chose, for the FP32 reasons.
    `pad_channels`: see `publish_int8`.
    """
    scratch = workdir / f"int8-{recipe.digest()}.onnx"
    produce_int8(prepared, calibration, recipe, spec, scratch, workdir)
    return publish_int8(
        prepared,
        calibration,
        recipe,
        spec,
        scratch,
        output,
        tuning_fallback=tuning_fallback,
        pad_channels=pad_channels,
    )


def _tune(backend, prepared, calibration, recipe, spec, workdir, tune: TuneRequest, model, workers, progress):
    """(recipe, TuneReport, scratch model or None, seconds): the backend's own tuner, else rq's fallback tuner."""
    if backend.has_tuner:
        started = time.perf_counter()

        def top1(path: Path) -> float:
            run = evaluate(
                [path],
                list(tune.tune_samples),
                spec,
                batch_size=tune.eval_batch,
                workers=workers,
                ray=tune.ray,
            )
            return run.models[0].top1

        tuned = backend.tune(prepared, calibration, recipe, spec, workdir, tune, top1, progress)
        return tuned.recipe, tuned.report, tuned.scratch, time.perf_counter() - started
    recipe, report = tune_fallback(
        # Step models unpadded: the tuner matches their tensors to the FP32 graph's by name. The final file is
        # quantized again below, and padded then.
        quantize_to=lambda r, path: quantize_prepared(
            prepared, calibration, r, spec, path, workdir, pad_channels=False
        ),
        prepared_path=prepared.path,
        fp32_path=model,
        input_name=prepared.signature.input_name,
        recipe=recipe,
        spec=spec,
        request=tune,
        sensitivity_samples=calibration.readable_samples(),
        holdout_samples=held_back_samples(
            calibration.dataset, calibration.files(), tune.holdout_images, recipe.seed
        ),
        workdir=workdir,
        workers=workers,
        eval_batch=tune.eval_batch,
        progress=progress,
    )
    return recipe, report, None, report.seconds


def quantize_model(
    model: Path | str,
    calib: Path | str,
    *,
    output: Path | str | None = None,
    recipe: QuantRecipe | None = None,
    spec: PreprocessSpec | None = None,
    labels: Path | str | None = None,
    cpu: CpuInfo | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    tune: TuneRequest | None = None,
) -> QuantizeResult:
    """Quantize `model` with images from `calib`; write the INT8 model to `output` atomically.

    With `tune`, nodes are fallen back to FP32 until the top-1 drop on `tune.tune_samples` fits
    `tune.max_drop_pt` (see quantize.tune); the published model is the step chosen there.

    Raises RqInputError (or a subclass) with a one-line message for anything the user can fix. Nothing is
    written at `output` unless every stage succeeded and the result runs in ONNX Runtime.
    """
    model = Path(model)
    recipe = recipe or QuantRecipe()
    spec = spec or PreprocessSpec()
    progress = progress or NO_PROGRESS
    cpu = cpu or detect_cpu()
    output = Path(output) if output is not None else default_output_path(model)
    backend = backends.get(recipe.backend)
    backend.require()  # fail before any work when its extra is not installed
    if not model.is_file():
        raise ModelError(
            f"model not found: {model}" if not model.exists() else f"model path is not a file: {model}"
        )
    check_output_path(output)
    replaced_existing = output.exists()  # said in the summary: replacing a file is fine, silently is not
    if output.resolve() == model.resolve():
        raise RqInputError("output path is the input model; choose another --out")
    recipe, advice, rr_source = resolve_recipe(recipe, cpu)
    recipe = backend.adapt(recipe)
    dataset = discover_dataset(calib, labels)  # before the slow stages: a bad folder fails at once
    seconds: dict[str, float] = {}

    with work_folder("rq-") as workdir:
        progress.stage("prepare")
        prepared = prepare_model(model, workdir)
        seconds["prepare"] = prepared.seconds
        check_spec_matches(prepared.signature, spec)
        check_recipe_matches(prepared, recipe)
        progress.stage("calibrate")
        calibration = run_calibration(
            prepared, dataset, recipe, spec, workdir, workers=workers, progress=progress
        )
        seconds["calibrate"] = calibration.seconds
        tuning = scratch = None
        user_excluded = recipe.exclude_nodes
        if tune is not None:
            progress.stage("tune")
            recipe, tuning, scratch, seconds["tune"] = _tune(
                backend, prepared, calibration, recipe, spec, workdir, tune, model, workers, progress
            )
        progress.stage("quantize")
        started = time.perf_counter()
        fallback = tuple(n for n in recipe.exclude_nodes if n not in user_excluded) if tuning else ()
        if scratch is not None:  # the backend's own tuner already produced the model: check and publish it
            ops = publish_int8(prepared, calibration, recipe, spec, scratch, output, tuning_fallback=fallback)
        else:
            ops = quantize_prepared(
                prepared, calibration, recipe, spec, output, workdir, tuning_fallback=fallback
            )
            seconds["quantize"] = time.perf_counter() - started

    return QuantizeResult(
        output=output,
        replaced_existing=replaced_existing,
        recipe=recipe,
        spec=spec,
        cpu=cpu,
        advice=advice,
        reduce_range_source=rr_source,
        prepared=prepared,
        calibration_dataset=dataset,
        calibration_files=calibration.files(),
        images_requested=len(calibration.samples),
        images_used=calibration.used,
        skipped=calibration.skipped,
        replaced_images=calibration.replaced,
        ranges=calibration.ranges,
        quantized_ops=ops,
        fp32_bytes=model.stat().st_size,
        int8_bytes=output.stat().st_size,
        seconds=seconds,
        tuning=tuning,
        bias_correction=calibration.bias_correction,
        runtime_form=calibration.runtime_form,
        channel_pads=calibration.channel_pads,
    )


def read_model_metadata(path: Path) -> dict[str, str]:
    """The `metadata_props` of an ONNX file (rq stores its recipe and preprocessing spec there)."""
    model = load_model(path, load_weights=False)
    return {p.key: p.value for p in model.metadata_props}


__all__ = [
    "ModelError",
    "QuantizationFailed",
    "QuantizeResult",
    "default_output_path",
    "quantize_model",
    "read_model_metadata",
]
