"""quantize_model end to end on tiny models with generated images: outputs, metadata, CPU-dependent
choices, skipped images, and nothing left behind on failure or Ctrl-C."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import quantize.pipeline as pipeline
from calibration import PreprocessSpec
from calibration.errors import RqInputError
from calibration.progress import ProgressCallbacks
from quantize.pipeline import (
    PREPROCESS_METADATA_KEY,
    default_output_path,
    quantize_model,
    read_model_metadata,
)
from quantize.recipe import METADATA_KEY, QuantRecipe
from tests.helpers.calib_images import WNIDS, make_class_folders, write_truncated_jpeg, write_zero_byte
from tests.helpers.tiny_models import CLASSES, SMALL_SPEC, fixed_batch1, random_inputs

SMALL_RECIPE = QuantRecipe(samples=16, batch_size=4)


def quantize(model, calib, output, **kwargs):
    kwargs.setdefault("recipe", SMALL_RECIPE)
    kwargs.setdefault("spec", SMALL_SPEC)
    kwargs.setdefault("workers", 2)
    return quantize_model(model, calib, output=output, **kwargs)


def run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture()
def isolated_tmp(tmp_path, monkeypatch):
    """Point tempfile (rq's work folders) into the test's own folder, so leftovers can be seen."""
    scratch = tmp_path / "system-tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return scratch


@pytest.mark.parametrize("which", ["tiny_model", "v2_model"])
def test_quantize_model_end_to_end(which, request, calib_dir, tmp_path, avx2_cpu, isolated_tmp):
    model = request.getfixturevalue(which)
    output = tmp_path / "out" / "model-int8.onnx"
    output.parent.mkdir()
    stages: list[str] = []
    started: list[int] = []
    advanced: list[int] = []
    progress = ProgressCallbacks(on_stage=stages.append, on_total=started.append, on_advance=advanced.append)
    result = quantize(model, calib_dir, output, cpu=avx2_cpu, progress=progress)

    assert result.output == output and output.is_file()
    assert sorted(p.name for p in output.parent.iterdir()) == ["model-int8.onnx"]
    assert list(isolated_tmp.iterdir()) == []  # the work folder is gone
    assert stages == ["prepare", "calibrate", "quantize"]
    assert started == [16] and sum(advanced) == 16
    assert result.images_used == 16 and result.skipped == []
    assert result.calibration_dataset.layout == "wnid-folders"
    assert len(result.calibration_files) == 16
    ops = result.quantized_ops
    # Every candidate is quantized, or listed as FP32 with the placement's reason (none by the user).
    assert ops.quantized + len(ops.fp32) == ops.candidates > 0
    assert ops.by_type["Conv"][0] == ops.by_type["Conv"][1] and ops.by_type["Gemm"] == [0, 1]
    assert ops.fp32["fc"] == ["Gemm", "classifier head, kept FP32 (it writes the logits)"]
    assert all(reason != "excluded by the user" for _t, reason in ops.fp32.values())
    assert result.fp32_bytes == model.stat().st_size and result.int8_bytes == output.stat().st_size
    assert set(result.seconds) == {"prepare", "calibrate", "quantize"}

    int8 = onnx.load(str(output))
    onnx.checker.check_model(int8)
    meta = read_model_metadata(output)
    assert QuantRecipe.from_json(meta[METADATA_KEY]) == result.recipe
    assert PreprocessSpec.from_dict(json.loads(meta[PREPROCESS_METADATA_KEY])) == SMALL_SPEC
    assert meta["rq.source_model"] == model.name

    x = random_inputs(4)
    out = run(output, x)
    assert out.shape == (4, CLASSES) and np.isfinite(out).all()
    data = result.to_dict()
    json.dumps(data)  # serialisable as is
    assert data["calibration"]["images_used"] == 16
    assert data["reduce_range_source"] == "cpu"


def test_v2_model_is_upgraded_on_the_way(v2_model, calib_dir, tmp_path, avx2_cpu):
    result = quantize(v2_model, calib_dir, tmp_path / "v2-int8.onnx", cpu=avx2_cpu)
    steps = " | ".join(result.prepared.steps)
    assert "opset 7 → 13" in steps
    by_type = result.quantized_ops.by_type
    # 5 convolutions + the 3 BatchNormalizations after the input one (which stays float) rewritten as
    # depthwise 1×1 Convs; the head (and the Flatten that only feeds it) stays FP32.
    assert by_type["Conv"] == [8, 8] and by_type["Gemm"] == [0, 1]
    # With every BatchNormalization now a Conv, the residual Adds, the Relus (folded) and the pooling after the
    # last pre-activation all run in integer arithmetic.
    assert by_type["Add"] == [2, 2] and by_type["Relu"] == [5, 5] and by_type["GlobalAveragePool"] == [1, 1]
    assert result.quantized_ops.fp32 == {
        "flatten": ["Flatten", "its output feeds only FP32 nodes"],
        "fc": ["Gemm", "classifier head, kept FP32 (it writes the logits)"],
    }
    assert onnx.load(str(result.output)).opset_import[0].version >= 13


def test_calibration_images_are_read_through_the_public_reader(
    tiny_model, calib_dir, tmp_path, avx2_cpu, monkeypatch
):
    """rq feeds its own calibrator (and bias correction) through calibration.ImageCalibrationReader."""
    from calibration import ImageCalibrationReader

    feeds: list[int] = []
    real_get_next = ImageCalibrationReader.get_next

    def counted(self):
        feed = real_get_next(self)
        if feed is not None:
            feeds.append(len(feed[self.input_name]))
        return feed

    monkeypatch.setattr(ImageCalibrationReader, "get_next", counted)
    quantize(tiny_model, calib_dir, tmp_path / "int8.onnx", cpu=avx2_cpu)
    # All 16 images, once for the ranges and once for bias correction.
    assert sum(feeds) == 2 * 16 and len(feeds) >= 2


def test_fixed_batch_model(calib_dir, tmp_path, avx2_cpu):
    model = fixed_batch1(tmp_path / "b1.onnx")
    result = quantize(model, calib_dir, tmp_path / "b1-int8.onnx", cpu=avx2_cpu)
    assert result.images_used == 16
    assert run(result.output, random_inputs(1)).shape == (1, CLASSES)


def test_reduce_range_from_cpu(tiny_model, calib_dir, tmp_path, avx2_cpu, vnni_cpu):
    no_vnni = quantize(tiny_model, calib_dir, tmp_path / "a.onnx", cpu=avx2_cpu)
    assert no_vnni.recipe.reduce_range is True
    assert no_vnni.reduce_range_source == "cpu"
    assert no_vnni.advice.reduce_range is True
    assert json.loads(read_model_metadata(no_vnni.output)[METADATA_KEY])["reduce_range"] is True

    vnni = quantize(tiny_model, calib_dir, tmp_path / "b.onnx", cpu=vnni_cpu)
    assert vnni.recipe.reduce_range is False
    assert vnni.reduce_range_source == "cpu"


def test_reduce_range_user_override(tiny_model, calib_dir, tmp_path, avx2_cpu, vnni_cpu):
    forced_off = quantize(
        tiny_model,
        calib_dir,
        tmp_path / "a.onnx",
        cpu=avx2_cpu,
        recipe=SMALL_RECIPE.with_changes(reduce_range=False),
    )
    assert forced_off.recipe.reduce_range is False and forced_off.reduce_range_source == "user"
    assert forced_off.advice.reduce_range is True  # the advice is still reported
    forced_on = quantize(
        tiny_model,
        calib_dir,
        tmp_path / "b.onnx",
        cpu=vnni_cpu,
        recipe=SMALL_RECIPE.with_changes(reduce_range=True),
    )
    assert forced_on.recipe.reduce_range is True and forced_on.reduce_range_source == "user"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet50-v2-7.onnx", "resnet50-v2-int8.onnx"),
        ("resnet50-v1-keras-opset7.onnx", "resnet50-v1-keras-opset7-int8.onnx"),
        ("models/mobilenetv2-12.onnx", "mobilenetv2-int8.onnx"),
        ("model.onnx", "model-int8.onnx"),
    ],
)
def test_default_output_path(name, expected, tmp_path):
    assert default_output_path(Path(name), tmp_path) == tmp_path / expected
    assert default_output_path(Path(name)) == Path.cwd() / expected


def test_corrupt_images_are_skipped_and_counted(tiny_model, tmp_path, avx2_cpu):
    calib = tmp_path / "calib"
    make_class_folders(calib, {WNIDS[0]: 8, WNIDS[1]: 8}, size=(48, 40))
    truncated = write_truncated_jpeg(calib / WNIDS[0] / f"{WNIDS[0]}_truncated.JPEG")
    empty = write_zero_byte(calib / WNIDS[1] / f"{WNIDS[1]}_empty.JPEG")
    result = quantize(
        tiny_model, calib, tmp_path / "out.onnx", cpu=avx2_cpu, recipe=SMALL_RECIPE.with_changes(samples=18)
    )
    assert len(result.calibration_files) == 18
    assert result.images_used == 16
    assert {p for p, _ in result.skipped} == {truncated, empty}
    assert all(reason and "\n" not in reason for _, reason in result.skipped)
    assert len(result.to_dict()["calibration"]["skipped"]) == 2
    assert result.output.is_file()


def test_unreadable_calibration_images_are_replaced_in_every_pass(tiny_model, tmp_path, avx2_cpu):
    """A sampled image that cannot be read is replaced by another of its class; bias correction's pass reads
    the same replacements, and the report lists them."""
    from calibration import discover_dataset, select_samples

    calib = tmp_path / "calib"
    make_class_folders(calib, {WNIDS[0]: 6, WNIDS[1]: 6}, size=(48, 40))
    recipe = SMALL_RECIPE.with_changes(samples=4)
    chosen = select_samples(discover_dataset(calib), 4, recipe.seed)
    broken = [s.path for s in chosen[:2]]
    for path in broken:
        write_truncated_jpeg(path)
    result = quantize(tiny_model, calib, tmp_path / "out.onnx", cpu=avx2_cpu, recipe=recipe)
    assert result.images_requested == 4 and result.images_used == 4
    assert [p for p, _ in result.skipped] == broken
    assert [old for old, _ in result.replaced_images] == broken
    # Of the same class (the folder names it), and not already in the sample.
    assert all(old.parent == new.parent for old, new in result.replaced_images)
    assert not {new for _, new in result.replaced_images} & {s.path for s in chosen}
    assert result.bias_correction.images == 4
    # What tuning's sensitivity pass reads: the replacements in the unreadable images' places.
    run = pipeline.CalibrationRun(
        dataset=None,
        samples=chosen,
        ranges=None,
        used=4,
        skipped=result.skipped,
        smoke_sample=None,
        seconds=0,
    )
    run.replaced = result.replaced_images
    assert [s.path for s in run.readable_samples()] == [new for _, new in result.replaced_images] + [
        s.path for s in chosen[2:]
    ]
    assert result.calibration_files == [s.path for s in chosen] + [new for _, new in result.replaced_images]
    calibration = result.to_dict()["calibration"]
    assert calibration["images_requested"] == 4 and len(calibration["replaced"]) == 2


def test_all_corrupt_folder_writes_nothing(tiny_model, tmp_path, avx2_cpu, isolated_tmp):
    calib = tmp_path / "calib"
    for i in range(3):
        write_truncated_jpeg(calib / WNIDS[0] / f"{WNIDS[0]}_{i}.JPEG")
    write_zero_byte(calib / WNIDS[1] / f"{WNIDS[1]}_0.JPEG")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(RqInputError, match="could be decoded") as info:
        quantize(tiny_model, calib, out_dir / "out.onnx", cpu=avx2_cpu)
    assert "\n" not in str(info.value)
    assert list(out_dir.iterdir()) == []
    assert list(isolated_tmp.iterdir()) == []


@pytest.mark.parametrize("where", ["under-a-file", "missing-folder"])
def test_unwritable_output_fails_before_any_work(
    where, tiny_model, calib_dir, tmp_path, monkeypatch, avx2_cpu
):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file, so this works as root too")
    output = blocker / "out.onnx" if where == "under-a-file" else tmp_path / "missing" / "out.onnx"

    def no_work(*args, **kwargs):
        raise AssertionError("prepare_model ran before the output path was checked")

    monkeypatch.setattr(pipeline, "prepare_model", no_work)
    with pytest.raises(RqInputError, match="output folder") as info:
        quantize(tiny_model, calib_dir, output, cpu=avx2_cpu)
    assert "\n" not in str(info.value)
    assert not output.exists()


def test_output_is_a_folder(tiny_model, calib_dir, tmp_path, avx2_cpu):
    with pytest.raises(RqInputError, match="is a folder"):
        quantize(tiny_model, calib_dir, tmp_path, cpu=avx2_cpu)


def test_output_is_the_input_model(tiny_model, calib_dir, tmp_path, avx2_cpu):
    model = tmp_path / "m.onnx"
    shutil.copy(tiny_model, model)
    with pytest.raises(RqInputError, match="input model"):
        quantize(model, calib_dir, model, cpu=avx2_cpu)
    assert model.read_bytes() == tiny_model.read_bytes()


def test_bad_calibration_folder_fails_before_prepare(tiny_model, tmp_path, monkeypatch, avx2_cpu):
    empty = tmp_path / "empty"
    empty.mkdir()

    def no_work(*args, **kwargs):
        raise AssertionError("prepare_model ran before the calibration folder was checked")

    monkeypatch.setattr(pipeline, "prepare_model", no_work)
    with pytest.raises(RqInputError):
        quantize(tiny_model, empty, tmp_path / "out.onnx", cpu=avx2_cpu)


def test_spec_that_does_not_fit_the_model(tiny_model, calib_dir, tmp_path, avx2_cpu):
    with pytest.raises(RqInputError, match="adjust --crop"):
        quantize(
            tiny_model,
            calib_dir,
            tmp_path / "out.onnx",
            cpu=avx2_cpu,
            spec=PreprocessSpec(resize=64, crop=48),
        )
    assert not (tmp_path / "out.onnx").exists()


def test_keyboard_interrupt_during_calibration_leaves_nothing(
    tiny_model, calib_dir, tmp_path, monkeypatch, avx2_cpu, isolated_tmp
):
    real_calibrate = pipeline.calibrate
    consumed: list[int] = []

    def interrupted(model_path, input_name, batches, recipe, workdir, **kwargs):
        def one_then_ctrl_c():
            for images in batches:
                consumed.append(len(images))
                yield images
                raise KeyboardInterrupt

        return real_calibrate(model_path, input_name, one_then_ctrl_c(), recipe, workdir, **kwargs)

    monkeypatch.setattr(pipeline, "calibrate", interrupted)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_model, calib_dir, out_dir / "model-int8.onnx", cpu=avx2_cpu)
    assert consumed == [4]  # it really was interrupted mid-calibration
    assert list(out_dir.iterdir()) == []
    assert list(isolated_tmp.iterdir()) == []


def test_keyboard_interrupt_while_publishing_keeps_previous_output(
    tiny_model, calib_dir, tmp_path, monkeypatch, avx2_cpu
):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "model-int8.onnx"
    output.write_bytes(b"previous run")
    real_save = onnx.save_model

    def save(proto, path, *args, **kwargs):
        if Path(path).parent == out_dir:  # atomic_output's temporary file
            Path(path).write_bytes(b"partial")
            raise KeyboardInterrupt
        return real_save(proto, path, *args, **kwargs)

    monkeypatch.setattr(onnx, "save_model", save)
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_model, calib_dir, output, cpu=avx2_cpu)
    assert [p.name for p in out_dir.iterdir()] == ["model-int8.onnx"]
    assert output.read_bytes() == b"previous run"


def test_inc_backend_without_the_extra_fails_before_any_work(
    tiny_model, calib_dir, tmp_path, avx2_cpu, monkeypatch
):
    # Simulate a venv without neural-compressor (the main venv has none; the inc venv has it).
    monkeypatch.setitem(sys.modules, "neural_compressor", None)
    with pytest.raises(RqInputError, match=r"pip install 'rq-quant\[inc\]'"):
        quantize(tiny_model, calib_dir, tmp_path / "o.onnx", cpu=avx2_cpu, recipe=QuantRecipe(backend="inc"))
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_each_calibration_method(method, v2_model, calib_dir, tmp_path, avx2_cpu):
    recipe = SMALL_RECIPE.with_changes(calibration=method, num_bins=256 if method == "entropy" else None)
    result = quantize(v2_model, calib_dir, tmp_path / "o.onnx", cpu=avx2_cpu, recipe=recipe)
    assert result.ranges.method == method
    assert QuantRecipe.from_json(read_model_metadata(result.output)[METADATA_KEY]).calibration == method
    assert run(result.output, random_inputs(2)).shape == (2, CLASSES)


def test_inc_calibration_passes_decode_with_the_workers_asked_for(
    tiny_model, calib_dir, tmp_path, monkeypatch
):
    """`--workers` reaches INC's own calibration passes (built here without INC: `calibration_passes` is what
    `quantize_with_inc` reads the images through)."""
    from calibration import discover_dataset
    from quantize.graph.prepare import prepare_model

    seen: list = []
    real_stream = pipeline.BatchStream

    def recording_stream(*args, **kwargs):
        seen.append(kwargs.get("workers"))
        return real_stream(*args, **kwargs)

    recipe = QuantRecipe(backend="inc", samples=4)
    prepared = prepare_model(tiny_model, tmp_path)
    calibration = pipeline.run_calibration(
        prepared, discover_dataset(calib_dir), recipe, SMALL_SPEC, tmp_path, workers=2
    )
    monkeypatch.setattr(pipeline, "BatchStream", recording_stream)
    from quantize.backends.inc import calibration_passes

    make_batches, _batch = calibration_passes(prepared, calibration, recipe, SMALL_SPEC)
    images = sum(len(b) for b in make_batches())
    assert seen == [2] and images == 4


def test_inc_calibration_passes_replace_unreadable_images_as_rq_does(tiny_model, calib_dir, tmp_path):
    """INC reads the calibration images again in every trial: the same replacements as rq's own pass."""
    from calibration import discover_dataset, select_samples
    from quantize.backends.inc import calibration_passes
    from quantize.graph.prepare import prepare_model

    calib = shutil.copytree(calib_dir, tmp_path / "calib")
    recipe = QuantRecipe(backend="inc", samples=4)
    dataset = discover_dataset(calib)
    broken = select_samples(dataset, 4, recipe.seed)[3].path
    write_zero_byte(broken)
    prepared = prepare_model(tiny_model, tmp_path)
    calibration = pipeline.run_calibration(prepared, dataset, recipe, SMALL_SPEC, tmp_path)
    make_batches, batch = calibration_passes(prepared, calibration, recipe, SMALL_SPEC)
    # INC reads as many batches as the sample fills (ceil(samples / batch)), then stops without exhausting
    # the pass: the replacement must be in those batches, and the counts must be kept all the same.
    passes = []
    for _ in range(2):
        gen = make_batches()
        passes.append([next(gen) for _ in range(-(-recipe.samples // batch))])
        gen.close()
        assert calibration.used == 4 and [old for old, _ in calibration.replaced] == [broken]
    assert [len(b) for b in passes[0]] == [4]
    np.testing.assert_array_equal(passes[0][0], passes[1][0])
