"""The value-guided causal transformer: causality, return tokens, inference convention, Q guidance."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ipd_agent import Trajectories
from ipd_agent.config import TransformerNetConfig
from ipd_agent.policy import TransformerContext
from ipd_agent.transformer import (CausalTransformer, WindowSampler, advantage_weights,
                                   value_guided_loss, value_returns_to_go)

OD, AD, K = 4, 2, 6


def _net(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = TransformerNetConfig(hidden_size=32, n_layers=2, n_heads=2, dropout=0.1, **kw)
    return CausalTransformer(OD, AD, K, cfg).eval()


def _tokens(b=3, t=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, t, OD, generator=g), torch.rand(b, t, AD, generator=g) * 2 - 1,
            torch.randn(b, t, generator=g))


@torch.no_grad()
@pytest.mark.parametrize("tokens", [2, 3])
def test_changing_a_later_step_never_changes_earlier_actions(tokens):
    net = _net(tokens_per_step=tokens)
    obs, act, rtg = _tokens()
    base = net(obs, act, rtg)
    assert base.shape == (3, K, AD) and torch.all(base.abs() <= 1)
    for k in range(K):
        for which in ("obs", "act", "rtg"):
            o, a, g = obs.clone(), act.clone(), rtg.clone()
            {"obs": o, "act": a, "rtg": g}[which][:, k] += 3.0
            out = net(o, a, g)
            torch.testing.assert_close(out[:, :k], base[:, :k], rtol=0, atol=1e-6)
            if which == "act":
                # a_k comes after s_k: it may not influence the prediction of a_k itself ...
                torch.testing.assert_close(out[:, k], base[:, k], rtol=0, atol=1e-6)
                if k + 1 < K:  # ... but it is context for the next step
                    assert not torch.allclose(out[:, k + 1], base[:, k + 1], atol=1e-4)
            else:
                assert not torch.allclose(out[:, k], base[:, k], atol=1e-4), (which, k)


@torch.no_grad()
@pytest.mark.parametrize("tokens", [2, 3])
def test_short_windows_equal_the_prefix_of_long_windows(tokens):
    """Right padding after n real steps never changes the first n outputs (training = inference context)."""
    net = _net(1, tokens_per_step=tokens)
    obs, act, rtg = _tokens(seed=1)
    full = net(obs, act, rtg)
    for n in range(1, K + 1):
        torch.testing.assert_close(net(obs[:, :n], act[:, :n], rtg[:, :n]), full[:, :n], rtol=1e-5, atol=1e-6)


def test_dropout_is_active_only_in_training():
    net = _net(2)
    obs, act, rtg = _tokens(seed=2)
    net.train()
    assert not torch.equal(net(obs, act, rtg), net(obs, act, rtg))
    net.eval()
    assert torch.equal(net(obs, act, rtg), net(obs, act, rtg))


def _random_traj(rng, lengths_terms) -> Trajectories:
    eps = [{"observations": rng.normal(size=(n + 1, OD)), "actions": rng.uniform(-1, 1, (n, AD)),
            "rewards": rng.normal(size=n), "terminated": term} for n, term in lengths_terms]
    return Trajectories.from_episodes(eps)


def test_value_returns_to_go_match_a_naive_backwards_loop():
    rng = np.random.default_rng(0)
    traj = _random_traj(rng, [(5, True), (1, False), (9, False), (3, True), (14, True), (2, False)])
    v_next = rng.normal(size=traj.n_transitions).astype(np.float32) * 2
    gamma = 0.95
    got = value_returns_to_go(traj, v_next, gamma)
    assert got.dtype == np.float32 and got.shape == (traj.n_transitions,)
    expected = np.zeros(traj.n_transitions)
    for e in range(traj.n_episodes):
        s, end = traj.episode_starts[e], traj.episode_starts[e + 1]
        last = end - 1
        expected[last] = traj.rewards[last] + gamma * v_next[last] * (1.0 - float(traj.terminals[last]))
        for t in range(last - 1, s - 1, -1):
            expected[t] = traj.rewards[t] + gamma * max(expected[t + 1], v_next[t])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_one_step_relabel_and_unknown_modes():
    rng = np.random.default_rng(1)
    traj = _random_traj(rng, [(4, True), (6, False), (3, True)])
    v_next = rng.normal(size=traj.n_transitions).astype(np.float32)
    got = value_returns_to_go(traj, v_next, 0.9, "one_step")
    expected = [traj.rewards[t] + 0.9 * v_next[t] * (1.0 - float(traj.terminals[t])) for t in range(traj.n_transitions)]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(value_returns_to_go(traj, v_next, 0.9), value_returns_to_go(traj, v_next, 0.9, "max"))
    with pytest.raises(ValueError, match="unknown return-token relabel"):
        value_returns_to_go(traj, v_next, 0.9, "monte-carlo")


def test_mc_relabel_is_the_plain_discounted_return_bootstrapped_only_at_the_end():
    rng = np.random.default_rng(2)
    traj = _random_traj(rng, [(4, True), (7, False), (1, False), (5, True)])
    v_next = rng.normal(size=traj.n_transitions).astype(np.float32) * 3
    got = value_returns_to_go(traj, v_next, 0.9, "mc")
    expected = np.zeros(traj.n_transitions)
    for e in range(traj.n_episodes):
        s, end = traj.episode_starts[e], traj.episode_starts[e + 1]
        acc = v_next[end - 1] * (1.0 - float(traj.terminals[end - 1]))  # V bootstraps a cut-off episode only
        for t in range(end - 1, s - 1, -1):
            acc = traj.rewards[t] + 0.9 * acc
            expected[t] = acc
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, value_returns_to_go(traj, v_next, 0.9, "max"))  # V never lifts an mc token


def test_target_mode_inverts_the_training_relabel_exactly(fitted):
    """With V out of the way the training relabel is g_t = r_t + γ·g_{t+1}; target-mode inference must walk
    the same tokens forward: g_{t+1} = (g_t − r_t)/γ."""
    algo = fitted.algo
    traj, gamma, k = fitted.traj, algo.config.gamma, algo.config.context_size
    e = int(np.flatnonzero(traj.episode_lengths >= 3 * k)[0])
    ep = Trajectories.from_episodes([{
        "observations": np.concatenate([traj.episode(e)["observations"], traj.episode(e)["next_observations"][-1:]]),
        "actions": traj.episode(e)["actions"], "rewards": traj.episode(e)["rewards"], "terminated": True}])
    g_train = value_returns_to_go(ep, np.full(ep.n_transitions, -1e9, np.float32), gamma).astype(np.float64)
    ctx = TransformerContext(algo, 1, "target", target_return=float(g_train[0]))
    tokens = []
    for t in range(ep.n_transitions):
        r_prev = np.array([ep.rewards[t - 1] if t else 0.0], np.float32)
        ctx.step(ep.observations[t][None], r_prev)
        tokens.append(float(ctx.rtg[0, min(t, k - 1)]))
    np.testing.assert_allclose(tokens, g_train, rtol=1e-3, atol=1e-3)
    # and step by step it is exactly the decrement rule
    for t in range(1, len(tokens)):
        assert tokens[t] == pytest.approx((tokens[t - 1] - float(ep.rewards[t - 1])) / gamma, rel=1e-5, abs=1e-5)


def test_stateful_wrapper_equals_feeding_the_windows_directly(fitted):
    """Value mode: g_t = the state's return token and the last K steps, exactly as a training window would
    present them."""
    algo = fitted.algo
    impl, k = algo.impl, algo.config.context_size
    ep = fitted.traj.episode(int(np.flatnonzero(fitted.traj.episode_lengths >= 3 * k)[0]))
    obs = ep["observations"]
    w = algo.as_stateful_wrapper()
    acts = np.asarray([w.predict(o, float(r)) for o, r in zip(obs, ep["rewards"])])
    with torch.no_grad():
        v = algo.return_token(torch.from_numpy(obs))
        for t in range(len(obs)):
            lo = max(0, t - k + 1)
            o = torch.from_numpy(obs[None, lo:t + 1])
            a = torch.from_numpy(acts[None, lo:t + 1].copy())
            a[:, -1] = 0.0  # the current action token is unknown at inference (and invisible to s_t anyway)
            direct = impl.transformer(o, a, v[None, lo:t + 1])[0, -1].numpy()
            np.testing.assert_allclose(acts[t], direct, atol=1e-5, err_msg=f"step {t}")
    # the context really holds the state's return tokens
    ctx = w._ctx
    torch.testing.assert_close(ctx.rtg[0], v[-k:])
    torch.testing.assert_close(ctx.obs[0], torch.from_numpy(obs[-k:]))


def test_window_sampler_respects_episodes_and_mixes_imagined_windows():
    rng = np.random.default_rng(3)
    traj = _random_traj(rng, [(4, True), (9, False), (2, False), (12, True)])
    n_real = traj.n_episodes
    # one spliced episode: 3 real prefix rows then 5 imagined rows
    pre = traj.episode(1)
    im = Trajectories.from_episodes([{"observations": rng.normal(size=(9, OD)), "actions": rng.uniform(-1, 1, (8, AD)),
                                      "rewards": rng.normal(size=8), "terminated": False}])
    im.observations[:3] = pre["observations"][:3]
    im.imagined = np.arange(8) >= 3
    im.branch_ids = np.where(im.imagined, 0, -1)
    full = Trajectories.concatenate([traj, im])
    full.observations[:, 0] = np.arange(full.n_transitions)  # tag each row with its index
    rtg = np.arange(full.n_transitions, dtype=np.float32)
    sampler = WindowSampler(full, rtg, context=5, imagined_ratio=0.5, n_real_episodes=n_real, seed=0)
    obs, act, g, mask = sampler.sample(400)
    assert obs.shape == (400, 5, OD) and act.shape == (400, 5, AD) and g.shape == (400, 5) and mask.shape == (400, 5)
    rows = obs[..., 0].long().numpy()
    start = rows[:, 0]
    ep_of = full.episode_ids
    m = mask.numpy()
    # actions are learnt on real episodes and on imagined rows; a spliced episode's real prefix is context only
    learn = (ep_of < n_real) | full.imagined
    valid = np.zeros_like(m)
    for i in range(400):
        end = full.episode_starts[ep_of[start[i]] + 1]
        n = min(5, end - start[i])  # uses every step left in the episode, padding after
        valid[i, :n] = True
        np.testing.assert_array_equal(rows[i, :n], start[i] + np.arange(n))  # consecutive rows
        assert np.all(ep_of[rows[i, :n]] == ep_of[start[i]])  # never crosses an episode boundary
        np.testing.assert_array_equal(m[i, :n], learn[rows[i, :n]])
        assert not np.any(m[i, n:])
    assert m[start < full.episode_starts[n_real], 0].all()
    np.testing.assert_array_equal(g.numpy()[valid], rows[valid].astype(np.float32))
    reaches_imagined = np.array([full.imagined[rows[i, valid[i]]].any() for i in range(400)])
    assert reaches_imagined.sum() == 200  # imagined_ratio of the batch
    assert np.all(start[~reaches_imagined] < full.episode_starts[n_real])  # the rest comes from real episodes


def test_value_guided_loss_formula():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(4, 5, AD, generator=g) * 2 - 1
    act = torch.rand(4, 5, AD, generator=g) * 2 - 1
    obs = torch.randn(4, 5, OD, generator=g)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    mask[3, 1:] = False

    def q_fn(o, a):
        return a[..., 0] + 0.5 * o[..., 0]

    bc_naive = np.mean([float(((pred[i, j] - act[i, j]) ** 2).sum()) for i in range(4) for j in range(5) if mask[i, j]])
    qs = [float(q_fn(obs[i, j], pred[i, j])) for i in range(4) for j in range(5) if mask[i, j]]
    loss0, m0 = value_guided_loss(pred, act, obs, mask, q_fn, 0.0)
    assert float(loss0) == pytest.approx(bc_naive, rel=1e-5)
    assert "q_pi" not in m0
    loss1, m1 = value_guided_loss(pred, act, obs, mask, q_fn, 0.7)
    assert float(loss1) == pytest.approx(bc_naive - 0.7 * np.mean(qs) / np.mean(np.abs(qs)), rel=1e-4)
    assert m1["q_pi"] == pytest.approx(np.mean(qs), rel=1e-5)


class _ValueOfFirstActionComponent:
    """Stand-in stage-1 values with A(s, a) = a_0: Q(s, a) = a_0 + V(s), on a reward scale of 1."""

    reward_scale = torch.ones(())
    max_weight = 100.0  # IQL's default clip

    def v(self, obs):
        return obs[..., 0]

    def q(self, obs, act):
        return act[..., 0] + obs[..., 0]


def _train(alpha: float, steps: int = 150, beta: float = 0.0):
    """Trains a small transformer on uniformly random behaviour actions with q(s, a) = a_0 (and, for ``beta`` > 0,
    imitation weighted by min(exp(beta * a_0), 100))."""
    rng = np.random.default_rng(0)
    traj = _random_traj(rng, [(30, False)] * 20)
    rtg = rng.normal(size=traj.n_transitions).astype(np.float32)
    net = _net(5)
    net.train()
    weights = (advantage_weights(_ValueOfFirstActionComponent(), traj.observations, traj.actions, beta)
               if beta > 0 else None)
    sampler = WindowSampler(traj, rtg, context=K, imagined_ratio=0.0, seed=0, weights=weights)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)

    def q_fn(o, a):
        return a[..., 0]

    torch.manual_seed(1)
    for _ in range(steps):
        obs, act, g, mask = sampler.sample(32)
        loss, _ = value_guided_loss(net(obs, act, g), act, obs, mask, q_fn, alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        obs, act, g, mask = WindowSampler(traj, rtg, context=K, imagined_ratio=0.0, seed=99).sample(256)
        pred = net(obs, act, g)
        return float(pred[..., 0][mask].mean()), float(((pred - act) ** 2).sum(-1)[mask].mean())


def test_value_guidance_moves_actions_up_q():
    q_guided, _ = _train(alpha=1.0)
    q_plain, _ = _train(alpha=0.0)
    assert q_guided > q_plain + 0.2, (q_guided, q_plain)
    assert abs(q_plain) < 0.3  # plain regression onto uniform actions stays near their mean


def test_advantage_weighting_copies_the_better_actions_more():
    # behaviour actions are uniform on [-1, 1] whatever the token; weighting by exp(3 * a_0) moves the regression
    # target to the weighted mean of a_0, coth(3) - 1/3 = 0.67, while plain regression stays near 0
    a0_weighted, _ = _train(alpha=0.0, steps=300, beta=3.0)
    a0_plain, _ = _train(alpha=0.0, steps=300)
    assert abs(a0_plain) < 0.3
    assert a0_weighted > 0.45, (a0_weighted, a0_plain)


def test_advantage_weights_are_iqls_actor_weights_on_its_own_reward_scale(fitted):
    """On a fitted stage 1: exp(beta * (Q - V)) of IQL's own networks, which see scaled rewards, clipped at 100."""
    value = fitted.algo.impl.value
    obs, act = fitted.traj.observations[:500], fitted.traj.actions[:500]
    got = advantage_weights(value, obs, act, 3.0, batch=128)  # several batches
    o, a = torch.from_numpy(obs), torch.from_numpy(act)
    with torch.no_grad():  # IQL's networks directly: their outputs are already on IQL's (scaled) reward scale
        q = torch.stack([qf(o, a).q_value.reshape(-1) for qf in value.q_funcs]).min(0).values
        adv = q - value.value_func(o).reshape(-1)
    # the clip is the fitted IQL's own max_weight (d3rlpy's default, 100), read from its config
    assert value.max_weight == fitted.algo.impl.iql.config.max_weight == 100.0
    expected = torch.exp(3.0 * adv).clamp(max=value.max_weight).numpy()
    assert float(value.reward_scale) != 1.0  # the conversion is exercised
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert got.shape == (500,) and np.all(got > 0) and np.all(got <= value.max_weight)


def test_sampler_weights_replace_the_mask_where_actions_are_learnt():
    rng = np.random.default_rng(3)
    traj = _random_traj(rng, [(7, False), (3, True), (12, False)])
    traj.observations[:, 0] = np.arange(traj.n_transitions)  # tag rows
    rtg = np.zeros(traj.n_transitions, dtype=np.float32)
    w = rng.uniform(0.1, 5.0, traj.n_transitions).astype(np.float32)
    obs, _, _, mask = WindowSampler(traj, rtg, context=5, imagined_ratio=0.0, seed=1).sample(200)
    obs_w, _, _, wmask = WindowSampler(traj, rtg, context=5, imagined_ratio=0.0, seed=1, weights=w).sample(200)
    torch.testing.assert_close(obs_w, obs)  # the same windows
    rows = obs[..., 0].long().numpy()
    np.testing.assert_allclose(wmask.numpy(), np.where(mask.numpy(), w[rows], 0.0), rtol=0, atol=0)


def test_a_weighted_mask_gives_the_weighted_mean_imitation_error():
    g = torch.Generator().manual_seed(1)
    pred, act = torch.rand(3, 4, AD, generator=g) * 2 - 1, torch.rand(3, 4, AD, generator=g) * 2 - 1
    w = torch.rand(3, 4, generator=g) * 3
    w[2, 2:] = 0.0  # padding
    err = ((pred - act) ** 2).sum(-1)
    loss, _ = value_guided_loss(pred, act, torch.zeros(3, 4, OD), w, None, 0.0)
    assert float(loss) == pytest.approx(float((w * err).sum() / w.sum()), rel=1e-6)


def test_token_layout_must_be_two_or_three():
    with pytest.raises(ValueError, match="tokens_per_step must be 2 or 3"):
        _net(tokens_per_step=4)
