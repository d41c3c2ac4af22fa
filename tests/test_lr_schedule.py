"""The transformer's learning-rate schedule (``transformer.lr_schedule``): its shape, and that fit follows it."""
from __future__ import annotations

import math

import pytest

from conftest import FIT_KW, tiny_config


def test_constant_and_cosine_factors():
    from ipd_agent.transformer import lr_lambda

    const = lr_lambda(10)
    assert const(0) == pytest.approx(0.1) and const(9) == 1.0 and const(10_000) == 1.0
    cos = lr_lambda(10, "cosine", 110)
    assert [cos(k) for k in range(10)] == [const(k) for k in range(10)]  # the same linear warm-up
    after = [cos(k) for k in range(10, 110)]
    assert all(a >= b for a, b in zip(after, after[1:]))  # never rises after the warm-up
    assert cos(10) > 0.999 and cos(59) == pytest.approx(0.5 * (1 + math.cos(math.pi * 50 / 101)))
    assert 0.0 < cos(109) < 1e-3  # the last step still moves, a little
    assert cos(110) == 0.0 and cos(500) == 0.0
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_lambda(10, "linear", 100)


def test_unknown_schedule_is_rejected_at_config_time():
    with pytest.raises(ValueError, match="lr_schedule"):
        tiny_config(transformer={"lr_schedule": "step"})


def test_fit_follows_the_cosine_schedule_to_near_zero(loaded_copy, hopper_traj):
    algo = loaded_copy
    algo.config.transformer.lr_schedule = "cosine"
    algo.config.transformer.warmup_steps = 5
    algo.config.transformer.n_steps = 30
    peak = algo.config.transformer.learning_rate
    rates = []
    algo.fit(hopper_traj, n_steps=30, callback=lambda m, e, s: rates.append(m._optim.param_groups[0]["lr"]),
             **FIT_KW)
    assert len(rates) == 30
    assert max(rates) == pytest.approx(peak, rel=1e-2)  # reached right after the warm-up
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))
    assert rates[-1] < 1e-3 * peak


def test_steps_past_the_cosine_end_are_refused_before_training(loaded_copy, hopper_traj):
    algo = loaded_copy
    algo.config.transformer.lr_schedule = "cosine"
    algo.config.transformer.n_steps = 20
    before = int(algo.impl.stages.transformer_steps)
    with pytest.raises(ValueError, match=r"transformer.n_steps=20.*step 21"):
        algo.fit(hopper_traj, n_steps=21, **FIT_KW)
    assert int(algo.impl.stages.transformer_steps) == before  # refused before any step
    algo.fit(hopper_traj, n_steps=12, **FIT_KW)
    with pytest.raises(ValueError, match="step 24"):  # a continued fit goes on along the same schedule
        algo.fit(hopper_traj, n_steps=12, **FIT_KW)
