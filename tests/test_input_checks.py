"""Inputs that must be caught before anything is written, and models with a fixed batch dimension."""

from __future__ import annotations

import os

import onnx
import pytest
from typer.testing import CliRunner

from calibration import discover_dataset, select_samples
from calibration.errors import RqInputError
from quantize.cli import app
from quantize.measure.evaluate import evaluate
from quantize.pipeline import file_list_sha256, quantize_model
from quantize.recipe import QuantRecipe
from tests.helpers.cli import ENV, all_output
from tests.helpers.onehot import onehot_model, onehot_row
from tests.helpers.tiny_models import SMALL_SPEC, fixed_batch1

SMALL = ["--resize", "36", "--crop", "32", "--samples", "8", "--workers", "2"]


def _fixed_batch(path, batch: int):
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = batch
    onnx.save(model, str(path))
    return path


def test_evaluate_runs_a_fixed_batch_model_with_any_batch_size(tmp_path, calib_dir):
    free = onehot_model(tmp_path / "free.onnx", onehot_row(1000, [3, 1, 2, 4, 5]), hw=32)
    fixed = _fixed_batch(onehot_model(tmp_path / "fixed.onnx", onehot_row(1000, [3, 1, 2, 4, 5]), hw=32), 1)
    samples = select_samples(discover_dataset(calib_dir), 5, 0)  # 5 images, batch 4: a padded last batch
    run = evaluate([free, fixed], samples, SMALL_SPEC, batch_size=4)
    assert run.images == 5
    assert (run.models[0].predictions == run.models[1].predictions).all()


def test_file_list_hash_accepts_symlinks_pointing_outside_the_folder(tmp_path):
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(b"x")
    root = tmp_path / "calib"
    root.mkdir()
    os.symlink(outside, root / "a.jpg")
    assert len(file_list_sha256([root / "a.jpg"], root)) == 64


def test_unknown_excluded_node_is_refused_before_calibration(tiny_model, calib_dir, tmp_path, avx2_cpu):
    recipe = QuantRecipe(calibration="minmax", samples=8, exclude_nodes=("no_such_node",))
    with pytest.raises(RqInputError, match="no_such_node"):
        quantize_model(
            tiny_model, calib_dir, output=tmp_path / "o.onnx", recipe=recipe, spec=SMALL_SPEC, cpu=avx2_cpu
        )
    assert not (tmp_path / "o.onnx").exists()


def test_op_types_absent_from_the_model_are_refused(tiny_model, calib_dir, tmp_path, avx2_cpu):
    recipe = QuantRecipe(calibration="percentile", samples=8, op_types=("MatMul",))
    with pytest.raises(RqInputError, match="no node of type MatMul"):
        quantize_model(
            tiny_model, calib_dir, output=tmp_path / "o.onnx", recipe=recipe, spec=SMALL_SPEC, cpu=avx2_cpu
        )
    assert not (tmp_path / "o.onnx").exists()


def test_fixed_batch_model_quantizes(tmp_path, calib_dir, avx2_cpu):
    model = fixed_batch1(tmp_path / "b1.onnx")
    recipe = QuantRecipe(calibration="minmax", samples=8)
    result = quantize_model(
        model, calib_dir, output=tmp_path / "b1-int8.onnx", recipe=recipe, spec=SMALL_SPEC, cpu=avx2_cpu
    )
    assert result.quantized_ops.quantized > 0


def test_bench_runs_zero_fails_before_quantizing(tiny_model, calib_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o.onnx"
    args = [
        "quantize",
        str(tiny_model),
        "--calib",
        str(calib_dir),
        "--bench",
        "--bench-runs",
        "0",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, [*args, *SMALL], env=ENV)
    assert result.exit_code == 2, all_output(result)
    assert "--bench-runs" in all_output(result)
    assert not out.exists()


def test_val_with_a_non_imagenet_model_fails_before_quantizing(tiny_model, calib_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o.onnx"
    args = [
        "quantize",
        str(tiny_model),
        "--calib",
        str(calib_dir),
        "--val",
        str(calib_dir),
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, [*args, *SMALL], env=ENV)
    assert result.exit_code == 2, all_output(result)
    assert "10 output classes" in all_output(result)
    assert not out.exists()


def test_bins_with_minmax_is_refused():
    with pytest.raises(RqInputError, match="bins"):
        QuantRecipe(calibration="minmax", num_bins=256)
