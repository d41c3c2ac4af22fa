"""Stage 7: value-conditioned inference (DESIGN §2.6).

``TransformerContext`` keeps the last K (g, s, a) tokens for each of ``n_envs`` environments and runs
one batched forward per step. The return token comes from the state at every step (``rtg_mode="value"``):
the fitted return-token model, or ``V(s_t)`` with ``transformer.return_token="value"``, so no target return
is needed. ``rtg_mode="target"`` is the DT-style alternative on the same discounted
scale the transformer was trained on: g_0 = target, then g_{t+1} = (g_t − r_t)/γ, the exact inverse
of the training relabel's ``g_t = r_t + γ·g_{t+1}``.

Two front ends share it:
* ``StatefulIPDWrapper`` — d3rlpy's stateful protocol (``predict(x, reward)``, ``reset()``), so
  d3rlpy's ``evaluate_transformer_with_environment`` evaluates IPD exactly as it evaluates DT.
* ``IPDPolicy`` — the Stable-Baselines3 contract ``predict(observation, state, episode_start,
  deterministic) -> (action, state)`` for single observations or VecEnv batches.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from .value import module_device

__all__ = ["TransformerContext", "StatefulIPDWrapper", "IPDPolicy", "ExportablePolicy", "median_action"]


def median_action(actions: list) -> torch.Tensor:
    """The element-wise median of the members' actions (a list of M tensors shaped alike; the mean of the middle two
    for even M, exactly the one member's action for M = 1): a member about to act far from the others is outvoted."""
    m = len(actions)  # a Python int, so an exported trace keeps no branch on a tensor
    if m == 1:
        return actions[0]
    ordered = torch.stack(actions).sort(dim=0).values
    return (ordered[(m - 1) // 2] + ordered[m // 2]) / 2


class TransformerContext:
    """Rolling (g, s, a) windows for several environments, advanced in one batched call.

    With ``transformer.n_members > 1`` every member keeps its own return tokens over the shared observations and
    actions; the executed action is the median of the members' actions and is what every member's context records.
    ``members``: deploy only these members (default: all)."""

    def __init__(self, algo: Any, n_envs: int = 1, rtg_mode: str = "value", target_return: Optional[float] = None,
                 members: Optional[list] = None):
        if rtg_mode not in ("value", "target"):
            raise ValueError(f"rtg_mode must be 'value' or 'target', got {rtg_mode!r}")
        if rtg_mode == "target" and target_return is None:
            raise ValueError("rtg_mode='target' needs target_return (a discounted return on the value scale)")
        impl = algo.impl
        if impl is None:
            raise RuntimeError("The algorithm is not built yet: call fit() or load a saved model first.")
        impl.modules.set_eval()  # deployment: no dropout
        members = list(range(impl.n_members)) if members is None else list(members)
        if not members or not set(members) <= set(range(impl.n_members)):
            raise ValueError(f"members must be a non-empty list of this model's members 0..{impl.n_members - 1} "
                             f"(transformer.n_members={impl.n_members}), got {members!r}")
        self.nets = [impl.member(m)[0] for m in members]
        self.gamma = algo.config.gamma
        # V(s) or each member's token model
        self.tokens = [algo.return_token_module(m) for m in members] if rtg_mode == "value" else None
        # transformer.token_ratchet: g_t = max(g(s_t), g_{t-1}) within an episode
        self.ratchet = rtg_mode == "value" and bool(getattr(algo.config.transformer, "token_ratchet", False))
        self.k, self.obs_dim, self.act_dim = algo.config.context_size, impl.observation_shape[0], impl.action_size
        self.rtg_mode, self.target_return, self.n_envs = rtg_mode, target_return, n_envs
        self.device = module_device(self.nets[0])  # the windows live beside the networks
        self.reset()

    @property
    def rtg(self) -> torch.Tensor:
        """The return tokens of the (first) member, [n_envs, K]; every member's are in ``rtgs`` [M, n_envs, K]."""
        return self.rtgs[0]

    def reset(self, which: Optional[np.ndarray] = None) -> None:
        """Clears the context of every environment, or of those where ``which`` is True."""
        if which is None:
            n, dev = self.n_envs, self.device
            self.obs = torch.zeros(n, self.k, self.obs_dim, device=dev)
            self.act = torch.zeros(n, self.k, self.act_dim, device=dev)
            self.rtgs = torch.zeros(len(self.nets), n, self.k, device=dev)  # each member's own tokens
            self.length = torch.zeros(n, dtype=torch.long, device=dev)
            self.remaining = torch.full((n,), float(self.target_return or 0.0), device=dev)
            # highest token each member asked so far (ratchet)
            self.peak = torch.full((len(self.nets), n), float("-inf"), device=dev)
            return
        w = torch.as_tensor(np.asarray(which, dtype=bool)).to(self.device)
        self.obs[w], self.act[w], self.rtgs[:, w], self.length[w] = 0.0, 0.0, 0.0, 0
        self.remaining[w] = float(self.target_return or 0.0)
        self.peak[:, w] = float("-inf")

    @torch.no_grad()
    def step(self, obs: np.ndarray, last_reward: Optional[np.ndarray] = None) -> np.ndarray:
        """Appends s_t (and the reward r_{t-1} for target mode) and returns a_t for every env: [n, act]."""
        obs = np.asarray(obs, dtype=np.float32)
        if not np.all(np.isfinite(obs)):  # before anything is appended: the contexts stay as they were
            raise ValueError("predict got NaN/inf observations.")
        o = torch.as_tensor(obs).reshape(self.n_envs, self.obs_dim).to(self.device)
        started = self.length > 0
        if self.rtg_mode == "target" and last_reward is not None:
            r = torch.as_tensor(np.asarray(last_reward, dtype=np.float32)).reshape(self.n_envs).to(self.device)
            self.remaining = torch.where(started, (self.remaining - r) / self.gamma, self.remaining)
        full = self.length >= self.k
        if full.any():  # drop the oldest token of full windows
            self.obs[full] = torch.roll(self.obs[full], -1, dims=1)
            self.act[full] = torch.roll(self.act[full], -1, dims=1)
            self.rtgs[:, full] = torch.roll(self.rtgs[:, full], -1, dims=2)
        slot = torch.clamp(self.length, max=self.k - 1)
        rows = torch.arange(self.n_envs, device=self.device)
        self.obs[rows, slot] = o
        self.act[rows, slot] = 0.0  # a_t is what we predict; causal attention never lets s_t see it anyway
        if self.rtg_mode == "value":
            g = torch.stack([token(o) for token in self.tokens])  # [M, n]; small MLPs, one per member
            if self.ratchet:
                g = self.peak = torch.maximum(g, self.peak)
            self.rtgs[:, rows, slot] = g
        else:
            self.rtgs[:, rows, slot] = self.remaining
        self.length = torch.clamp(self.length + 1, max=self.k)
        # right padding follows, causal: no effect. One call per member: batching them through torch.func.vmap was
        # slower on the CPU (torch has no vmap rule for CPU flash attention and falls back to one sample at a time)
        pred = median_action([net(self.obs, self.act, self.rtgs[i])[rows, slot] for i, net in enumerate(self.nets)])
        self.act[rows, slot] = pred  # the executed action, in every member's context
        return pred.cpu().numpy()


class StatefulIPDWrapper:
    """d3rlpy ``StatefulTransformerAlgoProtocol`` for IPD: ``predict(x, reward) -> action``, ``reset()``."""

    def __init__(self, algo: Any, rtg_mode: str = "value", target_return: Optional[float] = None,
                 members: Optional[list] = None) -> None:
        self._algo = algo
        self._ctx = TransformerContext(algo, 1, rtg_mode, target_return, members)

    def predict(self, x: np.ndarray, reward: float = 0.0) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.shape != (self._ctx.obs_dim,):
            raise ValueError(f"observation shape {x.shape} does not match the model's ({self._ctx.obs_dim},)")
        return self._ctx.step(x[None], np.array([reward], np.float32))[0]

    def reset(self) -> None:
        self._ctx.reset()

    @property
    def algo(self) -> Any:
        return self._algo


class IPDPolicy:
    """Stable-Baselines3-style deployable policy backed by a fitted IPD model.

    ``predict`` accepts one observation ``[obs_dim]`` or a VecEnv batch ``[n_envs, obs_dim]`` and keeps one
    transformer context per environment; contexts are reset where ``episode_start`` is True.
    """

    def __init__(self, algo: Any, action_space: Any = None) -> None:
        if action_space is not None:
            from .data import check_unit_box

            check_unit_box(action_space, "action_space")
        self.algo = algo
        self.action_space = action_space
        self._ctx: Optional[TransformerContext] = None

    @classmethod
    def load(cls, path: str, action_space: Any = None) -> "IPDPolicy":
        """Loads a model saved with ``IPD.save`` (same as ``d3rlpy.load_learnable``)."""
        from .algo import load_ipd

        return cls(load_ipd(path), action_space)

    def predict(self, observation: np.ndarray, state: Any = None, episode_start: Optional[np.ndarray] = None,
                deterministic: bool = True) -> tuple[np.ndarray, Any]:
        """Returns (action, state) shaped like the action space (batched when the observation is)."""
        obs = np.asarray(observation, dtype=np.float32)
        obs_dim = self.algo.impl.observation_shape[0]
        single = obs.ndim == 1
        if obs.shape[-1:] != (obs_dim,) or obs.ndim > 2:
            raise ValueError(f"observation shape {obs.shape} does not match the model: expected ({obs_dim},) or "
                             f"(n_envs, {obs_dim})")
        batch = obs.reshape(-1, obs_dim)
        n = len(batch)
        if self._ctx is None or self._ctx.n_envs != n:
            self._ctx = TransformerContext(self.algo, n, "value")
        if episode_start is not None:
            starts = np.asarray(episode_start, dtype=bool).reshape(n)
            if starts.any():
                self._ctx.reset(starts)
        act = self._ctx.step(batch)
        if self.action_space is not None:
            act = np.clip(act, self.action_space.low, self.action_space.high).astype(self.action_space.dtype)
        return (act[0] if single else act), None

    def reset(self) -> None:
        self._ctx = None


class ExportablePolicy(nn.Module):
    """One deployment step as a pure function, for TorchScript / ONNX export.

    ``forward(observations [T, obs], actions [T, act]) -> action [act]``: return tokens g_t are computed inside
    (V(s) or the return-token model), exactly as ``TransformerContext`` does in value mode; with several members,
    each with its own tokens, and the median of their actions.
    """

    def __init__(self, nets: list, tokens: list) -> None:
        super().__init__()
        # tokens: obs -> g (V(s) or each member's fitted return-token model)
        self.nets, self.tokens = nn.ModuleList(nets), nn.ModuleList(tokens)

    def forward(self, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        obs = observations.unsqueeze(0)
        act = torch.cat([actions[:-1], torch.zeros_like(actions[-1:])], dim=0).unsqueeze(0)
        return median_action([net(obs, act, token(obs))[0, -1] for net, token in zip(self.nets, self.tokens)])
