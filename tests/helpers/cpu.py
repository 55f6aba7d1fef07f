"""Synthetic CPUs: the same CPU description whatever machine runs the tests."""

from __future__ import annotations

from quantize.measure.cpu import CpuInfo, detect_cpu

_CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: rq test CPU\nflags\t\t: sse4_2 avx2\n\n"


def x86_cpu(*flags: str) -> CpuInfo:
    """An x86-64 CPU with exactly `flags`, whatever machine runs the tests."""
    return detect_cpu(cpuinfo_text=_CPUINFO, flags_override=list(flags))
