"""Determinism, numerical guards and bounded memory in long deployments."""
from __future__ import annotations

import gc
import os

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import FIT_KW, tiny_config


def _fit(traj, seed):
    algo = tiny_config(seed=seed).create(device="cpu:0")
    algo.fit(traj, **FIT_KW)
    return algo


def test_same_seed_same_augmented_arrays_and_actions_different_seed_differs(hopper_traj, fitted):
    again = _fit(hopper_traj, 0)
    a, b = fitted.algo.augmentation.trajectories, again.augmentation.trajectories
    for name in ("observations", "actions", "rewards", "next_observations", "terminals", "imagined", "branch_ids"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name  # byte-identical
    obs = hopper_traj.observations[:16]
    assert np.array_equal(fitted.algo.predict(obs), again.predict(obs))
    other = _fit(hopper_traj, 1)
    assert not np.array_equal(fitted.algo.predict(obs), other.predict(obs))
    assert (other.augmentation.branch_rows.tobytes() != fitted.algo.augmentation.branch_rows.tobytes()
            or other.augmentation.trajectories.observations.tobytes() != a.observations.tobytes())


def test_nan_loss_stops_the_world_model_with_stage_and_step_and_keeps_last_good_weights(hopper_traj):
    from ipd_agent.config import WorldModelConfig
    from ipd_agent.world_model import WorldModel, fit_world_model

    wm = WorldModel(hopper_traj.observation_dim, hopper_traj.action_dim,
                    WorldModelConfig(max_steps=200, eval_every=10, hidden_size=16, n_layers=1, learning_rate=1e30))
    rew = hopper_traj.rewards  # an absurd learning rate makes the loss overflow within a few steps
    with pytest.raises(FloatingPointError, match=r"world model loss became .* at step \d+"):
        fit_world_model(wm, hopper_traj.observations, hopper_traj.actions, rew, hopper_traj.next_observations,
                        hopper_traj.terminals, show_progress=False)
    assert all(torch.isfinite(p).all() for p in wm.parameters())


def test_world_model_log_variance_stays_inside_its_bounds(fitted):
    wm = fitted.algo.impl.world_model
    o = torch.from_numpy(fitted.traj.observations[:256]) * 50.0  # far off the data
    a = torch.from_numpy(fitted.traj.actions[:256])
    with torch.no_grad():
        _, logvar, _ = wm.predict_elites(o, a)
    assert torch.all(logvar <= wm.max_logvar + 1e-4) and torch.all(logvar >= wm.min_logvar - 1e-4)  # float32 rounding


def _rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def test_two_hundred_episodes_through_the_stateful_policy_do_not_grow_memory(fitted):
    env = gym.make("Hopper-v5", max_episode_steps=25)
    policy = fitted.algo.as_policy(env.action_space)

    def run(n):
        for ep in range(n):
            obs, _ = env.reset(seed=ep)
            start, done = True, False
            while not done:
                a, _ = policy.predict(obs, episode_start=start)
                obs, _, te, tr, _ = env.step(a)
                start, done = False, te or tr

    run(20)  # warm up allocator caches
    gc.collect()
    before = _rss_mib()
    run(200)
    gc.collect()
    assert _rss_mib() - before < 20.0  # MiB; a leaked context per episode would grow without bound


AUG_MEMORY_CHILD = """
import os, resource, sys, numpy as np, torch
torch.set_num_threads(1)
os.environ["MINARI_DATASETS_PATH"] = {root!r}
from ipd_agent import IPDConfig, load_minari
traj, _ = load_minari("d4rlstyle/halfcheetah/full-replay-v0")   # the largest shared dataset: 300k transitions
algo = IPDConfig(world_model={{"hidden_size": 200}}, augment={{"n_branches": 512, "chunk_size": 256}},
                 planner={{"n_samples": 16, "n_iterations": 1}}).create("cpu:0")
algo.create_impl((traj.observation_dim,), traj.action_dim)
impl = algo.impl
# untrained networks cost the same memory as trained ones; mark stages 1-2 done and calibrate kappa on real pairs
o, a = torch.from_numpy(traj.observations[:5000]), torch.from_numpy(traj.actions[:5000])
impl.world_model.calibrate_threshold(o, a)
impl.stages.mark("value"); impl.stages.mark("world_model")
res = algo.augment(traj, show_progress=False)
print("PEAK_RSS_MIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, res.summary()["n_branches"])
"""


def test_augmentation_over_the_largest_shared_dataset_stays_under_4_gib(shared_datasets):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", AUG_MEMORY_CHILD.format(root=str(shared_datasets))],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("PEAK_RSS_MIB")][0]
    peak, n_branches = float(line.split()[1]), int(line.split()[2])
    print(f"augmentation peak RSS over 300k transitions: {peak:.0f} MiB")
    assert n_branches == 512 and peak < 4096
