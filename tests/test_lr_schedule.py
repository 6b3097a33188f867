"""The learner's lr multiplier: RL keeps the reference's constant lr; the warm start warms up and decays."""

import math

import pytest

from common.config import LearnerConfig
from learner.engine import lr_factor


def test_constant_schedule_is_flat_after_warmup():
    cfg = LearnerConfig(lr_warmup_steps=4)
    assert [lr_factor(cfg, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(LearnerConfig(), 0) == 1.0  # the RL default: no warm-up at all


def test_cosine_warms_up_then_decays_to_the_floor():
    cfg = LearnerConfig(lr_schedule="cosine", lr_warmup_steps=10, lr_total_steps=110, lr_min_ratio=0.1)
    assert lr_factor(cfg, 0) == pytest.approx(0.1)
    assert lr_factor(cfg, 9) == 1.0 and lr_factor(cfg, 10) == 1.0
    assert lr_factor(cfg, 60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert lr_factor(cfg, 110) == pytest.approx(0.1) and lr_factor(cfg, 500) == pytest.approx(0.1)
    factors = [lr_factor(cfg, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))
    assert not any(math.isnan(f) for f in factors)


def test_cosine_without_an_end_step_is_a_config_error():
    with pytest.raises(ValueError, match="lr_total_steps"):
        LearnerConfig(lr_schedule="cosine")
