"""The transformer's weight average (``transformer.ema_decay``): its arithmetic, and that fit deploys it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import FIT_KW, tiny_config


def _params(net):
    return [p.detach().clone() for p in net.parameters()]


def test_update_and_swap_arithmetic():
    from ipd_agent.transformer import WeightAverage

    net = nn.Linear(3, 2)
    w0 = _params(net)
    avg = WeightAverage(net, decay=0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    avg.update()  # first update: decay = min(0.5, 2/11), so the average moves 9/11 of the way
    for a, w in zip(avg.average, w0):
        torch.testing.assert_close(a, w + 9 / 11)
    raw = _params(net)
    avg.swap()
    assert avg.swapped
    for p, w in zip(net.parameters(), w0):
        torch.testing.assert_close(p.detach(), w + 9 / 11)
    with pytest.raises(RuntimeError, match="swapped in"):
        avg.update()
    avg.swap()
    for p, r in zip(net.parameters(), raw):
        assert torch.equal(p.detach(), r)  # swapping twice restores the raw weights exactly


def test_ema_decay_out_of_range_is_rejected_at_config_time():
    with pytest.raises(ValueError, match="ema_decay"):
        tiny_config(transformer={"ema_decay": 1.0})


def test_fit_deploys_the_average_and_training_goes_on_from_the_raw_weights(loaded_copy, hopper_traj, tmp_path):
    from ipd_agent import load_ipd

    algo = loaded_copy
    algo.config.transformer.ema_decay = 0.9
    obs = hopper_traj.observations[::25]
    seen = {}

    def on_step(model, epoch, step):
        if step == 20:  # the last step: what fit is about to deploy
            seen["raw"] = _params(model.impl.transformer)
            with model.deployed_weights():
                seen["avg"] = _params(model.impl.transformer)
                seen["pred"] = model.predict(obs)
            seen["raw_after"] = _params(model.impl.transformer)

    algo.fit(hopper_traj, n_steps=20, callback=on_step, **FIT_KW)
    final = _params(algo.impl.transformer)
    assert all(torch.equal(a, b) for a, b in zip(seen["raw_after"], seen["raw"]))  # the block restored them
    assert not all(torch.equal(a, b) for a, b in zip(seen["raw"], seen["avg"]))  # the average is not the iterate
    assert all(torch.equal(a, b) for a, b in zip(final, seen["avg"]))  # and it is what fit leaves in the model
    np.testing.assert_array_equal(algo.predict(obs), seen["pred"])
    path = str(tmp_path / "ema.d3")
    algo.save(path)
    np.testing.assert_array_equal(load_ipd(path).predict(obs), seen["pred"])  # saved and exported: the average
    last = algo.last_iterate_weights()  # the public accessor: copies of the raw weights of the last step
    assert all(torch.equal(a, b) for a, b in zip(last, seen["raw"]))
    last[0].add_(1.0)
    assert torch.equal(algo.last_iterate_weights()[0], seen["raw"][0])  # a copy: the model's own are untouched
    algo.fit(hopper_traj, n_steps=0, **FIT_KW)  # a continued fit swaps the raw weights back in, then out again
    np.testing.assert_array_equal(algo.predict(obs), seen["pred"])
    assert all(torch.equal(a, b) for a, b in zip(algo.last_iterate_weights(), seen["raw"]))
    algo.config.transformer.ema_decay = 0.0
    algo.fit(hopper_traj, n_steps=0, **FIT_KW)
    assert algo.last_iterate_weights() is None  # no average: the network itself holds the last iterate


def test_weights_loaded_over_a_fitted_average_are_not_swapped_away(loaded_copy, fitted, hopper_traj, tmp_path):
    """A continued fit swaps the raw weights back in only if the network still holds the average fit left."""
    algo = loaded_copy
    algo.config.transformer.ema_decay = 0.9
    algo.fit(hopper_traj, n_steps=5, **FIT_KW)
    fitted.algo.save_model(str(tmp_path / "weights.pt"))
    algo.load_model(str(tmp_path / "weights.pt"))  # other weights, loaded in place over the average
    obs = hopper_traj.observations[::25]
    expected = fitted.algo.predict(obs)
    np.testing.assert_array_equal(algo.predict(obs), expected)
    algo.fit(hopper_traj, n_steps=0, **FIT_KW)
    np.testing.assert_array_equal(algo.predict(obs), expected)
    # and the raw weights a further fit would train on are the loaded ones, not the first fit's stale iterate
    raw = algo.last_iterate_weights()
    assert all(torch.equal(r, p.detach()) for r, p in zip(raw, algo.impl.transformer.parameters()))


def test_the_warm_up_caps_the_decay_so_a_higher_decay_changes_nothing_within_its_horizon():
    """After n updates the decay is min(decay, (1 + n) / (10 + n)): within 5,000 updates (0.9982 at the last) 0.999 and
    0.9995 blend identically, which is why the `ema-0.9995` diagnostic repeated the CPU profile's runs exactly."""
    from ipd_agent.transformer import WeightAverage

    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    a, b = WeightAverage(net, decay=0.999), WeightAverage(net, decay=0.9995)
    with torch.no_grad():
        for _ in range(5000):
            for p in net.parameters():
                p.add_(0.01 * torch.randn_like(p))
            a.update()
            b.update()
    for x, y in zip(a.average, b.average):
        assert torch.equal(x, y)
    assert a.effective_decay() == b.effective_decay() == pytest.approx(0.9982, abs=1e-4)


def test_the_bias_corrected_average_is_the_normalised_decay_weighted_sum_of_every_iterate():
    """``ema_warmup="bias_corrected"``: after n updates the average is sum_t d^(n-t) w_t / sum_t d^(n-t) over the
    iterates w_1..w_n (Adam's correction), so the initial weights count for nothing and the span is 1 / (1 - d)."""
    from ipd_agent.transformer import WeightAverage

    torch.manual_seed(0)
    net = nn.Linear(3, 2).double()
    d, n = 0.99, 400
    avg = WeightAverage(net, decay=d, warmup="bias_corrected")
    iterates = []
    with torch.no_grad():
        for _ in range(n):
            for p in net.parameters():
                p.add_(torch.randn_like(p))  # a random walk: every iterate differs
            iterates.append(_params(net))
            avg.update()
    w = d ** np.arange(n - 1, -1, -1)
    w /= w.sum()
    for i, a in enumerate(avg.average):
        expected = sum(float(wt) * it[i] for wt, it in zip(w, iterates))
        torch.testing.assert_close(a, expected)
    capped = WeightAverage(net, decay=d)
    capped.n_updates = n
    assert avg.effective_decay() != capped.effective_decay()  # the two warm-ups differ at this n


def test_an_unknown_ema_warmup_is_rejected():
    from ipd_agent.transformer import WeightAverage

    with pytest.raises(ValueError, match="ema_warmup"):
        tiny_config(transformer={"ema_warmup": "bias-corrected"})
    with pytest.raises(ValueError, match="ema_warmup"):
        WeightAverage(nn.Linear(2, 2), 0.9, warmup="none")
