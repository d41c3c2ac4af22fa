"""Stage 6: the value-guided causal transformer (DESIGN §2.5).

* ``value_returns_to_go`` relabels every episode backwards, ``g_t = r_t + γ·max(g_{t+1}, V(s_{t+1}))``,
  so return tokens live on the value function's (discounted) scale; the last row bootstraps with
  ``V(s_end)`` unless it is a true terminal.
* ``WindowSampler`` keeps the whole training set as flat tensors and cuts context windows with one
  gather — no per-sample slicing.
* ``CausalTransformer`` reads two tokens per step, (g_t + s_t) and a_t (or DT's three, g_t, s_t, a_t,
  with ``tokens_per_step=3``), and predicts a_t from the state token, using fused ``scaled_dot_product_attention`` with a causal mask. DT's three tokens per step
  carry the same information (its s_t token sees g_t through attention); two cut the sequence, and so
  nearly all of the matmul work, by a third.

Windows start at any step and are right-padded at episode ends; with causal attention padding only
ever follows real tokens, so a window of n real steps is seen exactly as an n-step context at
inference (positions 0..n-1) — the same convention in training and deployment.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import TransformerNetConfig
from .data import Trajectories
from .value import map_rows

__all__ = ["value_returns_to_go", "taught_rows", "WindowSampler", "advantage_weights", "CausalTransformer",
           "value_guided_loss", "ReturnTokenModel", "fit_return_token_model", "set_token_floor", "WeightAverage",
           "EMA_WARMUPS", "set_parameters"]


RTG_RELABELS = ("max", "mc", "one_step")  # the return-token relabels value_returns_to_go knows (config checks these)


def value_returns_to_go(traj: Trajectories, v_next: np.ndarray, gamma: float, mode: str = "max") -> np.ndarray:
    """Return tokens on the value function's scale.

    ``mode="max"`` (QDT-style, DESIGN §2.5): g_t = r_t + γ·max(g_{t+1}, V(s_{t+1})); last row r + γ·V(s_end)·(1 − terminal).
    ``mode="one_step"``: g_t = r_t + γ·V(s_{t+1})·(1 − terminal_t), a one-step Q estimate whose scale matches V
    by construction, so conditioning on V(s_t) stays in-distribution even when V is under-trained.
    ``mode="mc"``: the plain discounted return g_t = r_t + γ·g_{t+1}, bootstrapped with V only on the last row.

    Vectorised over episodes: rows are processed in groups by their distance to the episode end.
    """
    if mode == "one_step":
        return (traj.rewards + gamma * np.where(traj.terminals, 0.0, v_next)).astype(np.float32)
    if mode not in RTG_RELABELS:
        raise ValueError(f"unknown return-token relabel {mode!r}: use one of {RTG_RELABELS}")
    n = traj.n_transitions
    g = np.zeros(n, dtype=np.float64)
    r = traj.rewards.astype(np.float64)
    v = v_next.astype(np.float64)
    ends = traj.episode_starts[1:][traj.episode_ids]  # exclusive end row of each row's episode
    dist = ends - 1 - np.arange(n)  # 0 on each episode's last row
    order = np.argsort(dist, kind="stable")
    bounds = np.searchsorted(dist[order], np.arange(dist.max() + 2))
    last = order[bounds[0]:bounds[1]]
    g[last] = r[last] + gamma * np.where(traj.terminals[last], 0.0, v[last])
    for d in range(1, int(dist.max()) + 1):
        rows = order[bounds[d]:bounds[d + 1]]
        nxt = g[rows + 1] if mode == "mc" else np.maximum(g[rows + 1], v[rows])
        g[rows] = r[rows] + gamma * nxt
    return g.astype(np.float32)


def taught_rows(traj: Trajectories, n_real_episodes: int) -> np.ndarray:
    """Rows whose action the transformer learns (and whose token the return-token model fits): every row of the
    first ``n_real_episodes`` (real) episodes and the imagined rows of spliced episodes. The real prefix of a
    spliced episode is context only: its return tokens carry the imagined future, which its (real, worse) actions
    did not earn, so regressing them would teach "high g -> the old action"."""
    return (traj.episode_ids < n_real_episodes) | traj.imagined


class WindowSampler:
    """Samples [B, K] context windows from flat tensors; real and imagined pools mixed by ratio."""

    def __init__(self, traj: Trajectories, rtg: np.ndarray, context: int, imagined_ratio: float,
                 n_real_episodes: Optional[int] = None, seed: int = 0, weights: Optional[np.ndarray] = None) -> None:
        self.k = context
        # per-row weight of each action as a training target (``advantage_weights``); None: all alike
        self.weight = None if weights is None else torch.from_numpy(np.asarray(weights, dtype=np.float32))
        self.obs = torch.from_numpy(traj.observations)
        self.act = torch.from_numpy(traj.actions)
        self.rtg = torch.from_numpy(rtg.astype(np.float32))
        ep = traj.episode_ids
        self.ep_end = torch.from_numpy(traj.episode_starts[1:][ep])  # exclusive end per row
        n_real = traj.n_episodes if n_real_episodes is None else n_real_episodes
        self.learn = torch.from_numpy(taught_rows(traj, n_real))
        real_rows = np.arange(traj.episode_starts[n_real])
        # imagined pool: window starts whose window reaches the imagined part of a spliced episode
        spliced = ep >= n_real
        first_im = np.full(traj.n_episodes, np.iinfo(np.int64).max)
        im_rows = np.flatnonzero(traj.imagined)
        np.minimum.at(first_im, ep[im_rows], im_rows)
        im_start = spliced & (np.arange(traj.n_transitions) >= first_im[ep] - context + 1)
        im_start &= np.arange(traj.n_transitions) >= traj.episode_starts[ep]
        self.real_pool = torch.from_numpy(real_rows)
        self.im_pool = torch.from_numpy(np.flatnonzero(im_start))
        self.ratio = imagined_ratio if len(self.im_pool) else 0.0
        self.gen = torch.Generator().manual_seed(seed)

    def sample(self, batch: int):
        """obs [B, K, o], act [B, K, a], rtg [B, K], mask [B, K] (1 where the token's action is a training target;
        with ``weights``, that row's weight instead, 0 elsewhere)."""
        n_im = int(round(batch * self.ratio))
        parts = [self.real_pool[torch.randint(0, len(self.real_pool), (batch - n_im,), generator=self.gen)]]
        if n_im:
            parts.append(self.im_pool[torch.randint(0, len(self.im_pool), (n_im,), generator=self.gen)])
        start = torch.cat(parts)
        idx = start[:, None] + torch.arange(self.k)[None, :]
        mask = idx < self.ep_end[start][:, None]
        idx = torch.where(mask, idx, start[:, None])  # padded slots point at a real row; masked out of the loss
        mask = mask & self.learn[idx]
        if self.weight is not None:
            mask = mask * self.weight[idx]
        return self.obs[idx], self.act[idx], self.rtg[idx], mask


def advantage_weights(value, obs: np.ndarray, act: np.ndarray, beta: float, batch: int = 16384) -> np.ndarray:
    """min(exp(beta * (Q(s, a) - V(s))), max_weight) per row, with A on IQL's reward scale, so ``beta`` means what
    IQL's ``weight_temp`` means (its actor uses 3), and the clip is IQL's own (a few rows cannot take over a batch).
    ``value`` is the frozen stage-1 ``ValueFunctions``."""
    def weight(o: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        adv = (value.q(o, a) - value.v(o)) * value.reward_scale
        return torch.exp(beta * adv).clamp(max=value.max_weight)

    return map_rows(weight, obs, act, batch=batch, device=value.reward_scale.device)


class Block(nn.Module):
    """Pre-norm transformer block with fused causal attention."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads, self.dropout = heads, dropout
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class CausalTransformer(nn.Module):
    """Tokens (g_t + s_t), a_t (or g_t, s_t, a_t) per step -> a_t predicted from the state token, tanh-bounded."""

    def __init__(self, obs_dim: int, act_dim: int, context: int, cfg: TransformerNetConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        if d % cfg.n_heads:
            raise ValueError(f"transformer.hidden_size ({d}) must be divisible by n_heads ({cfg.n_heads})")
        self.context = context
        self.embed_rtg = nn.Linear(1, d)
        self.embed_obs = nn.Linear(obs_dim, d)
        self.embed_act = nn.Linear(act_dim, d)
        self.pos = nn.Parameter(torch.zeros(1, context, d))  # position inside the window
        self.tokens = cfg.tokens_per_step
        if self.tokens not in (2, 3):
            raise ValueError(f"transformer.tokens_per_step must be 2 or 3, got {self.tokens}")
        self.kind = nn.Parameter(torch.zeros(self.tokens, d))  # token type: (return, state | return+state), action
        self.ln_in = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_layers))
        self.ln_out = nn.LayerNorm(d)
        self.head = nn.Linear(d, act_dim)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.kind, std=0.02)
        # normalisation of inputs, set from the training data and saved with the model
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.register_buffer("rtg_scale", torch.ones(()))

    def forward(self, obs: torch.Tensor, act: torch.Tensor, rtg: torch.Tensor) -> torch.Tensor:
        """obs [B, T, o], act [B, T, a], rtg [B, T] with T <= context -> actions [B, T, a]."""
        b, t, _ = obs.shape
        pos = self.pos[:, :t]
        g = self.embed_rtg((rtg / self.rtg_scale).unsqueeze(-1))
        s = self.embed_obs((obs - self.obs_mean) / self.obs_std)
        a = self.embed_act(act) + pos + self.kind[-1]
        if self.tokens == 2:
            seq = [g + s + pos + self.kind[0], a]  # gs_0 a_0 gs_1 a_1 ...
        else:
            seq = [g + pos + self.kind[0], s + pos + self.kind[1], a]  # g_0 s_0 a_0 g_1 s_1 a_1 ... (DT layout)
        n = self.tokens
        x = torch.stack(seq, dim=2).reshape(b, n * t, -1)
        x = self.drop(self.ln_in(x))
        for blk in self.blocks:
            x = blk(x)
        x = self.ln_out(x).reshape(b, t, n, -1)[:, :, n - 2]  # outputs at the state tokens
        return torch.tanh(self.head(x))


def value_guided_loss(pred: torch.Tensor, act: torch.Tensor, obs: torch.Tensor, mask: torch.Tensor,
                      q_fn, alpha: float) -> tuple[torch.Tensor, dict]:
    """L = E‖a − π‖² − α·Q(s, π)/mean|Q| over real (unpadded) tokens (QT-style normalisation); a float ``mask``
    weighs the tokens (a weighted mean)."""
    m = mask.float()
    denom = m.sum().clamp_min(1.0)
    bc = (((pred - act) ** 2).sum(-1) * m).sum() / denom
    metrics = {"bc_loss": bc.item()}
    if alpha <= 0.0:
        return bc, metrics
    q = q_fn(obs, pred)
    q_scale = (q.abs() * m).sum().detach() / denom
    q_term = (q * m).sum() / denom / (q_scale + 1e-6)
    metrics["q_pi"] = ((q * m).sum() / denom).item()
    return bc - alpha * q_term, metrics


class ReturnTokenModel(nn.Module):
    """g(s): an upper expectile of the training return tokens at state s (``return_token="upper"``).

    Why: V(s) from IQL (expectile 0.7 of Q) sits below the tokens the best episodes carry from the same state,
    so conditioning on V(s) asks the transformer for ordinary behaviour. Where ordinary behaviour is poor (a
    halfcheetah at rest), the policy copies it and never leaves that state. An upper expectile of the very
    tokens the transformer was trained on asks for the best return seen from states like s, and is
    in-distribution by construction.
    """

    def __init__(self, obs_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.register_buffer("g_mean", torch.zeros(()))
        self.register_buffer("g_std", torch.ones(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        # lowest token deployed (``transformer.token_floor``); -inf: none
        self.register_buffer("floor", torch.tensor(float("-inf")))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """obs [..., obs_dim] -> token [...]."""
        z = self.net((obs - self.obs_mean) / self.obs_std).squeeze(-1)
        return torch.maximum(z * self.g_std + self.g_mean, self.floor)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # models saved before the floor existed load with none
        state_dict.setdefault(prefix + "floor", torch.tensor(float("-inf")))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def fit_return_token_model(model: ReturnTokenModel, obs: np.ndarray, g: np.ndarray, expectile: float,
                           n_steps: int, seed: int, batch_size: int = 256, lr: float = 1e-3) -> float:
    """Expectile regression of tokens g on states; own RNG, so the caller's random streams are untouched.

    Returns the final mini-batch loss."""
    if not 0.5 <= expectile < 1.0:
        raise ValueError(f"transformer.token_expectile must be in [0.5, 1), got {expectile}")
    dev = model.obs_mean.device
    o = torch.from_numpy(np.asarray(obs, np.float32)).to(dev)
    y = torch.from_numpy(np.asarray(g, np.float32)).to(dev)
    with torch.no_grad():
        model.obs_mean.copy_(o.mean(0))
        model.obs_std.copy_(o.std(0) + 1e-6)
        model.g_mean.fill_(float(y.mean()))
        model.g_std.fill_(float(y.std()) + 1e-6)
    yn = (y - model.g_mean) / model.g_std
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for layer in model.net:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, n_steps))
    model.train()
    loss = torch.zeros((), device=dev)
    for _ in range(n_steps):
        idx = torch.randint(0, len(o), (batch_size,), generator=gen).to(dev)
        diff = yn[idx] - model.net((o[idx] - model.obs_mean) / model.obs_std).squeeze(-1)
        # asymmetric squared loss: under-predictions weigh `expectile`, over-predictions 1 - expectile
        loss = (torch.where(diff > 0, expectile, 1.0 - expectile) * diff ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    model.fitted.fill_(True)
    model.floor.fill_(float("-inf"))  # a refit token model starts without one: set_token_floor sets it
    return float(loss.detach())


@torch.no_grad()
def set_token_floor(model: ReturnTokenModel, obs: np.ndarray, quantile: Optional[float]) -> Optional[float]:
    """Sets the token model's floor to the ``quantile`` of its own g(s) over ``obs`` (the data's states); None
    removes it. Returns the floor.

    Why: g(s) follows the data, and near the states where the data's episodes ended (a hopper about to fall) it asks
    for the little those episodes earned, and the transformer copies them. A DT target never drops like that. The
    floor keeps asking for at least what the data's better states can earn."""
    model.floor.fill_(float("-inf"))
    if quantile is None:
        return None
    if not model.fitted:
        raise RuntimeError("set_token_floor needs a fitted token model (fit_return_token_model first).")
    g = model(torch.from_numpy(np.asarray(obs, np.float32)).to(model.obs_mean.device)).cpu().numpy()
    model.floor.fill_(float(np.quantile(g, quantile)))
    return float(model.floor)


EMA_WARMUPS = ("capped", "bias_corrected")


@torch.no_grad()
def set_parameters(net: nn.Module, weights: list) -> None:
    """Copies ``weights`` (tensors in ``net.parameters()`` order, e.g. a ``WeightAverage``'s or
    ``IPD.last_iterate_weights()``) into ``net`` in place."""
    for p, w in zip(net.parameters(), weights):
        p.copy_(w)


class WeightAverage:
    """Exponential moving average of a network's parameters, swapped into the network for evaluation and deployment.

    One iterate of the policy can swing a lot between nearby steps (hopper full-replay, seeds 0-2: 85-88 at 80 % of
    training, 39-81 at the last step); the average over the last steps is one policy that does not depend on where
    training happened to stop. The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so the average
    spans about the last (10 + n) / 9 steps until n = 9 / (1 - decay) - 10 (8,990 updates for 0.999), and 1 / (1 -
    decay) after: over 5,000 steps 0.999 ends at 0.9982 (about 560 steps), and any decay above that deploys the same
    weights (``ema-0.9995`` in benchmarks/head_to_head.py repeated the profile's runs episode for episode).
    ``warmup="bias_corrected"`` instead weights every iterate since the first update by decay^age and normalises (Adam's
    bias correction), so the average spans about 1 / (1 - decay) steps from the start: at 5,000 steps 0.999 spans
    about 1,000 and 0.9995 about 2,000, with the initial weights given no weight at all.
    ``swap()`` exchanges the two sets of weights in place, so calling it twice restores the network exactly.
    """

    def __init__(self, net: nn.Module, decay: float, warmup: str = "capped") -> None:
        if warmup not in EMA_WARMUPS:
            raise ValueError(f"ema_warmup must be one of {EMA_WARMUPS}, got {warmup!r}")
        self.params = [p for p in net.parameters()]
        self.average = [p.detach().clone() for p in self.params]
        self.decay = decay
        self.warmup = warmup
        self.n_updates = 0  # a resumed fit restores it from its train state
        self.swapped = False  # True while the network holds the average (and ``average`` the raw weights)
        self.deployed: list = []  # the average as fit left it in the network

    @torch.no_grad()
    def update(self) -> None:
        if self.swapped:
            raise RuntimeError("WeightAverage.update() while the average is swapped in; swap() back first")
        self.n_updates += 1
        decay = self.effective_decay()
        for a, p in zip(self.average, self.params):
            a.lerp_(p.detach(), 1.0 - decay)

    def effective_decay(self) -> float:
        """The decay the latest update used: the first updates follow the weights closely, so the random
        initialisation is forgotten quickly."""
        if self.warmup == "bias_corrected":  # 1 - (1 - d) / (1 - d^n): the n-th iterate's share of the normalised sum
            return 1.0 - (1.0 - self.decay) / (1.0 - self.decay ** max(1, self.n_updates))
        return min(self.decay, (1 + self.n_updates) / (10 + self.n_updates))

    @torch.no_grad()
    def swap(self) -> None:
        for a, p in zip(self.average, self.params):
            tmp = p.detach().clone()
            p.copy_(a)
            a.copy_(tmp)
        self.swapped = not self.swapped


LR_SCHEDULES = ("constant", "cosine")


def lr_lambda(warmup: int, schedule: str = "constant", horizon: int = 0):
    """The learning-rate factor at each optimiser step: a linear warm-up over ``warmup`` steps, then 1 ("constant")
    or a half cosine from 1 down to 0 at step ``horizon`` and 0 after it ("cosine").

    ``step`` counts optimiser steps from 0, as ``LambdaLR`` passes it."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, warmup))
        if schedule == "constant" or step < warmup:
            return warm
        progress = min(1.0, (step + 1 - warmup) / max(1, horizon + 1 - warmup))  # the last step's rate is not 0
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
