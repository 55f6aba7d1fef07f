"""Shared fixtures of the quantization tests: tiny models, small calibration folders, synthetic CPUs.

Session-scoped files are built once and must not be modified by tests (copy them first).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from calib_images import make_class_folders
from tiny_models import tiny_cnn, v2_shaped_opset7

from quantize.measure.cpu import CpuInfo, detect_cpu

#: Real ImageNet class ids (indices 0 and 1 of the synset list).
WNIDS = ("n01440764", "n01443537")

_CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: rq test CPU\nflags\t\t: sse4_2 avx2\n\n"


def x86_cpu(*flags: str) -> CpuInfo:
    """An x86-64 CPU with exactly `flags`, whatever machine runs the tests."""
    return detect_cpu(cpuinfo_text=_CPUINFO, flags_override=list(flags))


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
