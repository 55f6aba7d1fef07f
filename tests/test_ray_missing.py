"""`--ray` without the ray extra, and the flat 50,000-image validation layout at full size (no Ray needed).

These run in every virtualenv: where ray is installed, its absence is simulated (`sys.modules["ray"] = None`
makes `import ray` raise ImportError, exactly what an environment without the extra does).
"""

from __future__ import annotations

import socket
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from calibration import LAYOUT_FLAT_LABELS, discover_dataset
from quantize.cli import app
from tests.helpers.calib_images import make_class_folders, write_rgb
from tests.helpers.cli import ENV, assert_one_line_error
from tests.helpers.onehot import onehot_model, onehot_row, wnid

HINT = "pip install 'rq-quant[ray]'"


@pytest.fixture()
def no_ray(monkeypatch):
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    base = tmp_path_factory.mktemp("noray")
    model = onehot_model(base / "m.onnx", onehot_row(1000, [2]))
    val = base / "val"
    make_class_folders(val, {wnid(2): 2}, size=(40, 36))
    return {"model": model, "val": val, "base": base}


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def test_eval_with_ray_but_without_the_extra_is_one_line_naming_the_install(no_ray, small):
    result = _invoke(
        "eval", small["model"], "--data", small["val"], "--ray", "auto", "--resize", "36", "--crop", "32"
    )
    assert_one_line_error(result, HINT)


def test_sweep_with_ray_but_without_the_extra_writes_nothing(no_ray, small, tmp_path):
    reports = tmp_path / "reports"
    args = ["sweep", small["model"], "--calib", small["val"], "--val", small["val"], "--ray", "auto"]
    result = _invoke(*args, "--report-dir", reports)
    assert_one_line_error(result, HINT)
    assert not reports.exists() or not any(reports.rglob("report.json"))


def test_quantize_ray_needs_val(small, tmp_path):
    result = _invoke(
        "quantize", small["model"], "--calib", small["val"], "--ray", "auto", "-o", tmp_path / "x.onnx"
    )
    assert_one_line_error(result, "--ray runs the validation on a Ray cluster: it needs --val")
    assert not (tmp_path / "x.onnx").exists()


def test_flat_50000_file_layout_with_val_txt(tmp_path):
    """The layout of the full ILSVRC2012 validation set: 50,000 files in one folder, labels from val.txt."""
    flat = tmp_path / "val"
    flat.mkdir()
    labels = np.random.default_rng(1).integers(0, 1000, size=50_000)
    real = {1, 2, 25_000, 50_000}
    for i in range(1, 50_001):
        path = flat / f"ILSVRC2012_val_{i:08d}.JPEG"
        if i in real:
            write_rgb(path, size=(40, 32), seed=i)
        else:
            path.touch()  # listing and labelling do not open the files
    val_txt = tmp_path / "val.txt"
    val_txt.write_text("".join(f"ILSVRC2012_val_{i:08d}.JPEG {labels[i - 1]}\n" for i in range(1, 50_001)))
    started = time.monotonic()
    dataset = discover_dataset(flat, val_txt)
    seconds = time.monotonic() - started
    assert dataset.layout == LAYOUT_FLAT_LABELS
    assert len(dataset) == 50_000 and dataset.labelled
    assert [s.label for s in dataset.samples] == labels.tolist()  # sorted names = val.txt order
    assert dataset.samples[24_999].path.name == "ILSVRC2012_val_00025000.JPEG"
    assert seconds < 60, f"listing 50,000 files took {seconds:.1f} s"
    # the Kaggle CSV labels the same files identically
    csv = tmp_path / "LOC_val_solution.csv"
    from calibration import load_synsets

    wnids = [s.wnid for s in load_synsets()]
    rows = "".join(f"ILSVRC2012_val_{i:08d},{wnids[labels[i - 1]]} 1 2 3 4\n" for i in range(1, 50_001))
    csv.write_text("ImageId,PredictionString\n" + rows)
    assert [s.label for s in discover_dataset(flat, csv).samples] == labels.tolist()


def test_an_address_where_nothing_listens_fails_at_once():
    from calibration.errors import RqInputError
    from quantize.distributed import check_reachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(RqInputError, match=r"cannot reach the Ray cluster at 127\.0\.0\.1:\d+"):
        check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 10


def test_a_port_that_is_not_a_ray_head_fails_within_seconds():
    """A listener that accepts TCP but never speaks gRPC: Ray's own client would retry for minutes."""
    from calibration.errors import RqInputError
    from quantize.distributed import check_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(RqInputError, match="does not answer like a Ray head"):
            check_reachable(f"127.0.0.1:{port}", timeout=2.0)
        assert time.monotonic() - started < 10


@pytest.mark.parametrize("address", ["head", "head:port", "ray://"])
def test_an_address_without_a_port_is_bad_input(address):
    from calibration.errors import RqInputError
    from quantize.distributed import check_reachable

    with pytest.raises(RqInputError, match="expected auto, local or HOST:PORT"):
        check_reachable(address)


def test_a_model_with_external_data_is_refused_before_anything_is_shipped(tmp_path):
    import onnx

    from calibration.errors import RqInputError
    from quantize.distributed import _check_self_contained

    model = onnx.load(str(onehot_model(tmp_path / "m.onnx", onehot_row(1000, [2]))))
    onnx.save(
        model, str(tmp_path / "ext.onnx"), save_as_external_data=True, size_threshold=0, location="w.bin"
    )
    with pytest.raises(RqInputError, match="external data files"):
        _check_self_contained(tmp_path / "ext.onnx")
    _check_self_contained(tmp_path / "m.onnx")  # one self-contained file: fine
