"""Shared fixtures for the ipd-agent test suite.

Everything here is real: MuJoCo environments, Minari files, d3rlpy training at tiny sizes. The one
IPD model the contract tests share is fitted once per session (a few seconds) and never mutated;
tests that re-fit work on a copy loaded from its checkpoint.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # one thread per process: the default oversubscribes small CPUs (DESIGN §6)
warnings.filterwarnings("ignore", message=".*Gym has been unmaintained.*")

import d3rlpy  # noqa: E402
import gymnasium as gym  # noqa: E402

from ipd_agent import IPDConfig, Trajectories  # noqa: E402

# the benchmark datasets live next to the repository: <repo>/../shared/datasets
SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
HOPPER_MR = "d4rlstyle/hopper/medium-replay-v0"

NOOP = d3rlpy.logging.NoopAdapterFactory()
FIT_KW = dict(show_progress=False, with_timestamp=False, logger_adapter=NOOP)


def tiny_config(**overrides) -> IPDConfig:
    """The smallest IPD that still exercises every stage (seconds on one CPU thread)."""
    kw = dict(
        value={"n_steps": 200, "hidden_units": (64, 64)},
        world_model={"max_steps": 200, "eval_every": 100, "hidden_size": 32, "n_layers": 2},
        planner={"n_samples": 16, "n_iterations": 2},
        augment={"n_branches": 32, "segment_length": 5},
        transformer={"n_steps": 30, "hidden_size": 32, "n_layers": 1, "token_steps": 200},
        context_size=5,
    )
    kw.update(overrides)
    return IPDConfig(**kw)


def collect_episodes(env_id: str, n_episodes: int, seed: int, action_fn=None, max_steps: int | None = None):
    """Rolls a (random by default) policy in a real Gymnasium env.

    Returns a list of dicts in Minari layout (T+1 observations) plus the reset observation of each episode.
    """
    env = gym.make(env_id, max_episode_steps=max_steps) if max_steps else gym.make(env_id)
    env.action_space.seed(seed)
    rng = np.random.default_rng(seed)
    episodes = []
    for k in range(n_episodes):
        o, _ = env.reset(seed=seed + k)
        obs, act, rew, te_, tr_ = [o], [], [], [], []
        while True:
            a = env.action_space.sample() if action_fn is None else action_fn(rng, o)
            o, r, te, tr, _ = env.step(a)
            obs.append(o)
            act.append(a)
            rew.append(r)
            te_.append(te)
            tr_.append(tr)
            if te or tr:
                break
        episodes.append({
            "seed": seed + k,
            "observations": np.asarray(obs),
            "actions": np.asarray(act),
            "rewards": np.asarray(rew, dtype=np.float64),
            "terminations": np.asarray(te_, dtype=bool),
            "truncations": np.asarray(tr_, dtype=bool),
        })
    env.close()
    return episodes


def to_traj(episodes) -> Trajectories:
    return Trajectories.from_episodes([
        {"observations": e["observations"], "actions": e["actions"], "rewards": e["rewards"],
         "terminated": bool(e["terminations"][-1])}
        for e in episodes
    ])


@contextlib.contextmanager
def minari_root(path):
    """Points MINARI_DATASETS_PATH at ``path`` for the duration of the block."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def write_minari(root, dataset_id: str, env_id: str, episodes):
    """Writes episodes as a real Minari dataset under ``root`` (EpisodeBuffer: no jax needed)."""
    import minari
    from minari.data_collector import EpisodeBuffer

    buf = [
        EpisodeBuffer(id=i, seed=e["seed"], observations=e["observations"], actions=e["actions"],
                      rewards=e["rewards"], terminations=e["terminations"], truncations=e["truncations"], infos={})
        for i, e in enumerate(episodes)
    ]
    with minari_root(root), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return minari.create_dataset_from_buffers(dataset_id=dataset_id, buffer=buf, env=gym.make(env_id),
                                                  author="ipd-agent tests", algorithm_name="random")


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not (SHARED_DATASETS / HOPPER_MR.replace("/", os.sep)).is_dir():
        pytest.skip(f"shared benchmark datasets not found at {SHARED_DATASETS}")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def hopper_episodes():
    """~100 random-policy Hopper-v5 episodes (about 2.3k transitions, all ending in a true termination)."""
    return collect_episodes("Hopper-v5", 100, seed=0)


@pytest.fixture(scope="session")
def hopper_traj(hopper_episodes) -> Trajectories:
    return to_traj(hopper_episodes)


@pytest.fixture(scope="session")
def fitted(hopper_traj, tmp_path_factory):
    """One tiny IPD fitted once on real Hopper-v5 data, plus its checkpoint. Tests must not mutate ``algo``."""
    d3rlpy.seed(0)
    algo = tiny_config().create(device="cpu:0")
    out = algo.fit(hopper_traj, **FIT_KW)
    path = tmp_path_factory.mktemp("ipd") / "ipd.d3"
    algo.save(str(path))
    return SimpleNamespace(algo=algo, traj=hopper_traj, out=out, path=str(path))


@pytest.fixture(scope="session")
def members3(hopper_traj, tmp_path_factory):
    """``fitted``'s model with ``transformer.n_members=3``: the same fit plus two separately seeded stage-6 members,
    deployed together (median action), and its checkpoint. Tests must not mutate ``algo``."""
    d3rlpy.seed(0)
    tiny = tiny_config().transformer.to_dict()
    algo = tiny_config(transformer={**tiny, "n_members": 3}).create(device="cpu:0")
    out = algo.fit(hopper_traj, **FIT_KW)
    path = tmp_path_factory.mktemp("ipd_members3") / "ipd.d3"
    algo.save(str(path))
    return SimpleNamespace(algo=algo, traj=hopper_traj, out=out, path=str(path))


def acts_alike(together, alone, env, seed: int, check=None) -> int:
    """Runs one episode of ``env`` on ``together``'s actions; at every step ``alone``, given the same observations and
    rewards, must choose the same action, and ``check(action)`` (if given) runs. Returns the number of steps."""
    o, _ = env.reset(seed=seed)
    together.reset()
    alone.reset()
    r, n = 0.0, 0
    while True:
        a = together.predict(o, r)
        np.testing.assert_array_equal(a, alone.predict(o, r))
        if check is not None:
            check(a)
        o, r, te, tr, _ = env.step(a)
        r, n = float(r), n + 1
        if te or tr:
            return n


@pytest.fixture()
def loaded_copy(fitted):
    """A private copy of the fitted model (through its checkpoint) that a test may re-fit."""
    return d3rlpy.load_learnable(fitted.path)
