"""Make D4RL-protocol datasets: train a Stable-Baselines3 SAC agent, keep its replay buffer, write Minari.

One SAC run gives three datasets, as D4RL does:
* ``medium-replay`` — every transition up to the "medium" checkpoint;
* ``full-replay`` — the whole replay buffer;
* ``medium`` — fresh rollouts of the medium checkpoint's stochastic policy.

Actions are rescaled to [-1, 1] (``RescaleAction``) when the task's bounds differ, and the wrapper is
recorded in the Minari env spec so ``dataset.recover_environment()`` rebuilds the same env.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Optional

import numpy as np

__all__ = ["make_env", "make_d4rl_datasets", "D4RL_REFERENCE"]

# D4RL's reference returns (random, expert) where they exist; other tasks measure their own
D4RL_REFERENCE = {
    "Hopper": (-20.272305, 3234.3),
    "HalfCheetah": (-280.178953, 12135.0),
    "Walker2d": (1.629008, 4592.3),
    "InvertedPendulum": (0.0, 1000.0),  # returns count balanced steps; 1000 is the time limit
}


def make_env(env_id: str, **kwargs: Any):
    """``gym.make`` plus ``RescaleAction`` to [-1, 1] when needed (IPD's policy is tanh-bounded)."""
    import gymnasium as gym

    env = gym.make(env_id, **kwargs)
    box = env.action_space
    if isinstance(box, gym.spaces.Box) and (np.any(box.low != -1.0) or np.any(box.high != 1.0)):
        env = gym.wrappers.RescaleAction(env, -1.0, 1.0)
    return env


def _episodes_from_buffer(buf, n: int) -> list[dict]:
    """Splits the first ``n`` SB3 replay-buffer rows into Minari-style episodes (T+1 observations)."""
    obs = buf.observations[:n, 0].astype(np.float32)
    nxt = buf.next_observations[:n, 0].astype(np.float32)
    act = buf.actions[:n, 0].astype(np.float32)
    rew = buf.rewards[:n, 0].astype(np.float64)
    done = buf.dones[:n, 0].astype(bool)
    timeout = buf.timeouts[:n, 0].astype(bool)
    ends = np.flatnonzero(done)
    if len(ends) == 0 or ends[-1] != n - 1:
        ends = np.append(ends, n - 1)  # the cut at the end of the buffer is a truncation
    eps, start = [], 0
    for e in ends:
        sl = slice(start, e + 1)
        term = np.zeros(e + 1 - start, bool)
        term[-1] = bool(done[e] and not timeout[e])
        trunc = np.zeros_like(term)
        trunc[-1] = not term[-1]
        eps.append({"observations": np.concatenate([obs[sl], nxt[e:e + 1]]), "actions": act[sl], "rewards": rew[sl],
                    "terminations": term, "truncations": trunc})
        start = e + 1
    return eps


def _rollouts(policy, env, n_steps: int, seed: int, deterministic: bool = False) -> list[dict]:
    eps, total, k = [], 0, 0
    while total < n_steps:
        o, _ = env.reset(seed=seed + k)
        k += 1
        obs, act, rew, term, trunc = [o], [], [], [], []
        while True:
            a, _ = policy.predict(o, deterministic=deterministic)
            o, r, te, tr, _ = env.step(a)
            obs.append(o), act.append(a), rew.append(r), term.append(te), trunc.append(tr)
            total += 1
            if total >= n_steps and not (te or tr):
                trunc[-1] = True
            if te or trunc[-1]:
                break
        eps.append({"observations": np.asarray(obs, np.float32), "actions": np.asarray(act, np.float32),
                    "rewards": np.asarray(rew, np.float64), "terminations": np.asarray(term, bool),
                    "truncations": np.asarray(trunc, bool)})
    return eps


def _mean_return(policy, env, episodes: int, seed: int, deterministic: bool = True) -> float:
    eps = _rollouts_n(policy, env, episodes, seed, deterministic)
    return float(np.mean(eps))


def _rollouts_n(policy, env, episodes: int, seed: int, deterministic: bool) -> list[float]:
    rets = []
    for k in range(episodes):
        o, _ = env.reset(seed=seed + k)
        ret, done = 0.0, False
        while not done:
            a = env.action_space.sample() if policy is None else policy.predict(o, deterministic=deterministic)[0]
            o, r, te, tr, _ = env.step(a)
            ret += float(r)
            done = te or tr
        rets.append(ret)
    return rets


def make_d4rl_datasets(env_id: str, total_steps: int, root: str, namespace: Optional[str] = None, seed: int = 0,
                       medium_fraction: float = 2 / 3, medium_size: Optional[int] = None, show_progress: bool = True,
                       sac_kwargs: Optional[dict] = None) -> dict:
    """Trains SB3 SAC for ``total_steps`` and writes ``{namespace}/{medium,medium-replay,full-replay}-v0``.

    Args:
        env_id: Gymnasium task, e.g. ``InvertedPendulum-v5`` or ``Hopper-v5``.
        total_steps: SAC environment steps (the full replay buffer).
        root: folder to write the Minari datasets into (used as MINARI_DATASETS_PATH).
        namespace: dataset namespace (default: ``ipd/<task name lower-case>``).
        seed: seed of SAC, the env and the rollouts.
        medium_fraction: the medium checkpoint is taken after this share of ``total_steps``.
        medium_size: transitions in the ``medium`` dataset (default: total_steps // 2).
        show_progress: SB3 progress bar.
        sac_kwargs: extra keyword arguments for ``stable_baselines3.SAC``.

    Returns:
        {name: {"dataset_id", "episodes", "transitions", "mean_return"}} and the reference scores.
    """
    import minari
    import torch
    from minari.data_collector.episode_buffer import EpisodeBuffer
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    torch.set_num_threads(1)
    os.makedirs(root, exist_ok=True)
    os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(root)
    task = env_id.split("-")[0]
    namespace = namespace or f"ipd/{task.lower()}"
    env = make_env(env_id)
    medium_step = int(total_steps * medium_fraction)
    medium_size = medium_size or total_steps // 2

    class Snapshot(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.medium_policy = None

        def _on_step(self) -> bool:
            if self.num_timesteps == medium_step:
                self.medium_policy = copy.deepcopy(self.model.policy)
            return True

    kwargs = {"learning_starts": min(1000, total_steps // 5), "seed": seed, "verbose": 0}
    kwargs.update(sac_kwargs or {})
    model = SAC("MlpPolicy", env, **kwargs)
    snap = Snapshot()
    model.learn(total_timesteps=total_steps, callback=snap, progress_bar=show_progress)
    medium_policy = snap.medium_policy or model.policy

    if task in D4RL_REFERENCE:
        ref_min, ref_max = D4RL_REFERENCE[task]
    else:
        ref_min = float(np.mean(_rollouts_n(None, env, 10, seed + 1, True)))
        ref_max = float(np.mean(_rollouts_n(model.policy, env, 10, seed + 1, True)))

    parts = {
        "medium-replay": _episodes_from_buffer(model.replay_buffer, medium_step),
        "full-replay": _episodes_from_buffer(model.replay_buffer, total_steps),
        "medium": _rollouts(medium_policy, env, medium_size, seed + 100, deterministic=False),
    }
    out = {"ref_min_score": ref_min, "ref_max_score": ref_max}
    for name, eps in parts.items():
        dataset_id = f"{namespace}/{name}-v0"
        if dataset_id in minari.list_local_datasets():
            minari.delete_dataset(dataset_id)
        buffer = [EpisodeBuffer(id=i, observations=e["observations"], actions=e["actions"], rewards=list(e["rewards"]),
                                terminations=list(e["terminations"]), truncations=list(e["truncations"]), infos={})
                  for i, e in enumerate(eps)]
        minari.create_dataset_from_buffers(
            dataset_id=dataset_id, buffer=buffer, env=env, algorithm_name="SB3-SAC", author="ipd-agent",
            ref_min_score=ref_min, ref_max_score=ref_max, num_episodes_average_score=10,
            description=f"D4RL-protocol {name} dataset for {env_id} (SB3 SAC, {total_steps} steps, seed {seed}).",
        )
        rets = [float(np.sum(e["rewards"])) for e in eps]
        out[name] = {"dataset_id": dataset_id, "episodes": len(eps), "transitions": int(sum(len(e["rewards"]) for e in eps)),
                     "mean_return": float(np.mean(rets))}
    env.close()
    return out
