"""`auto` dtypes follow what the processor computes fast (common.hardware)."""

import torch

from common.hardware import cpu_flags, cpu_has_fast_bf16, resolve_engine_dtype
from learner import engine

ZEN3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n"
SAPPHIRE = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile\n"
# The Intel Xeon KVM guest measured in common.hardware: avx512_bf16 without AMX, bf16 no faster.
XEON_NO_AMX = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: avx2 fma avx512f avx512_bf16 avx512_fp16\n"
EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: avx2 fma avx512f avx512_bf16\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd bf16 sve\n"


def test_flags_are_read_from_cpuinfo():
    assert {"avx2", "fma"} <= cpu_flags(ZEN3)
    assert cpu_flags("") == set()


def test_bf16_is_fast_with_amx_or_on_amds_avx512_bf16_only():
    assert cpu_has_fast_bf16(SAPPHIRE) and cpu_has_fast_bf16(EPYC)
    assert not cpu_has_fast_bf16(ZEN3)  # emulated: 4.3x slower
    assert not cpu_has_fast_bf16(XEON_NO_AMX)  # the instructions, but no faster than fp32
    assert not cpu_has_fast_bf16(GRAVITON)  # no x86 bf16 flag: fp32, never a silent emulation
    assert not cpu_has_fast_bf16("")


def test_engine_dtype_auto_is_fp32_without_fast_bf16():
    assert resolve_engine_dtype("auto", cuda=False, cpuinfo=ZEN3) == "float32"
    assert resolve_engine_dtype("auto", cuda=False, cpuinfo=XEON_NO_AMX) == "float32"
    assert resolve_engine_dtype("auto", cuda=False, cpuinfo=EPYC) == "auto"
    assert resolve_engine_dtype("auto", cuda=False, cpuinfo=SAPPHIRE) == "auto"  # the checkpoint's (bf16)
    assert resolve_engine_dtype("auto", cuda=True, cpuinfo=ZEN3) == "auto"
    assert resolve_engine_dtype("bfloat16", cuda=False, cpuinfo=ZEN3) == "bfloat16"  # asked for: kept


def test_learner_bf16_auto_follows_the_same_flags(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cpuinfo, want in ((ZEN3, False), (XEON_NO_AMX, False), (SAPPHIRE, True), (EPYC, True)):
        monkeypatch.setattr(engine, "cpu_has_fast_bf16", lambda c=cpuinfo: cpu_has_fast_bf16(c))
        assert engine.resolve_bf16("auto") is want
    assert engine.resolve_bf16("on") and not engine.resolve_bf16("off")


def test_the_default_lr_follows_the_learners_precision():
    from common.config import LearnerConfig

    # bf16 weights round most small updates away; fp32 takes them all (learner.lr's comment).
    assert LearnerConfig().resolved_lr(bf16=True) == 3e-5
    assert LearnerConfig().resolved_lr(bf16=False) == 2e-5
    assert LearnerConfig(lr=2e-6).resolved_lr(bf16=False) == 2e-6  # set: kept whatever the precision


def test_an_engine_built_with_auto_computes_in_the_fast_dtype(monkeypatch):
    import common.hardware as hw
    from actors.engines.factory import make_engine
    from actors.engines.models import resolve_model

    model = resolve_model("tiny")  # a bf16 checkpoint
    for cpuinfo, want in ((ZEN3, torch.float32), (XEON_NO_AMX, torch.float32), (EPYC, torch.bfloat16)):
        monkeypatch.setattr(hw, "_cpuinfo", lambda given, info=cpuinfo: info if given is None else given)
        built = make_engine(model, engine="transformers", dtype="auto")
        assert built.model.dtype == want
