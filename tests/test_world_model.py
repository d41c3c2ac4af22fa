"""The ensemble world model on a system whose true dynamics we know."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from ipd_agent.config import WorldModelConfig
from ipd_agent.world_model import EnsembleLinear, WorldModel, fit_world_model

OD, AD = 3, 2
_rng = np.random.default_rng(0)
A_MAT = _rng.normal(size=(OD, OD))
B_MAT = _rng.normal(size=(OD, AD))


def dynamics(s: np.ndarray, a: np.ndarray):
    """s' = s + 0.1·tanh(A s + B a), r = a_0 − |s|², terminal when s'_0 > 0.8."""
    s2 = (s + 0.1 * np.tanh(s @ A_MAT.T + a @ B_MAT.T)).astype(np.float32)
    r = (a[:, 0] - (s ** 2).sum(-1)).astype(np.float32)
    return s2, r, s2[:, 0] > 0.8


def box(rng, n, lo=-1.0, hi=1.0):
    return (rng.uniform(lo, hi, (n, OD)).astype(np.float32), rng.uniform(-1, 1, (n, AD)).astype(np.float32))


N_TRAIN = 5000
CFG = WorldModelConfig(n_members=5, n_elites=3, hidden_size=64, n_layers=2, max_steps=1000, eval_every=250,
                       threshold_samples=2000)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    s, a = box(rng, N_TRAIN)
    s2, r, d = dynamics(s, a)
    return s, a, r, s2, d


@pytest.fixture(scope="module")
def model(data):
    torch.manual_seed(0)
    m = WorldModel(OD, AD, dataclasses.replace(CFG))
    info = fit_world_model(m, *data, seed=0, show_progress=False)
    return m, info


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def test_mean_prediction_matches_true_dynamics(model):
    m, info = model
    assert bool(m.fitted) and info["wm_steps"] > 0
    rng = np.random.default_rng(2)
    s, a = box(rng, 2000)
    s2, r, _ = dynamics(s, a)
    nxt, rew, _, _ = m.step(_t(s), _t(a), sample=False)
    # relative error: MSE of the prediction over the variance of what is predicted
    rel_ds = ((nxt.numpy() - s2) ** 2).mean(0) / (s2 - s).var(0)
    rel_r = ((rew.numpy() - r) ** 2).mean() / r.var()
    assert np.all(rel_ds < 0.05), rel_ds
    assert rel_r < 0.05, rel_r
    # the mean step is the denormalised average of the elites' means
    mean, _, _ = m.predict_elites(_t(s), _t(a))
    n2, r2 = m.denormalise(mean.mean(0), _t(s))
    torch.testing.assert_close(n2, nxt)
    torch.testing.assert_close(r2, rew)


def test_termination_is_learnt_from_dataset_terminals(model):
    m, _ = model
    rng = np.random.default_rng(3)
    s, a = box(rng, 4000)
    s2, _, _ = dynamics(s, a)
    _, _, term = m.predict_elites(_t(s), _t(a))
    p = torch.sigmoid(term.mean(0)).detach().numpy()
    assert p[s2[:, 0] > 0.9].mean() > 0.5
    assert p[s2[:, 0] < 0.5].mean() < 0.1


def test_sampled_step_is_reproducible_and_near_the_mean(model):
    m, _ = model
    rng = np.random.default_rng(4)
    s, a = box(rng, 500)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    n1, r1, d1, u1 = m.step(_t(s), _t(a), generator=g1)
    n2, r2, d2, u2 = m.step(_t(s), _t(a), generator=g2)
    assert torch.equal(n1, n2) and torch.equal(r1, r2) and torch.equal(d1, d2)
    assert n1.shape == (500, OD) and r1.shape == (500,) and d1.dtype == torch.bool and u1.shape == (500,)
    s2, r, _ = dynamics(s, a)
    assert np.abs(n1.numpy() - s2).mean() < 0.05 * np.abs(s2 - s).mean() + 0.01
    torch.testing.assert_close(u1, m.uncertainty(_t(s), _t(a)))


@pytest.mark.parametrize("mode", ["gjs", "disagreement"])
def test_uncertainty_is_higher_far_from_the_data(model, mode):
    m, _ = model
    m = copy.deepcopy(m)
    m.cfg = dataclasses.replace(m.cfg, uncertainty=mode)
    rng = np.random.default_rng(6)
    s_in, a_in = box(rng, 2000)
    s_out = (rng.uniform(3, 5, (2000, OD)) * rng.choice([-1, 1], (2000, OD))).astype(np.float32)
    u_in = m.uncertainty(_t(s_in), _t(a_in)).numpy()
    u_out = m.uncertainty(_t(s_out), _t(a_in)).numpy()
    assert np.all(u_in >= 0) and np.all(np.isfinite(u_out))
    assert np.median(u_out) > 3 * np.median(u_in), (np.median(u_in), np.median(u_out))
    # with κ calibrated in this mode, far-away inputs are mostly untrusted, training inputs mostly trusted
    kappa = m.calibrate_threshold(_t(s_in), _t(a_in))
    assert (u_out > kappa).mean() > 0.8
    assert (u_in > kappa).mean() == pytest.approx(0.05, abs=0.01)


def test_threshold_is_configured_quantile_over_calibration_pairs(model, data):
    m, info = model
    s, a = data[0], data[1]
    # reproduce fit_world_model's sample of calibration pairs: the same rng stream after the hold-out split
    rng = np.random.default_rng(0)
    rng.permutation(N_TRAIN)
    sub = rng.choice(N_TRAIN, size=min(N_TRAIN, CFG.threshold_samples), replace=False)
    u = m.uncertainty(_t(s[sub]), _t(a[sub]))
    expected = float(torch.quantile(u, CFG.threshold_quantile))
    assert float(m.threshold) == pytest.approx(expected, rel=1e-6)
    assert info["wm_threshold"] == pytest.approx(expected, rel=1e-6)
    # calibrate_threshold on known pairs, another quantile, small batches
    m2 = copy.deepcopy(m)
    m2.cfg = dataclasses.replace(m2.cfg, threshold_quantile=0.5)
    pairs_s, pairs_a = box(np.random.default_rng(7), 3000)
    kappa = m2.calibrate_threshold(_t(pairs_s), _t(pairs_a), batch=256)
    u2 = m2.uncertainty(_t(pairs_s), _t(pairs_a))
    assert kappa == pytest.approx(float(torch.quantile(u2, 0.5)), rel=1e-6)
    assert float(m2.threshold) == pytest.approx(kappa, rel=1e-6)
    assert (u2 <= m2.threshold).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_elites_are_the_best_members_on_the_holdout_split(model, data):
    m, _ = model
    s, a, r, s2, _ = data
    rng = np.random.default_rng(0)
    perm = rng.permutation(N_TRAIN)
    n_hold = int(min(max(1, N_TRAIN * CFG.holdout_ratio), CFG.max_holdout))
    hold = perm[:n_hold]
    x = (torch.cat([_t(s[hold]), _t(a[hold])], 1) - m.in_mean) / m.in_std
    y = (torch.cat([_t(s2[hold] - s[hold]), _t(r[hold, None])], 1) - m.out_mean) / m.out_std
    errs = m.holdout_errors(x, y)
    assert sorted(m.elites.tolist()) == sorted(torch.argsort(errs)[: CFG.n_elites].tolist())
    assert len(set(m.elites.tolist())) == CFG.n_elites


def test_early_stopping_keeps_each_members_best_weights():
    """Few noisy transitions: the held-out error stops improving, training stops long before max_steps and every
    member comes back with its best held-out weights."""
    rng = np.random.default_rng(1)
    s, a = box(rng, 300)
    s2, r, d = dynamics(s, a)
    r = r + rng.normal(size=len(r)).astype(np.float32) * 0.3
    cfg = dataclasses.replace(CFG, max_steps=5000, eval_every=50, patience=2, batch_size=64)
    torch.manual_seed(0)
    m = WorldModel(OD, AD, cfg)
    info = fit_world_model(m, s, a, r, s2, d, seed=0, show_progress=False)
    hist = info["wm_holdout_mse_history"]
    assert info["wm_steps"] < cfg.max_steps
    assert info["wm_steps"] % cfg.eval_every == 0 and len(hist) == info["wm_steps"] // cfg.eval_every
    # each member's restored error is its best; the elites' mean can only be below every evaluation's mean
    assert info["wm_holdout_mse_elites"] <= min(hist) + 1e-7
    assert info["wm_holdout_mse_elites"] < hist[-1]


def _naive_gjs(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Mean over ordered pairs i≠j of the skew-½ geometric JS divergence, summed over dimensions."""
    from torch.distributions import Normal, kl_divergence

    m = mean.shape[0]
    var = logvar.exp()
    total = torch.zeros(mean.shape[1], dtype=torch.float64)
    for i in range(m):
        for j in range(m):
            if i == j:
                continue
            vi, vj = var[i].double(), var[j].double()
            mi, mj = mean[i].double(), mean[j].double()
            va = 1.0 / (0.5 / vi + 0.5 / vj)
            ma = va * (0.5 * mi / vi + 0.5 * mj / vj)
            g = Normal(ma, va.sqrt())
            js = 0.5 * kl_divergence(Normal(mi, vi.sqrt()), g) + 0.5 * kl_divergence(Normal(mj, vj.sqrt()), g)
            total += js.sum(-1)
    return total / (m * (m - 1))


def test_uncertainty_formulas_match_a_naive_implementation(model):
    m, _ = model
    rng = np.random.default_rng(8)
    s, a = box(rng, 64, -2, 2)
    mean, logvar, _ = m.predict_elites(_t(s), _t(a))
    torch.testing.assert_close(m.uncertainty_from(mean, logvar).double(), _naive_gjs(mean, logvar),
                               rtol=1e-4, atol=1e-5)
    md = copy.deepcopy(m)
    md.cfg = dataclasses.replace(md.cfg, uncertainty="disagreement")
    centre = mean.mean(0)
    naive = torch.tensor([max(float((mean[e, b] - centre[b]).norm()) for e in range(mean.shape[0]))
                          for b in range(mean.shape[1])])
    torch.testing.assert_close(md.uncertainty_from(mean, logvar), naive, rtol=1e-5, atol=1e-6)


def test_disagreement_mode_fits_and_calibrates(data):
    cfg = dataclasses.replace(CFG, uncertainty="disagreement", max_steps=300, eval_every=150)
    torch.manual_seed(1)
    m = WorldModel(OD, AD, cfg)
    info = fit_world_model(m, *data, seed=3, show_progress=False)
    s, a = data[0], data[1]
    rng = np.random.default_rng(3)
    rng.permutation(N_TRAIN)
    sub = rng.choice(N_TRAIN, size=cfg.threshold_samples, replace=False)
    mean, _, _ = m.predict_elites(_t(s[sub]), _t(a[sub]))
    u = (mean - mean.mean(0, keepdim=True)).norm(dim=-1).max(0).values
    assert info["wm_threshold"] == pytest.approx(float(torch.quantile(u, cfg.threshold_quantile)), rel=1e-5)


def test_unknown_uncertainty_mode_is_rejected(model):
    m = copy.deepcopy(model[0])
    m.cfg = dataclasses.replace(m.cfg, uncertainty="entropy")
    with pytest.raises(ValueError, match="unknown uncertainty"):
        m.uncertainty(torch.zeros(2, OD), torch.zeros(2, AD))


def test_ensemble_linear_equals_a_loop_over_members():
    torch.manual_seed(0)
    layer = EnsembleLinear(4, 5, 7)
    assert layer.weight.shape == (4, 5, 7) and layer.bias.shape == (4, 1, 7)
    x = torch.randn(4, 10, 5)
    loop = torch.stack([x[e] @ layer.weight[e] + layer.bias[e] for e in range(4)])
    torch.testing.assert_close(layer(x), loop)
    # gradients flow to every member separately
    layer(x)[2].sum().backward()
    assert layer.weight.grad[2].abs().sum() > 0 and layer.weight.grad[[0, 1, 3]].abs().sum() == 0


def test_member_subset_forward_equals_full_forward(model):
    m, _ = model
    rng = np.random.default_rng(9)
    s, a = box(rng, 32)
    x = m.normalise_input(_t(s), _t(a))
    full = m._forward_norm(x.unsqueeze(0).expand(CFG.n_members, *x.shape))
    sub = m.predict_elites(_t(s), _t(a))
    for f, e in zip(full, sub):
        torch.testing.assert_close(f[m.elites], e)
    # per-member forward with plain matmuls (no batching) agrees too
    e0 = int(m.elites[0])
    h = x
    for layer in m.layers:
        h = torch.nn.functional.silu(h @ layer.weight[e0] + layer.bias[e0])
    out = h @ m.head.weight[e0] + m.head.bias[e0]
    torch.testing.assert_close(out[:, : m.target_dim], sub[0][0], rtol=1e-5, atol=1e-5)


def test_rows_without_a_stored_next_state_do_not_teach_the_dynamics():
    """d3rlpy datasets store T observations for T actions, so each episode's last next state is a placeholder (the
    state repeated). With two-step episodes half the rows are placeholders: trained on them as if real, the model
    learns dynamics that are half too slow; masked, it learns the true ones and still learns their rewards."""
    from ipd_agent import Trajectories

    rng = np.random.default_rng(4)
    s, a = box(rng, 3000)
    s2, r, _ = dynamics(s, a)
    # episodes (s_i, s2_i): two steps each, d3rlpy layout (no final next observation stored)
    eps = [{"observations": np.stack([s[i], s2[i]]), "actions": np.stack([a[i], a[(i + 1) % len(a)]]),
            "rewards": np.array([r[i], 0.0], np.float32), "terminated": False} for i in range(len(s))]
    traj = Trajectories.from_episodes(eps)
    assert traj.next_known.mean() == 0.5
    s_test, a_test = box(np.random.default_rng(5), 2000)
    true_next, true_r, _ = dynamics(s_test, a_test)
    errs = {}
    for masked in (True, False):
        torch.manual_seed(0)
        m = WorldModel(OD, AD, dataclasses.replace(CFG))
        fit_world_model(m, traj.observations, traj.actions, traj.rewards, traj.next_observations, traj.terminals,
                        seed=0, show_progress=False, next_known=traj.next_known if masked else None)
        nxt, _, _, _ = m.step(_t(s_test), _t(a_test), sample=False)
        errs[masked] = float(((nxt.numpy() - true_next) ** 2).mean() / ((true_next - s_test) ** 2).mean())
    assert errs[True] < 0.05, errs  # relative error of the state change
    assert errs[False] > 4 * errs[True], errs
