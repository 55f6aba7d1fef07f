"""CPU model and integer-ISA detection, and the INT8 kernel settings that follow from it.

Why this matters for INT8 post-training quantization with onnxruntime:

* On x86 without VNNI, onnxruntime's u8×s8 GEMM uses ``vpmaddubsw``, which adds *pairs* of u8×s8
  products into a **saturating int16**. With full 8-bit weights a pair can reach 2·255·127 = 64770 and
  clip at 32767, silently corrupting accuracy; 7-bit weights (``reduce_range``) cannot overflow.
* With VNNI (``vpdpbusd``, AVX512-VNNI or AVX-VNNI) the products are accumulated directly in int32, so
  full-range 8-bit weights are safe and INT8 throughput is much higher.
* On ARM the signed dot-product instructions (``sdot``, flag ``asimddp``) multiply s8×s8 into int32.

Detection is deliberately *data driven*: :func:`detect_cpu` parses ``/proc/cpuinfo`` text (or any text
given to it), and everything downstream is a pure function of a :class:`CpuInfo`, so the decisions can
be tested with synthetic CPUs.

The environment variable ``RQ_CPU_FLAGS`` (comma-separated, e.g. ``RQ_CPU_FLAGS=avx2,fma``) replaces the
detected flags. It exists so that one can reproduce the decisions rq would make on a CPU without VNNI
while sitting on a VNNI machine (and vice versa), and so tests do not depend on the host CPU. It only
changes rq's *decisions*; it cannot change which instructions onnxruntime actually executes.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ENV_FLAGS = "RQ_CPU_FLAGS"
PROC_CPUINFO = Path("/proc/cpuinfo")

_X86_ARCHES = {"x86_64", "amd64", "x64", "i386", "i486", "i586", "i686", "x86"}
_ARM_ARCHES = {"aarch64", "arm64", "armv8", "armv8l", "armv7l", "arm"}

# ARM "CPU implementer" codes (from the Arm ARM / Linux arch/arm64/include/asm/cputype.h): aarch64
# /proc/cpuinfo usually has no "model name", so this is the only vendor hint there.
_ARM_IMPLEMENTERS = {
    "0x41": "ARM",
    "0x42": "Broadcom",
    "0x43": "Cavium",
    "0x46": "Fujitsu",
    "0x48": "HiSilicon",
    "0x4e": "NVIDIA",
    "0x50": "APM",
    "0x51": "Qualcomm",
    "0x61": "Apple",
    "0x6d": "Microsoft",
    "0xc0": "Ampere",
}
# A few common Arm Ltd. "CPU part" numbers, so the model line is more useful than a hex code.
_ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd40": "Neoverse-V1",
    "0xd49": "Neoverse-N2",
    "0xd4f": "Neoverse-V2",
}

# numpy's runtime CPU dispatcher runs CPUID / reads HWCAPs on every OS; its names map to Linux flags.
# It knows neither AVX-VNNI nor AMX, so off Linux those two read as absent (the conservative side).
_NUMPY_TO_LINUX = {
    "AVX2": "avx2",
    "FMA3": "fma",
    "AVX512F": "avx512f",
    "AVX512BW": "avx512bw",
    "AVX512VL": "avx512vl",
    "AVX512VNNI": "avx512_vnni",
    "AVX512BF16": "avx512_bf16",
    "ASIMD": "asimd",
    "ASIMDDP": "asimddp",
    "ASIMDHP": "asimdhp",
    "SVE": "sve",
}


def _normalize_arch(arch: str) -> str:
    a = arch.strip().lower()
    if a in {"amd64", "x64"}:
        return "x86_64"
    if a == "arm64":
        return "aarch64"
    return a


def _is_x86(arch: str) -> bool:
    return _normalize_arch(arch) in _X86_ARCHES


def _is_arm(arch: str) -> bool:
    a = _normalize_arch(arch)
    return a in _ARM_ARCHES or a.startswith("armv")


def _parse_flags(items: Iterable[str]) -> frozenset[str]:
    """Lower-case flag names; '-' and '_' are treated alike (``avx512-vnni`` == ``avx512_vnni``)."""
    return frozenset(s.strip().lower().replace("-", "_") for s in items if s and s.strip())


@dataclass(frozen=True)
class CpuInfo:
    """What rq knows about the host CPU. ``flags`` uses Linux /proc/cpuinfo names (lower case)."""

    model: str
    vendor: str
    arch: str
    logical_cores: int
    flags: frozenset[str]
    # None when unknown; used for the default onnxruntime thread count (SMT siblings share FMA units,
    # so intra-op threads beyond the physical cores rarely help and add noise to benchmarks).
    physical_cores: int | None = None
    # Where ``flags`` came from: "proc" (/proc/cpuinfo), "env" (RQ_CPU_FLAGS), "override" (argument),
    # "numpy" (numpy's CPUID probe, off Linux) or "none" (nothing known).
    flags_source: str = "proc"

    @property
    def is_x86(self) -> bool:
        return _is_x86(self.arch)

    @property
    def is_arm(self) -> bool:
        return _is_arm(self.arch)

    @property
    def has_avx2(self) -> bool:
        return "avx2" in self.flags

    @property
    def has_avx512f(self) -> bool:
        return "avx512f" in self.flags

    @property
    def has_amx_int8(self) -> bool:
        return "amx_int8" in self.flags

    @property
    def vnni_sources(self) -> tuple[str, ...]:
        """The flags that give an int32-accumulating 8-bit dot product, in a stable order."""
        names = ("avx512_vnni", "avx_vnni", "asimddp")
        return tuple(n for n in names if n in self.flags)

    @property
    def has_vnni(self) -> bool:
        """True with AVX512-VNNI or AVX-VNNI (x86), or the ARM dot-product extension (``asimddp``)."""
        return bool(self.vnni_sources)

    def isa_summary(self) -> dict[str, bool]:
        """Integer-relevant ISA flags; ``vnni`` is the overall answer (any of the VNNI-like flags)."""
        return {
            "avx2": self.has_avx2,
            "avx512f": self.has_avx512f,
            "avx512_vnni": "avx512_vnni" in self.flags,
            "avx_vnni": "avx_vnni" in self.flags,
            "amx_int8": self.has_amx_int8,
            "asimddp": "asimddp" in self.flags,
            "vnni": self.has_vnni,
        }

    def _cores_text(self) -> str:
        if self.physical_cores and self.physical_cores != self.logical_cores:
            return f"{self.physical_cores} cores / {self.logical_cores} threads"
        return f"{self.logical_cores} cores"

    def describe(self) -> str:
        """One line summary of the CPU and its integer ISA, e.g.

        ``AMD EPYC (x86_64, 2 cores): AVX2 yes, AVX-512 yes, VNNI yes (avx512_vnni), AMX no``.

        ARM CPUs report NEON, dot-product (asimddp) and i8mm instead of the x86 extensions.
        """

        def yn(v: bool) -> str:
            return "yes" if v else "no"

        head = f"{self.model} ({self.arch}, {self._cores_text()})"
        if self.is_arm:
            dot = f"yes ({', '.join(self.vnni_sources)})" if self.has_vnni else "no"
            neon = "asimd" in self.flags or "neon" in self.flags
            body = f"NEON {yn(neon)}, dot-product {dot}, i8mm {yn('i8mm' in self.flags)}"
        else:
            vnni = f"yes ({', '.join(self.vnni_sources)})" if self.has_vnni else "no"
            body = (
                f"AVX2 {yn(self.has_avx2)}, AVX-512 {yn(self.has_avx512f)}, VNNI {vnni}, "
                f"AMX {yn(self.has_amx_int8)}"
            )
        if self.flags_source in {"env", "override"}:
            body += f" [flags from {ENV_FLAGS if self.flags_source == 'env' else 'override'}]"
        elif self.flags_source == "none":
            body += " [CPU flags unknown]"
        return f"{head}: {body}"

    def to_dict(self) -> dict:
        """JSON-friendly form: the fields, flags sorted, plus :meth:`isa_summary` under ``isa``."""
        return {
            "model": self.model,
            "vendor": self.vendor,
            "arch": self.arch,
            "logical_cores": self.logical_cores,
            "physical_cores": self.physical_cores,
            "flags": sorted(self.flags),
            "flags_source": self.flags_source,
            "isa": self.isa_summary(),
            "describe": self.describe(),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> CpuInfo:
        """Inverse of :meth:`to_dict` (extra keys such as ``isa``/``describe`` are ignored)."""
        return cls(
            model=str(d.get("model", "unknown CPU")),
            vendor=str(d.get("vendor", "unknown")),
            arch=str(d.get("arch", "unknown")),
            logical_cores=int(d.get("logical_cores") or 1),
            flags=_parse_flags(d.get("flags", ())),
            physical_cores=d.get("physical_cores"),
            flags_source=str(d.get("flags_source", "proc")),
        )


def _cpuinfo_blocks(text: str) -> list[dict[str, str]]:
    """Split /proc/cpuinfo into one dict per processor (blank-line separated ``key : value`` lines)."""
    blocks: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if cur:
                blocks.append(cur)
                cur = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            cur[key.strip().lower()] = value.strip()
    if cur:
        blocks.append(cur)
    return blocks


def _physical_cores_from_blocks(blocks: list[dict[str, str]]) -> int | None:
    pairs = {(b["physical id"], b["core id"]) for b in blocks if "physical id" in b and "core id" in b}
    if pairs:
        return len(pairs)
    # Some VMs omit "core id" but keep "cpu cores" (cores per package).
    cores = {(b.get("physical id", "0"), b["cpu cores"]) for b in blocks if "cpu cores" in b}
    if cores:
        try:
            return sum(int(c) for _, c in cores)
        except ValueError:
            return None
    return None


def _numpy_flags() -> frozenset[str]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats  # numpy 2.x
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as feats  # numpy 1.26
        except ImportError:
            return frozenset()
    return frozenset(linux for np_name, linux in _NUMPY_TO_LINUX.items() if feats.get(np_name))


def _fallback_model() -> str:
    return platform.processor() or platform.machine() or "unknown CPU"


def detect_cpu(cpuinfo_text: str | None = None, flags_override: Iterable[str] | None = None) -> CpuInfo:
    """Describe the host CPU (or the CPU in ``cpuinfo_text``, a /proc/cpuinfo dump).

    Flag precedence: ``flags_override`` argument, then the ``RQ_CPU_FLAGS`` environment variable
    (comma-separated; empty means unset), then the parsed text. Off Linux (no /proc/cpuinfo) the model
    comes from ``platform.processor()``, the core count from ``os.cpu_count()`` and the flags from
    numpy's CPUID probe; if even that fails the flags are empty, which downstream reads as "no VNNI",
    the conservative choice.
    """
    text = cpuinfo_text
    if text is None and PROC_CPUINFO.is_file():
        try:
            text = PROC_CPUINFO.read_text(errors="replace")
        except OSError:
            text = None

    if text is not None:
        blocks = _cpuinfo_blocks(text)
        # Fields appear in each processor block; some ARM kernels put "Hardware"/"model name" in a
        # trailing block, so look through all blocks for each key (first occurrence wins).
        merged: dict[str, str] = {}
        for b in blocks:
            for k, v in b.items():
                merged.setdefault(k, v)
        raw_flags = merged.get("flags")
        features = merged.get("features")
        if cpuinfo_text is None:
            arch = _normalize_arch(platform.machine() or "unknown")
        elif raw_flags is None and features is not None:
            # aarch64 Linux lists HWCAP names under "Features". When parsing a dump from another machine
            # the host's platform.machine() says nothing about it, so infer the arch from the text.
            arch = "aarch64"
        elif raw_flags is not None or "vendor_id" in merged:
            arch = "x86_64"
        else:
            arch = "unknown"
        flags = _parse_flags((raw_flags or features or "").split())
        source = "proc" if (raw_flags or features) else "none"
        implementer = merged.get("cpu implementer", "").lower()
        vendor = merged.get("vendor_id") or _ARM_IMPLEMENTERS.get(implementer, implementer or "unknown")
        model = merged.get("model name") or merged.get("hardware") or merged.get("cpu model")
        if not model:
            part = merged.get("cpu part", "").lower()
            if part:
                known = _ARM_PARTS.get(part) if implementer == "0x41" else None
                model = f"{vendor} {known or 'part ' + part}"
            else:
                model = _fallback_model() if cpuinfo_text is None else vendor
        logical = sum(1 for b in blocks if "processor" in b) or len(blocks) or 1
        physical = _physical_cores_from_blocks(blocks)
    else:
        arch = _normalize_arch(platform.machine() or "unknown")
        model = _fallback_model()
        vendor = "unknown"
        logical = os.cpu_count() or 1
        physical = None
        flags = _numpy_flags()
        source = "numpy" if flags else "none"

    if flags_override is not None:
        flags, source = _parse_flags(flags_override), "override"
    else:
        env = os.environ.get(ENV_FLAGS, "")
        if env.strip():
            flags, source = _parse_flags(env.split(",")), "env"

    return CpuInfo(
        model=re.sub(r"\s+", " ", model).strip(),
        vendor=vendor,
        arch=arch,
        logical_cores=logical,
        flags=flags,
        physical_cores=physical,
        flags_source=source,
    )


def physical_core_count(cpu: CpuInfo | None = None) -> int:
    """Physical cores (falls back to logical cores, then 1): the default onnxruntime intra-op thread count."""
    cpu = cpu or detect_cpu()
    return cpu.physical_cores or cpu.logical_cores or 1


@dataclass(frozen=True)
class IntegerKernelAdvice:
    """Quantization settings that suit the integer kernels onnxruntime will use on a CPU."""

    reduce_range: bool
    activation_type: str  # "uint8" | "int8"
    weight_type: str  # "int8" | "uint8"
    reason: str
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        return {
            "reduce_range": self.reduce_range,
            "activation_type": self.activation_type,
            "weight_type": self.weight_type,
            "reason": self.reason,
            "notes": list(self.notes),
        }


_AVX2_SATURATION_REASON = (
    "no VNNI: AVX2's u8s8 path (vpmaddubsw) sums pairs of u8×s8 products into a saturating int16, "
    "so full 8-bit weights can overflow (2·255·127 = 64770 > 32767); 7-bit weights (reduce_range) "
    "cannot (2·255·64 = 32640) — on an AMD AVX2 host 8-bit weights cost ResNet-50 v1 2.85 and "
    "EfficientNet-Lite1 3.00 top-1 points in ONNX Runtime, 7-bit weights -0.69 and 0.08 (docs/placement.md)"
)


def advise_int8(cpu: CpuInfo) -> IntegerKernelAdvice:
    """Pick reduce_range and the activation/weight types for onnxruntime's integer kernels on ``cpu``.

    A pure function of ``cpu`` so it can be tested with synthetic CPUs (and ``RQ_CPU_FLAGS``).
    """
    if cpu.is_arm:
        # ARM kernels multiply s8×s8 into int32 (sdot with asimddp, or smull+sadalp widening to int16
        # without overflow, since 128·128 fits), so there is no pairwise int16 saturation to dodge.
        if cpu.has_vnni:
            reason = "ARM dot-product (asimddp/sdot) accumulates s8×s8 products in int32 without saturation"
        else:
            reason = (
                "ARM without dot-product widens s8×s8 products to int16 exactly and accumulates in int32, "
                "so full 8-bit weights are safe (but INT8 speedups will be small)"
            )
        return IntegerKernelAdvice(
            reduce_range=False, activation_type="int8", weight_type="int8", reason=reason
        )

    if cpu.is_x86:
        if cpu.has_vnni:
            reason = "VNNI accumulates u8×s8 products in int32 without saturation"
            notes: tuple[str, ...] = ()
            if cpu.has_amx_int8:
                notes = ("AMX-INT8 present: u8s8 tiles also accumulate in int32",)
            return IntegerKernelAdvice(
                reduce_range=False, activation_type="uint8", weight_type="int8", reason=reason, notes=notes
            )
        notes = ()
        if cpu.flags_source == "none":
            notes = ("CPU flags unknown: assuming no VNNI (the safe side)",)
        return IntegerKernelAdvice(
            reduce_range=True,
            activation_type="uint8",
            weight_type="int8",
            reason=_AVX2_SATURATION_REASON,
            notes=notes,
        )

    # Unknown architecture: we cannot tell which kernel runs, so take the setting that cannot overflow.
    return IntegerKernelAdvice(
        reduce_range=True,
        activation_type="uint8",
        weight_type="int8",
        reason=(
            f"unknown architecture {cpu.arch!r}: 7-bit weights (reduce_range) are safe with any u8s8 kernel"
        ),
    )


#: The start of the no-VNNI note, shared with the report's CPU line (quantize/report/blocks.py).
NO_VNNI_GAINS = "INT8 gains are smaller on CPUs without VNNI"


def int8_speedup_note(cpu: CpuInfo) -> str | None:
    """A one-line expectation for INT8-vs-FP32 speed on ``cpu`` (shown under benchmark tables)."""
    if cpu.is_arm:
        if cpu.has_vnni:
            return None
        return (
            "INT8 gains are small on ARM CPUs without the dot-product extension (asimddp): products are "
            "widened to int16 and pairwise-accumulated, only about as many MACs per instruction as FP32 FMA"
        )
    if not cpu.has_vnni:
        # No bound is quoted: an instruction count (4/3 of FP32) is not one. On an AVX2 AMD EPYC (Zen 3) whole
        # ResNet-50-sized models measured 1.9-2.2x FP32 (docs/placement.md), against 3-3.8x on a VNNI one.
        return (
            f"{NO_VNNI_GAINS}: each u8×s8 multiply-accumulate step takes three "
            "instructions (vpmaddubsw, vpmaddwd, vpaddd) where VNNI takes one (vpdpbusd), and vpmaddubsw's "
            "int16 sums are why rq uses 7-bit weights here"
        )
    if cpu.has_amx_int8:
        return (
            "AMX-INT8 + VNNI present: onnxruntime can run u8s8 GEMMs on AMX tiles; large INT8 speedups "
            "are possible, mostly at larger batch sizes"
        )
    return (
        "VNNI present (vpdpbusd fuses the u8×s8 multiply-accumulate into one instruction): INT8 peak is "
        "up to 4× FP32; measured model speedups are lower (memory traffic, quantize/dequantize overhead)"
    )
