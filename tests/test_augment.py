"""Branch points, splicing, provenance and acceptance of imagined rollouts (DESIGN §2.3-2.4)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ipd_agent import Trajectories, load_minari
from ipd_agent.augment import augment, batched_values, segment_values, select_branch_points
from ipd_agent.config import AugmentConfig
from ipd_agent.planner import MPCPlanner

from conftest import minari_root

FIELDS = ("observations", "actions", "rewards", "next_observations", "terminals")


@pytest.fixture(scope="module")
def aug(fitted):
    return fitted.algo.augmentation


def _spliced(aug):
    """(episode index, branch id, first imagined row) of every spliced episode."""
    t = aug.trajectories
    out = []
    for e in range(aug.n_real_episodes, t.n_episodes):
        s, end = t.episode_starts[e], t.episode_starts[e + 1]
        im = np.flatnonzero(t.imagined[s:end])
        assert len(im) > 0, f"spliced episode {e} has no imagined rows"
        out.append((e, int(t.branch_ids[s + im[0]]), int(s + im[0])))
    return out


def test_spliced_episodes_keep_the_real_prefix_bit_for_bit(aug, fitted):
    real, t = fitted.traj, aug.trajectories
    spliced = _spliced(aug)
    assert len(spliced) == int(aug.accepted.sum()) > 0
    for e, b, first_im in spliced:
        row = int(aug.branch_rows[b])  # dataset row the rollout started from
        src_ep = int(real.episode_ids[row])
        src_start = int(real.episode_starts[src_ep])
        s = int(t.episode_starts[e])
        assert first_im - s == row - src_start  # prefix is τ[0:t]
        for name in FIELDS:
            np.testing.assert_array_equal(getattr(t, name)[s:first_im], getattr(real, name)[src_start:row],
                                          err_msg=f"{name} of spliced episode {e}")
        # the imagined segment starts from the very state of the branch row
        np.testing.assert_array_equal(t.observations[first_im], real.observations[row])
        # and has the rollout's length
        assert int(t.episode_starts[e + 1]) - first_im == int(aug.rollout_lengths[b])
        assert t.imagined[first_im:t.episode_starts[e + 1]].all()


def test_provenance_flags(aug, fitted):
    real, t = fitted.traj, aug.trajectories
    n_real_rows = int(t.episode_starts[aug.n_real_episodes])
    assert aug.n_real_episodes == real.n_episodes and n_real_rows == real.n_transitions
    # the real part of the table is unchanged
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(t, name)[:n_real_rows], getattr(real, name))
    np.testing.assert_array_equal(t.episode_starts[: real.n_episodes + 1], real.episode_starts)
    assert not t.imagined[:n_real_rows].any()
    assert np.all(t.branch_ids[:n_real_rows] == -1)
    # imagined rows carry the id of an accepted branch; real rows (also prefixes of spliced episodes) carry -1
    assert np.all(t.branch_ids[t.imagined] >= 0)
    assert np.all(t.branch_ids[~t.imagined] == -1)
    assert np.all(aug.outcomes[t.branch_ids[t.imagined]] == "accepted")
    # each accepted branch gives exactly one spliced episode, rejected ones none
    ids = sorted(b for _, b, _ in _spliced(aug))
    assert ids == sorted(np.flatnonzero(aug.accepted).tolist())
    im = aug.imagined_transitions()
    np.testing.assert_array_equal(im["source_rows"], aug.branch_rows[im["branch_ids"]])
    assert len(im["observations"]) == int(t.imagined.sum())


def test_spliced_episodes_end_truncated_unless_the_model_predicted_termination(aug):
    t = aug.trajectories
    for e, b, _ in _spliced(aug):
        s, end = t.episode_starts[e], t.episode_starts[e + 1]
        assert not t.terminals[s:end - 1].any()
        assert bool(t.terminals[end - 1]) == (aug.stop_reasons[b] == "terminal")


def _naive_segment_value(traj, v_next, gamma, row, length):
    ep = int(np.searchsorted(traj.episode_starts, row, side="right") - 1)
    end = int(traj.episode_starts[ep + 1])
    ell = min(length, end - row)
    g = sum(gamma ** j * float(traj.rewards[row + j]) for j in range(ell))
    last = row + ell - 1
    if not traj.terminals[last]:
        g += gamma ** ell * float(v_next[last])
    return g, ell


def _random_traj(rng) -> Trajectories:
    eps = []
    for length, terminal in ((3, True), (7, False), (1, True), (12, False), (25, True), (2, False)):
        eps.append({"observations": rng.normal(size=(length + 1, 2)), "actions": rng.uniform(-1, 1, (length, 1)),
                    "rewards": rng.normal(size=length), "terminated": terminal})
    return Trajectories.from_episodes(eps)


@pytest.mark.parametrize("length", [1, 4, 20])
def test_segment_values_match_a_naive_loop(length):
    rng = np.random.default_rng(length)
    traj = _random_traj(rng)
    v_next = rng.normal(size=traj.n_transitions).astype(np.float32)
    gamma = 0.9
    g, ell = segment_values(traj, v_next, gamma, length)
    for row in range(traj.n_transitions):
        ng, nl = _naive_segment_value(traj, v_next, gamma, row, length)
        assert ell[row] == nl
        assert g[row] == pytest.approx(ng, rel=1e-6, abs=1e-6), row
    # per-row lengths on a subset of rows
    rows = rng.choice(traj.n_transitions, size=15, replace=False)
    lens = rng.integers(1, 10, size=15)
    g2, ell2 = segment_values(traj, v_next, gamma, lens, rows=rows)
    for i, (row, ln) in enumerate(zip(rows, lens)):
        ng, nl = _naive_segment_value(traj, v_next, gamma, int(row), int(ln))
        assert ell2[i] == nl and g2[i] == pytest.approx(ng, rel=1e-6, abs=1e-6)


def test_branch_points_are_states_with_the_largest_value_gaps(aug, fitted):
    algo, real = fitted.algo, fitted.traj
    cfg, gamma = algo.config.augment, algo.config.gamma
    v_now = batched_values(algo.impl.value, real.observations)
    v_next = batched_values(algo.impl.value, real.next_observations)
    g, _ = segment_values(real, v_next, gamma, cfg.segment_length)
    gap = v_now - g
    n_top = int(np.ceil(cfg.branch_fraction * real.n_transitions))
    assert aug.n_candidates == n_top
    top = set(np.argsort(-gap, kind="stable")[:n_top].tolist())
    assert set(aug.branch_rows.tolist()) <= top
    assert np.all(gap[aug.branch_rows] > 0)
    assert len(aug.branch_rows) == min(cfg.n_branches, int((gap[list(top)] > 0).sum()))
    assert len(np.unique(aug.branch_rows)) == len(aug.branch_rows)
    # select_branch_points on its own: never more than n_branches, never a non-positive gap
    rng = np.random.default_rng(0)
    gaps = rng.normal(size=1000)
    rows = select_branch_points(gaps, AugmentConfig(branch_fraction=0.3, n_branches=50), rng)
    assert len(rows) == 50 and np.all(gaps[rows] > 0)
    assert np.all(gaps[rows] >= np.sort(gaps)[::-1][299])


def test_accepted_rollouts_beat_the_real_segment(aug, fitted):
    algo, real = fitted.algo, fitted.traj
    gamma, margin = algo.config.gamma, algo.config.augment.accept_margin
    acc = aug.accepted
    assert acc.any()
    assert np.all(aug.imagined_values[acc] > aug.real_values[acc] + margin)
    assert np.all(aug.imagined_values[aug.outcomes == "no_improvement"]
                  <= aug.real_values[aug.outcomes == "no_improvement"] + margin)
    # the real value is the real segment of the same length from the same state
    v_next = batched_values(algo.impl.value, real.next_observations)
    for b, row in enumerate(aug.branch_rows):
        ng, _ = _naive_segment_value(real, v_next, gamma, int(row), max(int(aug.rollout_lengths[b]), 1))
        assert aug.real_values[b] == pytest.approx(ng, rel=1e-5, abs=1e-5)
    # the imagined value is recomputable from the spliced episode itself
    t = aug.trajectories
    for e, b, first_im in _spliced(aug):
        end = int(t.episode_starts[e + 1])
        r = t.rewards[first_im:end].astype(np.float64)
        g = float((r * gamma ** np.arange(len(r))).sum())
        if not t.terminals[end - 1]:
            g += gamma ** len(r) * float(batched_values(algo.impl.value, t.next_observations[end - 1:end])[0])
        assert aug.imagined_values[b] == pytest.approx(g, rel=1e-4, abs=1e-4)


def test_accept_margin_only_changes_which_rollouts_are_kept(aug, fitted):
    algo, real = fitted.algo, fitted.traj
    impl, cfg = algo.impl, algo.config
    diff = aug.imagined_values - aug.real_values
    margin = float(np.median(diff))
    planner = MPCPlanner(impl.world_model, impl.value, cfg.planner, cfg.gamma)
    res = augment(real, impl.world_model, impl.value, planner, dataclasses.replace(cfg.augment, accept_margin=margin),
                  cfg.gamma, cfg.seed, show_progress=False)
    np.testing.assert_array_equal(res.branch_rows, aug.branch_rows)
    np.testing.assert_array_equal(res.rollout_lengths, aug.rollout_lengths)
    np.testing.assert_allclose(res.imagined_values, aug.imagined_values)
    expected = aug.accepted & (diff > margin)
    np.testing.assert_array_equal(res.accepted, expected)
    assert 0 < res.accepted.sum() < aug.accepted.sum()


def test_disabled_augmentation_keeps_only_real_data(fitted):
    impl, cfg, real = fitted.algo.impl, fitted.algo.config, fitted.traj
    planner = MPCPlanner(impl.world_model, impl.value, cfg.planner, cfg.gamma)
    res = augment(real, impl.world_model, impl.value, planner, dataclasses.replace(cfg.augment, enabled=False),
                  cfg.gamma, cfg.seed, show_progress=False)
    assert len(res.branch_rows) == 0 and res.summary()["n_accepted"] == 0
    assert res.trajectories.n_transitions == real.n_transitions and not res.trajectories.imagined.any()


def test_augmented_dataset_saves_as_minari_and_reloads(aug, tmp_path):
    import gymnasium as gym

    t = aug.trajectories
    with minari_root(tmp_path):
        ds = t.to_minari("ipdtest/augmented-v0", env=gym.make("Hopper-v5"))
        back, _ = load_minari(ds)
        for name in FIELDS + ("episode_starts",):
            np.testing.assert_array_equal(getattr(back, name), getattr(t, name))
        infos = [ep.infos for ep in ds.iterate_episodes()]
        np.testing.assert_array_equal(np.concatenate([i["imagined"] for i in infos]), t.imagined)
        np.testing.assert_array_equal(np.concatenate([i["branch_id"] for i in infos]), t.branch_ids)
