"""Stage 4a: MPPI inside the world model, batched over branch states × candidates × elites.

One call to ``MPCPlanner.plan`` plans for every given start state at once: candidates are a
``[B, N, H, act]`` tensor, the model is stepped on ``[elites, B·N, ·]`` tensors, so the only Python
loops are over the horizon and the MPPI iterations.

A candidate is scored ``Σ_h γ^h r̂_h + γ^H V(ŝ_H)`` with the elites' mean prediction. Where a
candidate's step is untrusted (U > κ) it is cut before that step and bootstrapped with V of the
state it reached; after a predicted terminal it earns nothing more and gets no bootstrap.

Candidates are ranked in bf16 where the CPU has native bf16 (``PlannerConfig.bf16``; about 2x faster, the
world-model MLP is nearly all of the cost); the final choice against the warm start is made in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import PlannerConfig, native_cpu_bf16
from .value import ValueFunctions
from .world_model import WorldModel

__all__ = ["MPCPlanner", "PLANNER_EXECUTE"]

PLANNER_EXECUTE = ("best", "mean")  # PlannerConfig.execute: the best sampled candidate, or MPPI's weighted mean


class MPCPlanner:
    """MPPI planner warm-started from the IQL policy."""

    def __init__(self, world_model: WorldModel, value: ValueFunctions, cfg: PlannerConfig, gamma: float = 0.99,
                 action_low: float = -1.0, action_high: float = 1.0) -> None:
        self.wm, self.value, self.cfg, self.gamma = world_model, value, cfg, gamma
        self.low, self.high = action_low, action_high
        # bf16 only ranks candidates; the chosen plan, rescored in fp32, is within 0.5% of the fp32 choice's score
        # (benchmarks/speed.py). Only on CPU models: CUDA autocast would need its own check.
        self.bf16 = cfg.bf16 and native_cpu_bf16() and next(world_model.parameters()).device.type == "cpu"

    @torch.no_grad()
    def score(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Model return of action sequences: obs [B, o], actions [B, N, H, a] -> [B, N]."""
        b, n, h, a = actions.shape
        s = obs.unsqueeze(1).expand(b, n, obs.shape[-1]).reshape(b * n, -1)
        acts = actions.reshape(b * n, h, a)
        kappa = self.wm.threshold
        ret = torch.zeros(b * n, device=obs.device)
        alive = torch.ones(b * n, dtype=torch.bool, device=obs.device)
        disc = 1.0
        for t in range(h):
            mean, logvar, term = self.wm.predict_elites(s, acts[:, t])
            u = self.wm.uncertainty_from(mean, logvar)
            cut = alive & (u > kappa)
            if cut.any():
                ret = ret + torch.where(cut, disc * self.value.v(s), torch.zeros_like(ret))
            alive = alive & ~cut
            nxt, r = self.wm.denormalise(mean.mean(dim=0), s)
            ret = ret + torch.where(alive, disc * r, torch.zeros_like(ret))
            alive = alive & ~(term.mean(dim=0) > 0.0)  # predicted terminal: no more reward, no bootstrap
            disc *= self.gamma
            s = nxt
        ret = ret + torch.where(alive, disc * self.value.v(s), torch.zeros_like(ret))
        return ret.reshape(b, n)

    @torch.no_grad()
    def warm_start(self, obs: torch.Tensor) -> torch.Tensor:
        """IQL policy rolled through the mean model: [B, H, a]."""
        seq, s = [], obs
        for _ in range(self.cfg.horizon):
            a = self.value.act(s).clamp(self.low, self.high)
            seq.append(a)
            mean, _, _ = self.wm.predict_elites(s, a)
            s, _ = self.wm.denormalise(mean.mean(dim=0), s)
        return torch.stack(seq, dim=1)

    @torch.no_grad()
    def plan(self, obs: torch.Tensor, generator: Optional[torch.Generator] = None,
             return_info: bool = False):
        """First action of the chosen plan for each start state: obs [B, o] -> [B, a].

        The chosen plan is the best sampled candidate (``execute="best"``) or the MPPI mean after the last
        iteration (``execute="mean"``), replaced by the warm start wherever that scores higher.

        With ``return_info`` also returns a dict with the best plan, its score and the warm start's score.
        """
        cfg = self.cfg
        mu = self.warm_start(obs)  # [B, H, a]
        if cfg.greedy:
            return (mu[:, 0], {"plan": mu, "score": None, "warm_score": None}) if return_info else mu[:, 0]
        b, h, a = mu.shape
        n = cfg.n_samples
        warm = mu
        best_seq, best_score = mu, None
        for it in range(cfg.n_iterations):
            # drawn on the generator's device (a seeded CPU generator drives a CUDA model too), then moved
            gdev = obs.device if generator is None else generator.device
            eps = torch.randn((b, n, h, a), generator=generator, device=gdev).to(obs.device)
            cand = (mu.unsqueeze(1) + cfg.noise_std * eps).clamp(self.low, self.high)
            cand[:, 0] = mu  # the current mean is always a candidate, so MPC never loses to its warm start
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                scores = self.score(obs, cand).float()  # [B, N]
            top, arg = scores.max(dim=1)
            seq = cand[torch.arange(b, device=obs.device), arg]
            if best_score is None:
                best_score, best_seq = top, seq
            else:
                better = top > best_score
                best_score = torch.where(better, top, best_score)
                best_seq = torch.where(better[:, None, None], seq, best_seq)
            # MPPI update: softmax over standardised scores so the temperature is scale-free
            z = (scores - top[:, None]) / (scores.std(dim=1, keepdim=True) + 1e-6)
            w = torch.softmax(z / cfg.temperature, dim=1)
            mu = (w[:, :, None, None] * cand).sum(dim=1)
        if cfg.execute == "mean":  # MPPI's own output: the score-weighted average of the last candidates
            best_seq = mu
        # final choice in fp32 between the chosen plan and the warm start: MPC never returns a plan that scores below
        # its warm start, and the reported scores are the planner's exact (fp32) scores of what it returns
        final = self.score(obs, torch.stack([best_seq, warm], dim=1))  # [B, 2]
        keep_warm = final[:, 1] > final[:, 0]
        best_seq = torch.where(keep_warm[:, None, None], warm, best_seq)
        if return_info:
            return best_seq[:, 0], {"plan": best_seq, "score": final.max(dim=1).values, "warm_score": final[:, 1]}
        return best_seq[:, 0]
