"""``transformer.n_members``: separately seeded stage-6 policies trained by ``fit`` and deployed together, the executed
action being the element-wise median of the members' actions."""
from __future__ import annotations

import io

import d3rlpy
import gymnasium as gym
import numpy as np
import pytest
import torch

from ipd_agent import IPDConfig, load_ipd

from conftest import FIT_KW, acts_alike, tiny_config
from test_bench import _benchmark_script


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def seeded_members(fitted):
    """benchmarks/seed_ensemble.py's members 1 and 2 of ``fitted`` (the script behind the runs of record)."""
    mod = _benchmark_script("seed_ensemble")
    return mod, [mod.train_member(fitted.algo, m, fitted.algo.config.transformer.n_steps)[0] for m in (1, 2)]


def test_members_are_stage_six_reseeded_as_the_benchmark_trained_them(members3, fitted, seeded_members):
    """Member 0 is the single policy ``fit`` returns without members; member m is stage 6 alone trained afresh under
    seed + 1000 m on the same value function, world model and augmented data: exactly seed_ensemble.py's member m."""
    algo, single = members3.algo, fitted.algo
    assert algo.impl.n_members == 3 and single.impl.n_members == 1
    for name in ("value", "world_model"):
        assert _same(getattr(algo.impl, name), getattr(single.impl, name))
    np.testing.assert_array_equal(algo.augmentation.trajectories.actions, single.augmentation.trajectories.actions)
    net0, token0, _ = algo.impl.member(0)
    assert _same(net0, single.impl.transformer) and _same(token0, single.impl.token)
    mod, members = seeded_members
    assert mod.SEED_STRIDE == 1000
    for m, reference in zip((1, 2), members):
        net, token, flags = algo.impl.member(m)
        assert _same(net, reference.impl.transformer) and _same(token, reference.impl.token)
        assert flags.is_done("transformer") and int(flags.transformer_steps) == algo.config.transformer.n_steps
        assert not _same(net, net0)  # a member is not a copy of member 0


def test_the_deployed_median_is_the_benchmarks_median_of_separate_models(members3, fitted, seeded_members):
    """The stateful policy of one model with three members acts, step for step on a real Hopper-v5 episode, exactly as
    seed_ensemble.py's median over three separate models (each context holding the executed action), and differs
    from member 0 alone; batch ``predict`` is the element-wise median of the members' own ``predict``."""
    from ipd_agent.policy import TransformerContext

    mod, members = seeded_members
    models = [fitted.algo, *members]
    together = mod.MedianOfPolicies(contexts=[TransformerContext(a, 1) for a in models])
    env = gym.make("Hopper-v5", max_episode_steps=60)
    acts_alike(together, members3.algo.as_stateful_wrapper(), env, seed=1)
    alone, ensemble = fitted.algo.as_stateful_wrapper(), members3.algo.as_stateful_wrapper()
    o, _ = env.reset(seed=1)
    assert not np.array_equal(alone.predict(o, 0.0), ensemble.predict(o, 0.0))
    obs = fitted.traj.observations[::25]
    singles = np.stack([a.predict(obs) for a in models])
    np.testing.assert_array_equal(members3.algo.predict(obs), np.median(singles, axis=0).astype(np.float32))


def test_members_survive_save_and_load(members3):
    loaded = load_ipd(members3.path)
    assert loaded.config.transformer.n_members == 3 and loaded.impl.n_members == 3
    for m in range(3):
        assert all(_same(a, b) for a, b in zip(loaded.impl.member(m), members3.algo.impl.member(m)))
    obs = members3.traj.observations[::25]
    np.testing.assert_array_equal(loaded.predict(obs), members3.algo.predict(obs))


def test_models_saved_before_members_existed_load_as_one_policy(fitted):
    buf = io.BytesIO()
    fitted.algo.impl.save_model(buf)
    chkpt = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    del chkpt["members"]
    old = io.BytesIO()
    torch.save(chkpt, old)
    algo = load_ipd(fitted.path)
    algo.impl.load_model(io.BytesIO(old.getvalue()))
    obs = fitted.traj.observations[::25]
    np.testing.assert_array_equal(algo.predict(obs), fitted.algo.predict(obs))


def test_fit_trains_the_members_in_turn_and_evaluates_each_as_it_trains(hopper_traj):
    """With ``eval_env`` each member is evaluated (alone) at its epochs' ends; member 1 trains after member 0."""
    tiny = tiny_config().transformer.to_dict()
    algo = tiny_config(transformer={**tiny, "n_steps": 4, "n_members": 2}).create(device="cpu:0")
    seen = []
    algo.fit(hopper_traj, n_steps_per_epoch=4, eval_env=gym.make("Hopper-v5", max_episode_steps=10), eval_episodes=1,
             show_progress=False, with_timestamp=False, logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
             callback=lambda a, epoch, step: seen.append(step))
    assert seen == [1, 2, 3, 4, 1, 2, 3, 4]  # member 0's steps, then member 1's
    assert all(bool(algo.impl.member(m)[2].is_done("transformer")) for m in (0, 1))


def test_the_harness_learning_curve_neither_changes_training_nor_mixes_members(hopper_traj, members3, fitted):
    """The harness's curve evaluates member 0 alone while it trains (members 1.. count their steps afresh) and leaves
    every member's training as it is without the curve; a callback that makes a policy (eval mode) outside
    ``deployed_weights`` does not end dropout for the rest of training either."""
    from ipd_agent.bench import LearningCurve, load_profile

    tiny = tiny_config().transformer.to_dict()
    d3rlpy.seed(0)
    algo = tiny_config(transformer={**tiny, "n_members": 2}).create(device="cpu:0")
    curve = LearningCurve(load_profile("tiny"), tiny["n_steps"], "Hopper-v5", 0, (0.0, 1000.0))
    algo.fit(hopper_traj, callback=curve, **FIT_KW)
    assert [p["step"] for p in curve.points] == sorted(curve.marks)  # member 0's marks, once each
    for m in (0, 1):
        assert _same(algo.impl.member(m)[0], members3.algo.impl.member(m)[0])
    d3rlpy.seed(0)
    single = tiny_config().create(device="cpu:0")
    single.fit(hopper_traj, callback=lambda a, epoch, step: a.as_stateful_wrapper() if step == 10 else None, **FIT_KW)
    assert _same(single.impl.transformer, fitted.algo.impl.transformer)


def test_deploying_members_the_model_lacks_is_refused(members3):
    with pytest.raises(ValueError, match="members 0..2"):
        members3.algo.as_stateful_wrapper(members=[3])
    with pytest.raises(ValueError, match="non-empty"):
        members3.algo.as_stateful_wrapper(members=[])


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_a_bad_member_count_is_refused_when_the_config_is_made(bad):
    tiny = tiny_config().transformer.to_dict()
    with pytest.raises(ValueError, match="n_members"):
        IPDConfig(transformer={**tiny, "n_members": bad})
