"""MPPI planning inside a fitted world model, with a real (briefly trained) d3rlpy IQL value function."""
from __future__ import annotations

import copy
import dataclasses

import d3rlpy
import numpy as np
import pytest
import torch

from ipd_agent import Trajectories
from ipd_agent.augment import augment
from ipd_agent.config import AugmentConfig, PlannerConfig, ValueConfig, WorldModelConfig
from ipd_agent.planner import MPCPlanner
from ipd_agent.value import ValueFunctions, fit_value_functions, make_iql
from ipd_agent.world_model import WorldModel, fit_world_model

from conftest import NOOP

OD, AD = 3, 2
GAMMA = 0.99
_rng = np.random.default_rng(10)
A_MAT = _rng.normal(size=(OD, OD)) * 0.5
B_MAT = _rng.normal(size=(OD, AD))


def dynamics(s, a):
    """A bounded system whose reward prefers a large first action component: r = a_0 − 0.1·|s|²."""
    s2 = np.clip(s + 0.1 * np.tanh(s @ A_MAT.T + a @ B_MAT.T), -1, 1).astype(np.float32)
    r = (a[..., 0] - 0.1 * (s ** 2).sum(-1)).astype(np.float32)
    return s2, r


def make_traj(n_episodes=100, length=50, seed=0) -> Trajectories:
    rng = np.random.default_rng(seed)
    eps = []
    for _ in range(n_episodes):
        s = rng.uniform(-0.5, 0.5, (1, OD)).astype(np.float32)
        obs, act, rew = [s[0]], [], []
        for _ in range(length):
            a = rng.uniform(-1, 1, (1, AD)).astype(np.float32)
            s, r = dynamics(s, a)
            obs.append(s[0]), act.append(a[0]), rew.append(r[0])
        eps.append({"observations": np.asarray(obs), "actions": np.asarray(act), "rewards": np.asarray(rew),
                    "terminated": False})
    return Trajectories.from_episodes(eps)


@pytest.fixture(scope="module")
def system():
    traj = make_traj()
    torch.manual_seed(0)
    wm = WorldModel(OD, AD, WorldModelConfig(n_members=5, n_elites=3, hidden_size=64, n_layers=2, max_steps=1000,
                                             eval_every=250, threshold_samples=5000))
    fit_world_model(wm, traj.observations, traj.actions, traj.rewards, traj.next_observations, traj.terminals,
                    seed=0, show_progress=False)
    vcfg = ValueConfig(n_steps=300, hidden_units=(32, 32))
    d3rlpy.seed(0)
    iql = make_iql(vcfg, "cpu:0")
    fit_value_functions(iql, traj.to_d3rlpy(), vcfg, NOOP, False, "planner_test_iql")
    value = ValueFunctions(iql)
    value.set_reward_scale(iql.config.reward_scaler)
    value.freeze()
    return traj, wm, value, iql


def _starts(traj, n=64):
    return torch.from_numpy(np.ascontiguousarray(traj.observations[::37][:n]))


def test_mpc_plan_never_scores_below_its_warm_start(system):
    traj, wm, value, _ = system
    planner = MPCPlanner(wm, value, PlannerConfig(n_samples=64, n_iterations=3), GAMMA)
    obs = _starts(traj)
    a, info = planner.plan(obs, generator=torch.Generator().manual_seed(0), return_info=True)
    assert a.shape == (len(obs), AD) and torch.all(a.abs() <= 1.0)
    score, warm = info["score"], info["warm_score"]
    assert torch.all(score >= warm), (score - warm).min()
    assert (score - warm).mean() > 0.1  # strictly better on average
    # the reward pays for a_0: the plan pushes it up from the IQL warm start
    warm_a = planner.warm_start(obs)[:, 0]
    assert a[:, 0].mean() > warm_a[:, 0].mean() + 0.1
    # reported numbers are what the planner's own scoring gives for those sequences
    torch.testing.assert_close(planner.score(obs, info["plan"][:, None])[:, 0], score)
    torch.testing.assert_close(planner.score(obs, planner.warm_start(obs)[:, None])[:, 0], warm)
    torch.testing.assert_close(info["plan"][:, 0], a)


def test_plan_is_reproducible_with_a_seeded_generator(system):
    traj, wm, value, _ = system
    planner = MPCPlanner(wm, value, PlannerConfig(n_samples=16, n_iterations=2), GAMMA)
    obs = _starts(traj, 16)
    a1 = planner.plan(obs, generator=torch.Generator().manual_seed(3))
    a2 = planner.plan(obs, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a1, a2)


def test_mean_execution_keeps_the_warm_start_guard_and_clips_less_than_the_best_candidate(system):
    traj, wm, value, _ = system
    obs = _starts(traj)
    plans = {}
    for execute in ("best", "mean"):
        planner = MPCPlanner(wm, value, PlannerConfig(n_samples=64, n_iterations=3, execute=execute), GAMMA)
        a, info = planner.plan(obs, generator=torch.Generator().manual_seed(0), return_info=True)
        assert torch.all(info["score"] >= info["warm_score"]), execute
        torch.testing.assert_close(info["plan"][:, 0], a)
        torch.testing.assert_close(planner.score(obs, info["plan"][:, None])[:, 0], info["score"])
        plans[execute] = info
    # same seed, same candidates: the weighted mean is not one of them, and averages out clipped noise
    assert not torch.equal(plans["mean"]["plan"], plans["best"]["plan"])
    at_bound = {k: float((v["plan"].abs() > 0.999).float().mean()) for k, v in plans.items()}
    assert at_bound["mean"] < at_bound["best"], at_bound
    # the mean still improves on the IQL warm start on average (the reward pays for a_0)
    assert (plans["mean"]["score"] - plans["mean"]["warm_score"]).mean() > 0.05


def test_greedy_planner_executes_the_iql_policy(system):
    traj, wm, value, _ = system
    planner = MPCPlanner(wm, value, PlannerConfig(greedy=True), GAMMA)
    obs = _starts(traj, 16)
    torch.testing.assert_close(planner.plan(obs), value.act(obs).clamp(-1, 1))


def _naive_score(wm, value, obs, acts, gamma):
    """DESIGN §2.4 candidate score, one candidate at a time."""
    kappa = float(wm.threshold)
    out = np.zeros(acts.shape[:2])
    cuts = 0
    with torch.no_grad():
        for b in range(acts.shape[0]):
            for n in range(acts.shape[1]):
                s, ret, alive = obs[b:b + 1], 0.0, True
                for h in range(acts.shape[2]):
                    a = acts[b, n, h][None]
                    mean, logvar, term = wm.predict_elites(s, a)
                    if float(wm.uncertainty_from(mean, logvar)) > kappa:  # cut: bootstrap where it got to
                        ret += gamma ** h * float(value.v(s))
                        alive, cuts = False, cuts + 1
                        break
                    s, r = wm.denormalise(mean.mean(0), s)
                    ret += gamma ** h * float(r)
                    if float(term.mean(0)) > 0.0:  # predicted terminal: no bootstrap
                        alive = False
                        break
                if alive:
                    ret += gamma ** acts.shape[2] * float(value.v(s))
                out[b, n] = ret
    return out, cuts


def test_candidate_score_matches_a_naive_rollout(system):
    traj, wm, value, _ = system
    wm = copy.deepcopy(wm)
    wm.cfg = dataclasses.replace(wm.cfg, threshold_quantile=0.6)  # make cuts happen
    wm.calibrate_threshold(torch.from_numpy(traj.observations), torch.from_numpy(traj.actions))
    planner = MPCPlanner(wm, value, PlannerConfig(horizon=5), GAMMA)
    obs = _starts(traj, 8)
    acts = (torch.rand(8, 6, 5, AD, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    acts[:, 0] = 1.0  # push some candidates towards the edge of the data
    got = planner.score(obs, acts).numpy()
    naive, cuts = _naive_score(wm, value, obs, acts, GAMMA)
    assert 0 < cuts < acts.shape[0] * acts.shape[1]  # both cut and uncut candidates are compared
    np.testing.assert_allclose(got, naive, rtol=1e-4, atol=1e-4)


def test_augmentation_never_keeps_an_untrusted_imagined_step(system):
    traj, wm, value, _ = system
    wm = copy.deepcopy(wm)
    wm.cfg = dataclasses.replace(wm.cfg, threshold_quantile=0.5)  # a tight κ so the limit really binds
    kappa = wm.calibrate_threshold(torch.from_numpy(traj.observations), torch.from_numpy(traj.actions))
    planner = MPCPlanner(wm, value, PlannerConfig(n_samples=16, n_iterations=2), GAMMA)
    res = augment(traj, wm, value, planner, AugmentConfig(n_branches=64, segment_length=10), GAMMA, seed=0,
                  show_progress=False)
    s = res.summary()
    assert res.threshold == pytest.approx(kappa)
    assert s["stopped_uncertainty"] > 0, "the tight threshold should stop some rollouts"
    assert s["n_accepted"] > 0 and s["imagined_transitions"] > 0
    im = res.imagined_transitions()
    u = wm.uncertainty(torch.from_numpy(im["observations"]), torch.from_numpy(im["actions"])).numpy()
    assert np.all(u <= kappa * (1 + 1e-5) + 1e-6), (u.max(), kappa)
    assert np.all(res.uncertainties <= kappa * (1 + 1e-5) + 1e-6)
    assert len(res.uncertainties) == int(res.rollout_lengths.sum())
    # imagined steps chain: each step starts where the previous one ended
    t = res.trajectories
    rows = np.flatnonzero(t.imagined[:-1] & t.imagined[1:] & (t.episode_ids[:-1] == t.episode_ids[1:]))
    np.testing.assert_array_equal(t.observations[rows + 1], t.next_observations[rows])


def test_value_functions_wrap_iql_in_unscaled_units(system):
    traj, _, value, iql = system
    obs = torch.from_numpy(traj.observations[:32])
    act = torch.from_numpy(traj.actions[:32])
    scaler = iql.config.reward_scaler
    scale = scaler.multiplier / (scaler.return_max - scaler.return_min)
    mods = iql.impl.modules
    with torch.no_grad():
        torch.testing.assert_close(value.v(obs), mods.value_func(obs).reshape(-1) / scale)
        q = torch.minimum(mods.q_funcs[0](obs, act).q_value, mods.q_funcs[1](obs, act).q_value).reshape(-1)
        torch.testing.assert_close(value.q(obs, act), q / scale)
    assert not any(p.requires_grad for p in value.parameters())
    # Q is differentiable in the action (needed by the value-guided loss)
    a = act.clone().requires_grad_(True)
    value.q(obs, a).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    # batched leading dimensions are kept
    assert value.v(obs.reshape(4, 8, OD)).shape == (4, 8)
    assert value.q(obs.reshape(4, 8, OD), act.reshape(4, 8, AD)).shape == (4, 8)
    assert value.act(obs).shape == (32, AD) and torch.all(value.act(obs).abs() <= 1.0)
