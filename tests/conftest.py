"""Shared fixtures of the quantization tests: tiny models, small calibration folders, synthetic CPUs, the CLI
in an empty working folder, the tuning tests' sensitive model and its FP32-labelled images.

The builders they use live in tests/helpers/ (test modules import those, never each other or this file).
Session- and module-scoped files are built once and must not be modified by tests (copy them first).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from quantize.measure.cpu import CpuInfo
from tests.helpers.calib_images import WNIDS, make_class_folders
from tests.helpers.cli import SMALL, all_output, invoke
from tests.helpers.cpu import x86_cpu
from tests.helpers.onehot import wnid
from tests.helpers.sensitive import center_fc_bias, colored_images, labelled_by_fp32, sensitive_model
from tests.helpers.tiny_models import tiny_cnn, v2_shaped_opset7


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_cnn(tmp_path_factory.mktemp("models") / "tiny.onnx")


@pytest.fixture(scope="session")
def v2_model(tmp_path_factory) -> Path:
    return v2_shaped_opset7(tmp_path_factory.mktemp("models") / "resnet-v2-tiny-7.onnx")


@pytest.fixture(scope="session")
def calib_dir(tmp_path_factory) -> Path:
    """16 small generated JPEGs in two ImageNet class folders."""
    root = tmp_path_factory.mktemp("calib")
    make_class_folders(root, {WNIDS[0]: 8, WNIDS[1]: 8}, size=(48, 40))
    return root


@pytest.fixture()
def avx2_cpu() -> CpuInfo:
    return x86_cpu("avx2")


@pytest.fixture()
def vnni_cpu() -> CpuInfo:
    return x86_cpu("avx2", "avx512f", "avx512_vnni")


@pytest.fixture()
def cli(tmp_path, monkeypatch):
    """`rq ARGS` run in an empty working folder (reports and default outputs land there, not in the repo)."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return invoke


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny FP32 model and its INT8 version made by `rq quantize`."""
    base = tmp_path_factory.mktemp("rt-models")
    fp32 = tiny_cnn(base / "tiny.onnx")
    calib = base / "calib"
    make_class_folders(calib, {wnid(0): 4, wnid(1): 4}, size=(48, 40))
    int8 = base / "tiny-int8.onnx"
    result = invoke(
        "quantize", fp32, "--calib", calib, "--samples", "8", "--workers", "2", "--out", int8,
        "--report-dir", base / "reports", *SMALL,
    )  # fmt: skip
    assert result.exit_code == 0, all_output(result)
    return fp32, int8


@pytest.fixture(scope="module")
def sensitive(tmp_path_factory) -> Path:
    """tests.helpers.sensitive's model, one sensitive node."""
    return sensitive_model(tmp_path_factory.mktemp("tune-models") / "sensitive.onnx")


@pytest.fixture(scope="module")
def sensitive_val(tmp_path_factory, sensitive) -> Path:
    """About 18 images labelled with the FP32 model's own (confident) predictions, of at least 2 classes."""
    base = tmp_path_factory.mktemp("tune-val")
    center_fc_bias(sensitive, colored_images(base / "staging", 36))
    counts = labelled_by_fp32(sensitive, base / "val", base / "staging")
    assert len(counts) >= 2 and sum(counts.values()) >= 12, counts
    return base / "val"


@pytest.fixture(scope="module")
def tune_calib(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tune-calib")
    colored_images(root, 16, start=500)
    return root


@pytest.fixture(scope="module")
def flipping(sensitive, sensitive_val, tune_calib) -> dict[str, Path]:
    """A model whose INT8 version (under tests.helpers.sensitive's BREAKING recipes) flips predictions: the
    sensitive model, validation images labelled by its FP32 predictions, and calibration images."""
    return {"model": sensitive, "val": sensitive_val, "calib": tune_calib}
