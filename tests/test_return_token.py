"""The upper-expectile return-token model (``transformer.return_token="upper"``)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from ipd_agent.algo import load_ipd
from ipd_agent.transformer import ReturnTokenModel, fit_return_token_model

from conftest import FIT_KW


def test_token_model_fits_the_requested_expectile():
    """Tokens g = 3·s + uniform noise in [-1, 1]: the 0.9-expectile fit sits well above the 0.5 one, and about
    the share of tokens an expectile of 0.9 implies lie below it."""
    rng = np.random.default_rng(0)
    s = rng.uniform(-1, 1, (4000, 2)).astype(np.float32)
    g = (3 * s[:, 0] + rng.uniform(-1, 1, 4000)).astype(np.float32)
    preds = {}
    for tau in (0.5, 0.9):
        m = ReturnTokenModel(2, hidden=64)
        fit_return_token_model(m, s, g, tau, n_steps=1500, seed=0)
        assert bool(m.fitted)
        with torch.no_grad():
            preds[tau] = m(torch.from_numpy(s)).numpy()
    resid = g - preds[0.5]
    assert abs(resid.mean()) < 0.1  # the 0.5 expectile is the mean
    lift = float((preds[0.9] - preds[0.5]).mean())
    assert 0.3 < lift < 0.8  # 0.9-expectile of U(-1, 1) is 0.5 above its mean
    below = float((g < preds[0.9]).mean())
    assert 0.7 < below < 0.9


def test_token_model_rejects_a_bad_expectile():
    with pytest.raises(ValueError, match="token_expectile"):
        fit_return_token_model(ReturnTokenModel(2), np.zeros((4, 2)), np.zeros(4), 1.0, 1, seed=0)


def test_upper_token_is_the_default_and_is_fitted_used_saved_and_exported(loaded_copy, fitted, tmp_path):
    from ipd_agent import IPDConfig

    assert IPDConfig().transformer.return_token == "upper"
    algo = loaded_copy
    assert bool(algo.impl.token.fitted)  # fitted in the transformer stage of the shared fixture
    before = algo.impl.token.state_dict()["g_mean"].clone()
    algo.fit(fitted.traj, n_steps=2, **FIT_KW)
    assert torch.equal(algo.impl.token.g_mean, before)  # fitted once, not again on a continued fit
    obs = fitted.traj.observations[:64]
    o = torch.from_numpy(obs)
    token = algo.return_token(o)
    assert torch.allclose(token, algo.impl.token(o))
    assert not torch.allclose(token, algo.impl.value.v(o))
    # the stateful policy conditions on the token model
    w = algo.as_stateful_wrapper()
    w.predict(obs[0], 0.0)
    assert torch.allclose(w._ctx.rtg[0, 0], algo.impl.token(o[:1])[0])
    # save / load keeps the token model and the mode
    path = str(tmp_path / "upper.d3")
    algo.save(path)
    again = load_ipd(path)
    assert again.config.transformer.return_token == "upper"
    np.testing.assert_allclose(again.predict(obs), algo.predict(obs), atol=1e-6)
    # the exported policy computes the same token inside
    algo.save_policy(str(tmp_path / "p.pt"))
    mod = torch.jit.load(str(tmp_path / "p.pt"))
    k = algo.config.context_size
    a_exp = mod(o[:k], torch.zeros(k, algo.impl.action_size)).detach().numpy()
    ref = algo.impl.transformer(o[None, :k], torch.zeros(1, k, algo.impl.action_size), token[None, :k])[0, -1]
    np.testing.assert_allclose(a_exp, ref.detach().numpy(), atol=1e-5)


def test_upper_token_on_a_model_without_a_fitted_token_model_says_what_to_do(loaded_copy):
    loaded_copy.config.transformer.return_token = "upper"
    loaded_copy.impl.token.fitted.fill_(False)
    with pytest.raises(RuntimeError, match="token model is not fitted"):
        loaded_copy.predict(np.zeros((1, loaded_copy.impl.observation_shape[0]), np.float32))


def test_models_saved_before_the_token_model_existed_still_load(fitted):
    buf = io.BytesIO()
    fitted.algo.impl.save_model(buf)
    buf.seek(0)
    chkpt = torch.load(buf, weights_only=False)
    del chkpt["token"]
    old = io.BytesIO()
    torch.save(chkpt, old)
    algo = load_ipd(fitted.path)
    algo.impl.load_model(io.BytesIO(old.getvalue()))
    assert not bool(algo.impl.token.fitted)
    obs = fitted.traj.observations[:8]
    with pytest.raises(RuntimeError, match="return_token='value'"):
        algo.predict(obs)
    algo.config.transformer.return_token = "value"  # what such a model was trained for
    impl = fitted.algo.impl
    o = torch.from_numpy(obs)[:, None]
    with torch.no_grad():
        ref = impl.transformer(o, torch.zeros(len(obs), 1, impl.action_size), impl.value.v(o))[:, 0].numpy()
    np.testing.assert_allclose(algo.predict(obs), ref, atol=1e-6)


def test_value_token_mode_conditions_on_v(loaded_copy, fitted):
    """return_token='value' is DESIGN §2.6's g_t = V(s_t) (kept as the value-token ablation)."""
    algo = loaded_copy
    algo.config.transformer.return_token = "value"
    o = torch.from_numpy(fitted.traj.observations[:16])
    assert torch.allclose(algo.return_token(o), algo.impl.value.v(o))
    w = algo.as_stateful_wrapper()
    w.predict(fitted.traj.observations[0], 0.0)
    assert torch.allclose(w._ctx.rtg[0, 0], algo.impl.value.v(o[:1])[0])


def test_refitting_the_token_with_a_higher_expectile_raises_it_without_touching_the_transformer(loaded_copy, fitted):
    algo = loaded_copy
    with pytest.raises(RuntimeError, match="augment"):
        algo.fit_return_token()  # a loaded model has no augmentation in memory: says how to get one
    aug = algo.augment(fitted.traj, show_progress=False)
    o = torch.from_numpy(fitted.traj.observations[::10])
    net_before = {k: v.clone() for k, v in algo.impl.transformer.state_dict().items()}
    algo.fit_return_token(aug, expectile=0.6)
    low = algo.return_token(o).mean()
    algo.fit_return_token(aug, expectile=0.95)
    assert algo.config.transformer.token_expectile == 0.95
    assert algo.return_token(o).mean() > low
    assert all(torch.equal(v, algo.impl.transformer.state_dict()[k]) for k, v in net_before.items())


@pytest.mark.parametrize("field", ["return_token", "rtg_relabel"])
def test_unknown_token_settings_are_rejected_when_the_config_is_made(field):
    from ipd_agent import IPDConfig

    with pytest.raises(ValueError, match=f"transformer.{field} must be one of"):
        IPDConfig(transformer={field: "typo"})


def test_a_fresh_policy_gets_its_own_token_model_not_one_left_by_an_earlier_fit(hopper_traj):
    """The benchmark's prefit flow: ``fit(n_steps=0)`` under one setting (it fits a token model on the way), then
    other token settings and a real fit. The policy must be deployed with the new settings' token model (regression:
    the prefit's was kept, so token_expectile and rtg_relabel of benchmark variants had no effect at inference)."""
    import d3rlpy

    from conftest import tiny_config

    d3rlpy.seed(0)
    net = {"n_steps": 4, "hidden_size": 32, "n_layers": 1, "token_steps": 200}
    algo = tiny_config(augment={"enabled": False},
                       transformer={**net, "rtg_relabel": "max", "token_expectile": 0.5}).create(device="cpu:0")
    algo.fit(hopper_traj, n_steps=0, **FIT_KW)
    assert bool(algo.impl.token.fitted) and not algo.impl.stages.is_done("transformer")
    o = torch.from_numpy(hopper_traj.observations[:256])
    with torch.no_grad():
        prefit = algo.return_token(o).clone()
    algo.config.augment.enabled = True
    algo.config.transformer.rtg_relabel = "mc"
    algo.config.transformer.token_expectile = 0.99
    algo.fit(hopper_traj, n_steps=4, **FIT_KW)
    with torch.no_grad():
        used = algo.return_token(o).clone()
    algo.fit_return_token(expectile=0.99)  # what the new settings give, fitted directly
    with torch.no_grad():
        direct = algo.return_token(o)
    assert not torch.allclose(used, prefit)
    assert torch.allclose(used, direct)
    assert float(used.mean()) > float(prefit.mean())  # the 0.99 expectile sits above the 0.5 one


def test_token_floor_lifts_low_tokens_to_a_quantile_of_the_data_and_travels_with_the_model(loaded_copy, fitted,
                                                                                           tmp_path):
    """``transformer.token_floor=q`` deploys max(g(s), the q-quantile of g over the data's states): the same token
    model everywhere above the floor, the floor below it, in predict, the stateful wrapper, save/load and export."""
    algo = loaded_copy
    aug = algo.augment(fitted.traj, show_progress=False)
    o = torch.from_numpy(fitted.traj.observations)
    algo.fit_return_token(aug)
    assert algo.stage_metrics["return_token"]["floor"] is None
    g = algo.return_token(o).numpy()
    algo.config.transformer.token_floor = 0.75
    floor = algo.fit_return_token(aug)["floor"]  # same seed: the same token model, now floored
    assert floor == pytest.approx(float(np.quantile(g, 0.75)), rel=1e-5)
    floored = algo.return_token(o).numpy()
    np.testing.assert_allclose(floored, np.maximum(g, floor), rtol=1e-6)
    assert 0.7 < float((floored > g).mean()) < 0.8  # about the lowest three quarters were lifted
    w = algo.as_stateful_wrapper()
    w.predict(fitted.traj.observations[0], 0.0)
    assert float(w._ctx.rtg[0, 0]) == pytest.approx(float(floored[0]), rel=1e-6)
    path = str(tmp_path / "floored.d3")
    algo.save(path)
    again = load_ipd(path)
    assert again.config.transformer.token_floor == 0.75
    assert float(again.impl.token.floor) == pytest.approx(floor)
    obs = fitted.traj.observations[:32]
    np.testing.assert_allclose(again.predict(obs), algo.predict(obs), atol=1e-6)
    algo.save_policy(str(tmp_path / "p.pt"))
    mod = torch.jit.load(str(tmp_path / "p.pt"))
    k = algo.config.context_size
    a_exp = mod(o[:k], torch.zeros(k, algo.impl.action_size)).detach().numpy()
    ref = algo.impl.transformer(o[None, :k], torch.zeros(1, k, algo.impl.action_size),
                                torch.from_numpy(floored[None, :k]))[0, -1]
    np.testing.assert_allclose(a_exp, ref.detach().numpy(), atol=1e-5)
    algo.config.transformer.token_floor = None  # and off again: the plain token model
    algo.fit_return_token(aug)
    np.testing.assert_allclose(algo.return_token(o).numpy(), g, rtol=1e-6)


@pytest.mark.parametrize("settings", [{"token_floor": 1.5}, {"token_floor": -0.1},
                                      {"token_floor": 0.9, "return_token": "value"}])
def test_a_bad_token_floor_is_rejected_when_the_config_is_made(settings):
    from ipd_agent import IPDConfig

    with pytest.raises(ValueError, match="token_floor"):
        IPDConfig(transformer=settings)


def test_token_ratchet_deploys_the_running_maximum_of_g_within_each_episode(loaded_copy, fitted, tmp_path):
    """``transformer.token_ratchet`` conditions step t on max(g(s_0), ..., g(s_t)): the plain token model at the first
    step and wherever g rises, the highest token so far wherever it falls; per environment, restarted with the
    episode, saved with the model, and refused by the stateless export with a message that says what to do."""
    from ipd_agent import IPDPolicy

    algo = loaded_copy
    k = algo.config.context_size
    obs = fitted.traj.observations[:k]
    with torch.no_grad():
        g = algo.return_token(torch.from_numpy(obs)).numpy()
    assert np.any(np.diff(g) < 0)  # the sequence has drops for the ratchet to hold
    plain = algo.as_stateful_wrapper()
    for x in obs:
        plain.predict(x, 0.0)
    np.testing.assert_allclose(plain._ctx.rtg[0].numpy(), g, rtol=1e-6)  # off by default
    algo.config.transformer.token_ratchet = True
    w = algo.as_stateful_wrapper()
    for x in obs:
        w.predict(x, 0.0)
    np.testing.assert_allclose(w._ctx.rtg[0].numpy(), np.maximum.accumulate(g), rtol=1e-6)
    w.reset()  # a new episode starts from its own first token
    w.predict(obs[-1], 0.0)
    assert float(w._ctx.rtg[0, 0]) == pytest.approx(float(g[-1]), rel=1e-6)
    # two environments in one batch: each keeps its own maximum; episode_start restarts only its own
    pol = IPDPolicy(algo)
    hi, lo = int(np.argmax(g)), int(np.argmin(g))
    pol.predict(obs[[hi, hi]], episode_start=np.array([True, True]))
    pol.predict(obs[[lo, lo]], episode_start=np.array([False, True]))
    assert float(pol._ctx.rtg[0, 1]) == pytest.approx(float(g[hi]), rel=1e-6)  # held at its first step's token
    assert float(pol._ctx.rtg[1, 0]) == pytest.approx(float(g[lo]), rel=1e-6)  # a new episode: its own token
    path = str(tmp_path / "ratchet.d3")
    algo.save(path)
    assert load_ipd(path).config.transformer.token_ratchet is True
    with pytest.raises(ValueError, match="token_ratchet = False"):
        algo.save_policy(str(tmp_path / "p.pt"))
    assert not (tmp_path / "p.pt").exists()
    algo.config.transformer.token_ratchet = False


def test_a_token_ratchet_without_the_token_model_is_rejected_when_the_config_is_made():
    from ipd_agent import IPDConfig

    with pytest.raises(ValueError, match="token_ratchet"):
        IPDConfig(transformer={"token_ratchet": True, "return_token": "value"})
