"""Datasets in: Minari alignment (T+1 observations), d3rlpy round trip, id / object / path loading."""
from __future__ import annotations

import os

import d3rlpy
import gymnasium as gym
import minari
import numpy as np
import pytest

from ipd_agent import Trajectories, load_minari, to_trajectories
from ipd_agent.data import _split_minari_path, normalized_score, reference_scores

from conftest import FIT_KW, HOPPER_MR, collect_episodes, minari_root, tiny_config, write_minari

PEND_ID = "ipdtest/pendulum-v0"


def assert_same_traj(a: Trajectories, b: Trajectories, next_obs: bool = True) -> None:
    names = ["observations", "actions", "rewards", "terminals", "episode_starts"]
    names += ["next_observations"] if next_obs else []
    for name in names:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def check_minari_alignment(traj: Trajectories, episodes) -> None:
    """Row t of episode e is (o_t, a_t, r_t, o_{t+1}); only the last row of an episode may be terminal."""
    assert traj.n_episodes == len(episodes)
    for e, ep in enumerate(episodes):
        s, end = traj.episode_starts[e], traj.episode_starts[e + 1]
        o = np.asarray(ep.observations, dtype=np.float32)
        assert end - s == len(ep.actions) == len(o) - 1
        np.testing.assert_array_equal(traj.observations[s:end], o[:-1])
        np.testing.assert_array_equal(traj.next_observations[s:end], o[1:])
        np.testing.assert_array_equal(traj.actions[s:end], np.asarray(ep.actions, np.float32).reshape(end - s, -1))
        np.testing.assert_array_equal(traj.rewards[s:end], np.asarray(ep.rewards, np.float32))
        assert not traj.terminals[s:end - 1].any()
        assert bool(traj.terminals[end - 1]) == bool(ep.terminations[-1])
        assert not np.asarray(ep.terminations)[:-1].any()


# ----- a tiny Minari dataset made here from InvertedPendulum-v5 -----------------------------------
@pytest.fixture(scope="module")
def pendulum(tmp_path_factory):
    root = tmp_path_factory.mktemp("minari")
    # small random pushes; a 15-step limit so some episodes are truncated and some terminate
    eps = collect_episodes("InvertedPendulum-v5", 8, seed=100, max_steps=15,
                           action_fn=lambda rng, o: rng.uniform(-0.3, 0.3, 1).astype(np.float32))
    write_minari(root, PEND_ID, "InvertedPendulum-v5", eps)
    return root, eps


def test_pendulum_fixture_has_both_episode_endings(pendulum):
    _, eps = pendulum
    ends = [bool(e["terminations"][-1]) for e in eps]
    assert any(ends) and not all(ends)
    assert not any(e["terminations"][-1] and e["truncations"][-1] for e in eps)  # d3rlpy's get_minari chokes on those


def test_termination_at_the_time_limit_counts_as_terminal(tmp_path):
    """Gymnasium reports terminated and truncated together when the pole falls on the last allowed step."""
    eps = collect_episodes("InvertedPendulum-v5", 2, seed=100, max_steps=12,
                           action_fn=lambda rng, o: rng.uniform(-0.6, 0.6, 1).astype(np.float32))
    assert eps[1]["terminations"][-1] and eps[1]["truncations"][-1]
    ds = write_minari(tmp_path, "ipdtest/both-v0", "InvertedPendulum-v5", eps)
    traj, _ = load_minari(ds)
    assert traj.terminals[traj.episode_starts[1:] - 1].tolist() == [True, True]
    d3 = traj.to_d3rlpy()
    assert [bool(ep.terminated) for ep in d3.episodes] == [True, True]


def test_minari_episodes_align_with_the_environment(pendulum):
    root, eps = pendulum
    with minari_root(root):
        ds = minari.load_dataset(PEND_ID)
        traj, meta = load_minari(PEND_ID)
    check_minari_alignment(traj, list(ds.iterate_episodes()))
    assert meta["env_id"] == "InvertedPendulum-v5"
    # replaying each episode's actions from its reset seed reproduces (s_t, r_t, s_{t+1}) row by row
    env = gym.make("InvertedPendulum-v5", max_episode_steps=15)
    for e, ep in enumerate(eps):
        s, end = traj.episode_starts[e], traj.episode_starts[e + 1]
        o, _ = env.reset(seed=ep["seed"])
        for t in range(s, end):
            np.testing.assert_array_equal(traj.observations[t], np.float32(o))
            o, r, te, tr, _ = env.step(traj.actions[t])
            np.testing.assert_array_equal(traj.next_observations[t], np.float32(o))
            assert traj.rewards[t] == np.float32(r)
            assert bool(traj.terminals[t]) == bool(te)
        assert te or tr


def test_d3rlpy_get_minari_style_misalignment_is_absent(pendulum):
    """d3rlpy 2.8.1's get_minari stacks T+1 observations against T actions, so later episodes start on the
    previous episode's final observation; ours start on the real reset observation."""
    root, eps = pendulum
    with minari_root(root):
        traj, _ = load_minari(PEND_ID)
        d3, _ = d3rlpy.datasets.get_minari(PEND_ID)
    firsts_ours = traj.observations[traj.episode_starts[:-1]]
    resets = np.stack([np.float32(e["observations"][0]) for e in eps])
    np.testing.assert_array_equal(firsts_ours, resets)
    firsts_d3 = np.stack([np.float32(ep.observations[0]) for ep in d3.episodes[:len(eps)]])
    assert not np.allclose(firsts_d3[1:], resets[1:])  # d3rlpy's episodes 1.. are shifted
    np.testing.assert_array_equal(firsts_d3[1], np.float32(eps[0]["observations"][-1]))


def test_load_by_id_object_and_path_agree(pendulum):
    root, _ = pendulum
    path = os.path.join(root, *PEND_ID.split("/"))
    with minari_root(root):
        by_id, meta_id = load_minari(PEND_ID)
        by_obj, _ = load_minari(minari.load_dataset(PEND_ID))
    # by local path no environment variable is needed, also when pointing at the data folder
    old = os.environ.pop("MINARI_DATASETS_PATH", None)
    try:
        by_path, meta_path = load_minari(path)
        by_data, _ = load_minari(os.path.join(path, "data"))
        via_to_traj, _ = to_trajectories(path)
    finally:
        if old is not None:
            os.environ["MINARI_DATASETS_PATH"] = old
    for other in (by_obj, by_path, by_data, via_to_traj):
        assert_same_traj(by_id, other)
    assert meta_id["env_id"] == meta_path["env_id"]
    assert _split_minari_path(os.path.join(path, "data")) == (os.path.abspath(str(root)), PEND_ID)


# ----- the shared D4RL-style benchmark dataset ----------------------------------------------------
@pytest.fixture(scope="module")
def hopper_mr(shared_datasets):
    with minari_root(shared_datasets):
        ds = minari.load_dataset(HOPPER_MR)
        traj, meta = load_minari(HOPPER_MR)
    return ds, traj, meta


def test_shared_hopper_minari_alignment(hopper_mr):
    ds, traj, meta = hopper_mr
    assert traj.n_episodes == ds.total_episodes == 1465
    assert traj.n_transitions == ds.total_steps == 200_000
    check_minari_alignment(traj, list(ds.iterate_episodes()))
    assert meta["env_id"] == "Hopper-v5"
    assert reference_scores(meta) == (pytest.approx(-20.272305), pytest.approx(3234.3))
    assert normalized_score(3234.3, reference_scores(meta)) == pytest.approx(100.0)
    traj.validate()  # the benchmark data passes IPD's own checks


def test_shared_hopper_rows_are_physically_aligned(hopper_mr):
    """Setting MuJoCo to s_t and applying a_t lands on s'_t (and pays r_t); s_{t+1} of the row after does not.

    Hopper's observation is qpos[1:] and qvel, and its dynamics do not depend on x, so a state can be rebuilt
    from an observation (rows with clipped velocities are skipped).
    """
    _, traj, _ = hopper_mr
    env = gym.make("Hopper-v5").unwrapped
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    ends = traj.episode_ends
    rows = rng.choice(np.flatnonzero(~ends[:-1] & ~ends[1:]), size=300, replace=False)
    err, err_shifted, rew_err = [], [], []
    for t in rows:
        o = traj.observations[t].astype(np.float64)
        if np.any(np.abs(o[5:]) >= 9.99):
            continue
        env.set_state(np.concatenate([[0.0], o[:5]]), o[5:])
        o2, r, _, _, _ = env.step(traj.actions[t])
        err.append(np.abs(o2 - traj.next_observations[t]).max())
        err_shifted.append(np.abs(o2 - traj.next_observations[t + 1]).max())  # d3rlpy-style off-by-one
        rew_err.append(abs(r - traj.rewards[t]))
    assert len(err) > 200
    assert np.median(err) < 0.05 and np.median(err) < 0.1 * np.median(err_shifted)
    assert np.median(rew_err) < 0.01


def test_shared_hopper_by_id_object_and_path_agree(hopper_mr, shared_datasets):
    ds, by_id, _ = hopper_mr
    by_obj, _ = load_minari(ds)
    by_path, _ = load_minari(str(shared_datasets / HOPPER_MR))
    assert_same_traj(by_id, by_obj)
    assert_same_traj(by_id, by_path)


# ----- d3rlpy round trip --------------------------------------------------------------------------
def test_to_d3rlpy_round_trip_preserves_episodes(pendulum, hopper_traj, tmp_path):
    root, _ = pendulum
    with minari_root(root):
        pend, _ = load_minari(PEND_ID)
    for traj in (pend, hopper_traj):
        d3 = traj.to_d3rlpy()
        assert isinstance(d3, d3rlpy.dataset.ReplayBuffer)
        assert len(d3.episodes) == traj.n_episodes
        assert [bool(ep.terminated) for ep in d3.episodes] == traj.terminals[traj.episode_ends].tolist()
        back, _ = to_trajectories(d3)
        # d3rlpy does not store the final next-observation; everything else survives the trip
        assert_same_traj(traj, back, next_obs=False)
        inner = ~traj.episode_ends
        np.testing.assert_array_equal(back.next_observations[inner], traj.next_observations[inner])
        # the unknown last next states are marked, so the world model skips them; Minari input knows them all
        assert traj.next_known.all()
        np.testing.assert_array_equal(back.next_known, inner)
        assert back.fingerprint() != Trajectories(**{**vars(back), "next_known": None}).fingerprint()
        # and round-tripping again is exact
        assert_same_traj(back, to_trajectories(back.to_d3rlpy())[0])
    assert to_trajectories(hopper_traj)[0] is hopper_traj
    # through a Minari file and back the marks survive (a placeholder never becomes a real next state)
    back = to_trajectories(pend.to_d3rlpy())[0]
    with minari_root(tmp_path):
        back.to_minari("ipdtest/roundtrip-v0")
        again, _ = load_minari("ipdtest/roundtrip-v0")
    assert_same_traj(back, again)
    np.testing.assert_array_equal(again.next_known, back.next_known)
    assert not again.next_known.all()


def test_trajectories_helpers(hopper_traj):
    t = hopper_traj
    assert t.episode_starts[0] == 0 and t.episode_starts[-1] == t.n_transitions
    np.testing.assert_array_equal(np.bincount(t.episode_ids), t.episode_lengths)
    assert t.episode_ends.sum() == t.n_episodes
    np.testing.assert_allclose(t.episode_returns()[3], t.rewards[t.episode_starts[3]:t.episode_starts[4]].sum(),
                               rtol=1e-5)
    two = Trajectories.concatenate([t, t])
    assert two.n_episodes == 2 * t.n_episodes and two.n_transitions == 2 * t.n_transitions
    np.testing.assert_array_equal(two.episode(t.n_episodes + 5)["observations"], t.episode(5)["observations"])


def test_fit_accepts_a_minari_dataset_by_path_and_by_object(pendulum):
    root, _ = pendulum
    path = os.path.join(root, *PEND_ID.split("/"))
    algo = tiny_config(transformer={"n_steps": 3, "hidden_size": 16, "n_layers": 1}).create(device="cpu:0")
    out = algo.fit(path, **FIT_KW)
    assert out["augmentation"]["n_branches"] > 0
    assert algo.predict(np.zeros((2, 4), np.float32)).shape == (2, 1)
    times = dict(algo.stage_times)
    assert set(times) == {"value", "world_model", "augment", "transformer"}
    with minari_root(root):
        out2 = algo.fit(minari.load_dataset(PEND_ID), n_steps=2, **FIT_KW)  # same data: only the transformer runs
    for stage in ("value", "world_model", "augment"):
        assert algo.stage_times[stage] == times[stage]
    assert algo.stage_times["transformer"] > times["transformer"]
    assert out2["augmentation"] == out["augmentation"]


def test_to_minari_without_an_env_describes_spaces_from_the_data(hopper_traj, tmp_path):
    import minari

    from conftest import minari_root

    with minari_root(tmp_path):
        hopper_traj.to_minari("test/hopper/noenv-v0")
        ds = minari.load_dataset("test/hopper/noenv-v0")
        assert ds.action_space.shape == (hopper_traj.action_dim,)
        assert ds.observation_space.shape == (hopper_traj.observation_dim,)
        assert ds.total_steps == hopper_traj.n_transitions
