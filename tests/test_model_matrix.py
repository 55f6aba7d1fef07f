"""benchmarks/model_matrix.py: one `rq quantize --val --bench` child process per model with its own
preprocessing flags, one Markdown row per model; unknown or changed model files are skipped with a note."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from quantize.fetch import sha256_file
from tests.helpers.calib_images import make_class_folders
from tests.helpers.onehot import wnid
from tests.helpers.sensitive import sensitive_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def matrix():
    spec = importlib.util.spec_from_file_location("model_matrix", ROOT / "benchmarks" / "model_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shared_models_have_their_preprocessing(matrix):
    flags = matrix.PREPROCESSING["efficientnet-lite1.onnx"][1]
    assert flags == [
        "--resize",
        "274",
        "--crop",
        "240",
        "--mean",
        "0.498,0.498,0.498",
        "--std",
        "0.502,0.502,0.502",
    ]
    assert matrix.PREPROCESSING["resnet50-v1-keras-opset7.onnx"][1] == []


def test_matrix_runs_rq_per_model_and_writes_one_row_each(matrix, tmp_path, monkeypatch, capsys):
    models = tmp_path / "models"
    models.mkdir()
    tiny = sensitive_model(models / "tiny.onnx", n_sensitive=0)
    sensitive_model(models / "changed.onnx", n_sensitive=0, seed=5)
    sensitive_model(models / "unknown.onnx", n_sensitive=0)
    small = ["--resize", "36", "--crop", "32", "--samples", "6", "--workers", "2"]
    monkeypatch.setattr(
        matrix,
        "PREPROCESSING",
        {"tiny.onnx": (sha256_file(tiny), small), "changed.onnx": ("0" * 64, small)},
    )
    calib, val = tmp_path / "calib", tmp_path / "val"
    make_class_folders(calib, {wnid(0): 4, wnid(1): 4}, size=(48, 40))
    make_class_folders(val, {wnid(2): 3, wnid(3): 3}, size=(48, 40))
    out, js = tmp_path / "matrix.md", tmp_path / "matrix.json"
    args = ["--models", str(models), "--calib", str(calib), "--val", str(val), "--bench-runs", "1"]
    args += ["--val-limit", "5", "--out", str(out), "--json-out", str(js)]
    assert matrix.main(args) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| model | FP32 top-1 % | INT8 top-1 % | drop pt [95% CI] | agreement %")
    (row,) = [r for r in rows if r.startswith("| tiny.onnx")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    data = json.loads(js.read_text())
    (entry,) = data
    drop = entry["variants"][1]["drop"]
    assert drop["n"] == 5  # --val-limit reached rq
    assert cells[3] == f"{drop['drop_pt']:.2f} [{drop['ci_low_pt']:.2f}, {drop['ci_high_pt']:.2f}]"
    assert cells[4] == f"{drop['agreement_pct']:.2f} ({drop['disagreements']} differ)"
    assert cells[6].endswith("×") and cells[7].endswith("×")  # batch 1 and 8 ratios from rq's bench
    assert "--resize" in entry["command"] and "--bench" in entry["command"]
    assert "skipped unknown.onnx: no preprocessing known" in text
    assert "skipped changed.onnx: sha256 differs" in text
