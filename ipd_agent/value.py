"""Stage 1: the quasi-optimal value function, learned with d3rlpy's IQL (not re-implemented).

``ValueFunctions`` wraps IQL's networks as one frozen torch module that answers in *unscaled*
reward units: IQL trains on rewards multiplied by ``reward_scale`` (d3rlpy's
ReturnBasedRewardScaler), so we divide its outputs by the same factor.
"""
from __future__ import annotations

from typing import Callable, Optional

import d3rlpy
import numpy as np
import torch
from torch import nn

from .config import ValueConfig

__all__ = ["ValueFunctions", "make_iql", "fit_value_functions", "map_rows", "module_device"]


def map_rows(fn: Callable[..., torch.Tensor], *arrays: np.ndarray, batch: int = 16384,
             device: Optional[torch.device] = None) -> np.ndarray:
    """``fn`` over row chunks of equally long arrays (float32 tensors in, one value per row out), without autograd:
    the frozen stage-1 networks see a whole dataset at once without holding it all in activations. ``device``: where
    ``fn``'s networks live (the chunks go there; the result comes back as numpy)."""
    n = len(arrays[0])
    with torch.no_grad():
        out = [fn(*(torch.from_numpy(np.ascontiguousarray(a[i:i + batch], dtype=np.float32)).to(device)
                    for a in arrays)).cpu().numpy()
               for i in range(0, n, batch)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def module_device(module: nn.Module) -> torch.device:
    """The device a module's weights live on (``cpu`` or ``cuda:N``): where its inputs must be sent."""
    return next(module.parameters()).device


def make_iql(cfg: ValueConfig, device: str) -> "d3rlpy.algos.IQL":
    """d3rlpy IQL with its D4RL-locomotion recipe (expectile 0.7, weight_temp 3, return-based reward scale)."""
    enc = d3rlpy.models.VectorEncoderFactory(hidden_units=list(cfg.hidden_units))
    return d3rlpy.algos.IQLConfig(
        batch_size=cfg.batch_size,
        expectile=cfg.expectile,
        weight_temp=cfg.weight_temp,
        tau=cfg.tau,
        actor_encoder_factory=enc,
        critic_encoder_factory=enc,
        value_encoder_factory=enc,
        reward_scaler=d3rlpy.preprocessing.ReturnBasedRewardScaler(multiplier=cfg.reward_multiplier),
    ).create(device=device)


class ValueFunctions(nn.Module):
    """V(s), Q(s, a) = min(Q1, Q2) and the IQL policy, frozen, in unscaled reward units."""

    def __init__(self, iql: "d3rlpy.algos.IQL") -> None:
        super().__init__()
        assert iql.impl is not None
        mods = iql.impl.modules
        self.value_func = mods.value_func
        self.q_funcs = mods.q_funcs
        self.policy = mods.policy
        # IQL's clip on its actor's exp(weight_temp * A) weights, read from the fitted IQL so the two cannot drift
        self.max_weight = float(iql.config.max_weight)
        # rewards were multiplied by this before IQL saw them; set after IQL is fitted
        self.register_buffer("reward_scale", torch.ones(()))

    def set_reward_scale(self, scaler: Optional[d3rlpy.preprocessing.ReturnBasedRewardScaler]) -> None:
        if scaler is None or scaler.return_max is None:
            self.reward_scale.fill_(1.0)
        else:
            span = max(float(scaler.return_max) - float(scaler.return_min), 1e-6)
            self.reward_scale.fill_(scaler.multiplier / span)

    def v(self, obs: torch.Tensor) -> torch.Tensor:
        """V(s) for obs [..., obs_dim] -> [...]."""
        shape = obs.shape[:-1]
        out = self.value_func(obs.reshape(-1, obs.shape[-1]))
        return (out.reshape(shape) / self.reward_scale)

    def q(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """min(Q1, Q2)(s, a) -> [...]; differentiable in ``act``."""
        shape = obs.shape[:-1]
        o = obs.reshape(-1, obs.shape[-1])
        a = act.reshape(-1, act.shape[-1])
        qs = torch.stack([qf(o, a).q_value.reshape(-1) for qf in self.q_funcs])
        return qs.min(dim=0).values.reshape(shape) / self.reward_scale

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic IQL policy action (the MPC warm start)."""
        shape = obs.shape[:-1]
        out = self.policy(obs.reshape(-1, obs.shape[-1])).squashed_mu
        return out.reshape(*shape, -1)

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()


def fit_value_functions(
    iql: "d3rlpy.algos.IQL",
    dataset,
    cfg: ValueConfig,
    logger_adapter,
    show_progress: bool,
    experiment_name: str,
) -> None:
    """Runs d3rlpy IQL's own fit loop (its progress bar and logger) on the real data."""
    n_per_epoch = min(cfg.n_steps, 10_000)
    iql.fit(
        dataset,
        n_steps=cfg.n_steps,
        n_steps_per_epoch=n_per_epoch,
        experiment_name=experiment_name,
        logger_adapter=logger_adapter,
        show_progress=show_progress,
        save_interval=10**9,
    )
