"""CPU detection and INT8 kernel advice, on synthetic /proc/cpuinfo texts (never the host's CPU)."""

from __future__ import annotations

import pytest

from quantize.measure.cpu import (
    ENV_FLAGS,
    CpuInfo,
    IntegerKernelAdvice,
    advise_int8,
    detect_cpu,
    int8_speedup_note,
    physical_core_count,
)


def _x86_block(proc: int, core: int, model: str, vendor: str, flags: str, cores: int) -> str:
    return (
        f"processor\t: {proc}\n"
        f"vendor_id\t: {vendor}\n"
        "cpu family\t: 6\n"
        f"model name\t: {model}\n"
        "physical id\t: 0\n"
        f"core id\t\t: {core}\n"
        f"cpu cores\t: {cores}\n"
        f"flags\t\t: {flags}\n"
        "\n"
    )


INTEL_FLAGS = (
    "fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx fma avx2 avx512f avx512dq avx512bw avx512vl "
    "avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"
)
# 2 cores with hyper-threading: 4 logical processors, core ids 0,1,0,1.
INTEL = "".join(
    _x86_block(p, p % 2, "Intel(R) Xeon(R) Platinum 8480+", "GenuineIntel", INTEL_FLAGS, 2) for p in range(4)
)
AMD_FLAGS = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx fma avx2 bmi2 sha_ni"
AMD = "".join(_x86_block(p, p, "AMD EPYC 7B12", "AuthenticAMD", AMD_FLAGS, 2) for p in range(2))
ARM = "".join(
    f"processor\t: {p}\n"
    "BogoMIPS\t: 243.75\n"
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
    "lrcpc dcpop asimddp ssbs\n"
    "CPU implementer\t: 0x41\n"
    "CPU architecture: 8\n"
    "CPU variant\t: 0x3\n"
    "CPU part\t: 0xd0c\n"
    "CPU revision\t: 1\n"
    "\n"
    for p in range(4)
)
ARM_NO_DOT = ARM.replace(" asimddp", "")


@pytest.fixture(autouse=True)
def _no_env_flags(monkeypatch):
    monkeypatch.delenv(ENV_FLAGS, raising=False)


def test_intel_with_vnni_and_amx():
    cpu = detect_cpu(INTEL)
    assert cpu.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu.vendor == "GenuineIntel"
    assert cpu.arch == "x86_64"
    assert cpu.logical_cores == 4
    assert cpu.physical_cores == 2
    assert cpu.has_avx2 and cpu.has_avx512f and cpu.has_vnni and cpu.has_amx_int8
    assert cpu.isa_summary() == {
        "avx2": True,
        "avx512f": True,
        "avx512_vnni": True,
        "avx_vnni": False,
        "amx_int8": True,
        "asimddp": False,
        "vnni": True,
    }
    assert cpu.describe() == (
        "Intel(R) Xeon(R) Platinum 8480+ (x86_64, 2 cores / 4 threads): "
        "AVX2 yes, AVX-512 yes, VNNI yes (avx512_vnni), AMX yes"
    )
    assert physical_core_count(cpu) == 2


def test_amd_avx2_only():
    cpu = detect_cpu(AMD)
    assert cpu.vendor == "AuthenticAMD"
    assert cpu.logical_cores == 2 and cpu.physical_cores == 2
    assert cpu.has_avx2 and not cpu.has_avx512f and not cpu.has_vnni and not cpu.has_amx_int8
    assert cpu.describe() == "AMD EPYC 7B12 (x86_64, 2 cores): AVX2 yes, AVX-512 no, VNNI no, AMX no"


def test_aarch64_features_with_dot_product():
    cpu = detect_cpu(ARM)
    assert cpu.arch == "aarch64"
    assert cpu.vendor == "ARM"
    assert cpu.model == "ARM Neoverse-N1"
    assert cpu.logical_cores == 4
    assert "asimddp" in cpu.flags and cpu.has_vnni
    assert not cpu.has_avx2
    assert cpu.isa_summary()["vnni"] is True
    assert (
        cpu.describe() == "ARM Neoverse-N1 (aarch64, 4 cores): NEON yes, dot-product yes (asimddp), i8mm no"
    )


def test_avx_vnni_counts_as_vnni():
    cpu = detect_cpu(AMD.replace("avx2", "avx2 avx_vnni"))
    assert cpu.has_vnni and cpu.isa_summary()["avx_vnni"] and not cpu.isa_summary()["avx512_vnni"]
    assert "VNNI yes (avx_vnni)" in cpu.describe()


def test_env_override_replaces_flags(monkeypatch):
    monkeypatch.setenv(ENV_FLAGS, "AVX2, fma")
    cpu = detect_cpu(INTEL)
    assert cpu.flags == frozenset({"avx2", "fma"})
    assert cpu.flags_source == "env"
    assert not cpu.has_vnni and not cpu.has_avx512f
    assert cpu.model == "Intel(R) Xeon(R) Platinum 8480+"  # only the flags change
    assert ENV_FLAGS in cpu.describe()
    assert advise_int8(cpu).reduce_range is True


def test_empty_env_is_ignored(monkeypatch):
    monkeypatch.setenv(ENV_FLAGS, " ")
    assert detect_cpu(INTEL).has_vnni


def test_argument_override_beats_env(monkeypatch):
    monkeypatch.setenv(ENV_FLAGS, "avx2")
    cpu = detect_cpu(AMD, flags_override=["avx2", "avx512-vnni"])
    assert cpu.flags_source == "override"
    assert cpu.has_vnni


def test_advice_x86_without_vnni():
    advice = advise_int8(detect_cpu(AMD))
    assert isinstance(advice, IntegerKernelAdvice)
    assert advice.reduce_range is True
    assert (advice.activation_type, advice.weight_type) == ("uint8", "int8")
    assert "vpmaddubsw" in advice.reason and "int16" in advice.reason
    assert "2.85" in advice.reason and "docs/placement.md" in advice.reason


def test_advice_x86_with_vnni():
    advice = advise_int8(detect_cpu(INTEL))
    assert advice.reduce_range is False
    assert (advice.activation_type, advice.weight_type) == ("uint8", "int8")
    assert advice.reason == "VNNI accumulates u8×s8 products in int32 without saturation"


@pytest.mark.parametrize("text", [ARM, ARM_NO_DOT])
def test_advice_arm(text):
    advice = advise_int8(detect_cpu(text))
    assert advice.reduce_range is False
    assert (advice.activation_type, advice.weight_type) == ("int8", "int8")


def test_advice_from_synthetic_cpuinfo_objects():
    base = dict(model="x", vendor="v", logical_cores=1)
    assert advise_int8(CpuInfo(arch="x86_64", flags=frozenset({"avx2"}), **base)).reduce_range
    assert not advise_int8(CpuInfo(arch="AMD64", flags=frozenset({"avx512_vnni"}), **base)).reduce_range
    assert advise_int8(CpuInfo(arch="arm64", flags=frozenset(), **base)).activation_type == "int8"
    # Unknown architecture: the setting that cannot overflow.
    assert advise_int8(CpuInfo(arch="riscv64", flags=frozenset(), **base)).reduce_range


def test_speedup_note():
    note = int8_speedup_note(detect_cpu(AMD))
    assert note is not None and note.startswith("INT8 gains are smaller on CPUs without VNNI")
    vnni_note = int8_speedup_note(detect_cpu(INTEL))
    assert vnni_note is None or "without VNNI" not in vnni_note
    assert int8_speedup_note(detect_cpu(ARM)) is None


def test_to_dict_round_trip():
    cpu = detect_cpu(INTEL)
    d = cpu.to_dict()
    assert d["flags"] == sorted(cpu.flags)
    assert d["isa"]["vnni"] is True
    assert CpuInfo.from_dict(d) == cpu


def test_host_detection_smoke():
    cpu = detect_cpu()
    assert cpu.logical_cores >= 1
    assert cpu.describe().count("\n") == 0
    assert physical_core_count(cpu) >= 1
