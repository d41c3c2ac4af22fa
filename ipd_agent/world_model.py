"""Stage 2: probabilistic ensemble world model with a calibrated uncertainty threshold.

Every layer holds the weights of all E members in one ``[E, in, out]`` tensor, so the whole
ensemble runs as a handful of batched matmuls (``torch.baddbmm``) — no loop over members.
Each member predicts a diagonal Gaussian over the normalised (Δs, r) and a termination logit.
``uncertainty`` is the mean pairwise divergence between the elites' Gaussians, and ``threshold``
(κ) is its q-quantile on the dataset's own (s, a) pairs.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import WorldModelConfig

__all__ = ["EnsembleLinear", "WorldModel", "fit_world_model"]


class EnsembleLinear(nn.Module):
    """``E`` independent linear layers evaluated as one batched matmul: [E, B, in] -> [E, B, out]."""

    def __init__(self, n_members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_members, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(n_members, 1, out_features))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)  # same scale as nn.Linear's default
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class WorldModel(nn.Module):
    """Ensemble of Gaussian MLPs over (Δs, r) plus a termination logit, with normalisation built in."""

    def __init__(self, obs_dim: int, act_dim: int, cfg: WorldModelConfig) -> None:
        super().__init__()
        self.obs_dim, self.act_dim, self.cfg = obs_dim, act_dim, cfg
        e, h = cfg.n_members, cfg.hidden_size
        self.target_dim = obs_dim + 1  # Δs and r
        dims = [obs_dim + act_dim] + [h] * cfg.n_layers
        self.layers = nn.ModuleList(EnsembleLinear(e, i, o) for i, o in zip(dims[:-1], dims[1:]))
        self.head = EnsembleLinear(e, h, 2 * self.target_dim + 1)
        # learnable log-variance bounds (PETS): soft-clamped so variance never explodes or collapses
        self.max_logvar = nn.Parameter(torch.full((1, 1, self.target_dim), 0.5))
        self.min_logvar = nn.Parameter(torch.full((1, 1, self.target_dim), -10.0))
        for name, dim in (("in_mean", obs_dim + act_dim), ("in_std", obs_dim + act_dim),
                          ("out_mean", self.target_dim), ("out_std", self.target_dim)):
            self.register_buffer(name, torch.zeros(dim) if "mean" in name else torch.ones(dim))
        self.register_buffer("elites", torch.arange(cfg.n_elites))
        self.register_buffer("threshold", torch.tensor(float("inf")))  # κ, set by calibrate_threshold
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("term_pos_weight", torch.ones(()))  # set from the data's terminal rate

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the terminal up-weighting were trained unweighted
        state_dict.setdefault(prefix + "term_pos_weight", torch.ones(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----- core forward --------------------------------------------------------------------
    def _forward_norm(self, x: torch.Tensor, members: Optional[torch.Tensor] = None):
        """x: [M, B, in] normalised input for members (all E if ``members`` is None)."""
        inplace = not torch.is_grad_enabled()  # planning and rollouts: in-place SiLU skips a large allocation (~2x)
        for layer in self.layers:
            w, b = (layer.weight, layer.bias) if members is None else (layer.weight[members], layer.bias[members])
            x = F.silu(torch.baddbmm(b, x, w), inplace=inplace)
        w, b = (self.head.weight, self.head.bias) if members is None else (self.head.weight[members], self.head.bias[members])
        out = torch.baddbmm(b, x, w)
        d = self.target_dim
        mean, logvar, term = out[..., :d], out[..., d:2 * d], out[..., 2 * d]
        logvar = self.max_logvar - F.softplus(self.max_logvar - logvar)
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean, logvar, term

    def normalise_input(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return (torch.cat([obs, act], dim=-1) - self.in_mean) / self.in_std

    def predict_elites(self, obs: torch.Tensor, act: torch.Tensor):
        """Elite Gaussians for a batch: mean/logvar [n_elites, B, obs+1] (normalised space), term logit [n_elites, B]."""
        x = self.normalise_input(obs, act)
        x = x.unsqueeze(0).expand(len(self.elites), *x.shape)
        return self._forward_norm(x, self.elites)

    def denormalise(self, mean_norm: torch.Tensor, obs: torch.Tensor):
        """(next_obs, reward) from a normalised (Δs, r) prediction."""
        y = mean_norm * self.out_std + self.out_mean
        return obs + y[..., : self.obs_dim], y[..., self.obs_dim]

    # ----- what the planner uses ------------------------------------------------------------
    def uncertainty_from(self, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """U from elite predictions [M, B, D] -> [B]."""
        if self.cfg.uncertainty == "disagreement":
            centre = mean.mean(dim=0, keepdim=True)
            return (mean - centre).norm(dim=-1).max(dim=0).values
        if self.cfg.uncertainty != "gjs":
            raise ValueError(f"unknown uncertainty {self.cfg.uncertainty!r}: use 'gjs' or 'disagreement'")
        # geometric Jensen-Shannon (skew 1/2) between every pair of elites, summed over dims, averaged over pairs.
        # It is symmetric, so only the M(M-1)/2 unordered pairs are computed, in closed form: with s = v1 + v2,
        # JS = ¼[log 4 + lv1 + lv2 − 2 log s + s²/(2 v1 v2) + (v1² + v2²)(m1 − m2)²/(2 v1 v2 s) − 2] per dim.
        m = mean.shape[0]
        if m < 2:
            return torch.zeros(mean.shape[1:-1], dtype=mean.dtype, device=mean.device)
        i, j = torch.triu_indices(m, m, 1, device=mean.device)
        mean, logvar = mean.float(), logvar.float()  # the terms nearly cancel: bf16 (planner autocast) is too coarse
        lv1, lv2 = logvar[i], logvar[j]  # [P, B, D]
        v1, v2 = lv1.exp(), lv2.exp()
        vs, vp2 = v1 + v2, 2.0 * v1 * v2
        js = 0.25 * (math.log(4.0) + lv1 + lv2 - 2.0 * vs.log() + vs * vs / vp2
                     + (v1 * v1 + v2 * v2) * (mean[i] - mean[j]).square() / (vp2 * vs) - 2.0)
        return js.sum(dim=(0, -1)) / (m * (m - 1) / 2)

    @torch.no_grad()
    def uncertainty(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        mean, logvar, _ = self.predict_elites(obs, act)
        return self.uncertainty_from(mean, logvar)

    @torch.no_grad()
    def step(self, obs: torch.Tensor, act: torch.Tensor, generator: Optional[torch.Generator] = None,
             sample: bool = True):
        """One imagined step for a batch.

        Returns next_obs [B, obs], reward [B], terminal [B] bool, uncertainty [B]. With ``sample`` the next
        state is drawn from one random elite's Gaussian (as in MBPO); otherwise the elites' mean is used.
        """
        mean, logvar, term = self.predict_elites(obs, act)
        u = self.uncertainty_from(mean, logvar)
        b = obs.shape[0]
        if sample:
            # drawn on the generator's device (a seeded CPU generator drives a CUDA model too), then moved
            gdev = obs.device if generator is None else generator.device
            idx = torch.randint(0, mean.shape[0], (b,), generator=generator, device=gdev).to(obs.device)
            ar = torch.arange(b, device=obs.device)
            mu, lv, tl = mean[idx, ar], logvar[idx, ar], term[idx, ar]
            noise = torch.randn(mu.shape, generator=generator, device=gdev).to(obs.device)
            y = mu + noise * (0.5 * lv).exp()
        else:
            y, tl = mean.mean(dim=0), term.mean(dim=0)
        nxt, rew = self.denormalise(y, obs)
        return nxt, rew, tl > 0.0, u

    # ----- training ------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, y: torch.Tensor, done: torch.Tensor,
             state_known: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        """x: [E, B, in], y: [E, B, D] (normalised), done: [E, B]; state_known [E, B] masks the next-state part."""
        mean, logvar, term = self._forward_norm(x)
        inv_var = torch.exp(-logvar)
        per_elem = ((mean - y) ** 2) * inv_var + logvar
        if state_known is None:
            nll = per_elem.mean()
        else:  # rows without a stored next state still teach the reward (last column) and the terminal head
            w = torch.ones_like(per_elem)
            w[..., :-1] = state_known.unsqueeze(-1).to(per_elem.dtype)
            nll = (per_elem * w).sum() / w.sum()
        bound = self.cfg.logvar_bound_coef * (self.max_logvar.sum() - self.min_logvar.sum())
        # terminals are rare (~1% of rows); up-weighting them keeps the model from imagining that falls never end
        term_loss = F.binary_cross_entropy_with_logits(term, done, pos_weight=self.term_pos_weight)
        decay = self.cfg.weight_decay * sum((l.weight ** 2).sum() for l in self.layers)
        total = nll + bound + term_loss + decay
        return total, {"wm_nll": nll.item(), "wm_term_bce": term_loss.item()}

    @torch.no_grad()
    def holdout_errors(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-member held-out MSE of the mean (normalised space): [E]."""
        xe = x.unsqueeze(0).expand(self.cfg.n_members, *x.shape)
        mean, _, _ = self._forward_norm(xe)
        return ((mean - y.unsqueeze(0)) ** 2).mean(dim=(1, 2))

    @torch.no_grad()
    def calibrate_threshold(self, obs: torch.Tensor, act: torch.Tensor, batch: int = 8192) -> float:
        """κ = configured quantile of U over dataset (s, a) pairs."""
        us = torch.cat([self.uncertainty(obs[i:i + batch], act[i:i + batch]) for i in range(0, len(obs), batch)])
        kappa = torch.quantile(us.float(), self.cfg.threshold_quantile)
        self.threshold.fill_(float(kappa))
        return float(kappa)


def fit_world_model(
    model: WorldModel,
    obs: np.ndarray,
    act: np.ndarray,
    rew: np.ndarray,
    next_obs: np.ndarray,
    terminals: np.ndarray,
    seed: int = 0,
    show_progress: bool = True,
    log: Optional[Callable[[str, float], None]] = None,
    next_known: Optional[np.ndarray] = None,
) -> dict:
    """Trains the ensemble with Gaussian NLL, early-stops on held-out MSE, picks elites, sets κ.

    ``next_known`` (bool per row, default all) marks rows whose next state is real: the others train only the
    reward and terminal heads, and the held-out set is drawn from the known rows.
    """
    cfg = model.cfg
    dev = model.in_mean.device  # the data goes where the ensemble is; batches are drawn by the CPU generator
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    x_all = np.concatenate([obs, act], axis=1).astype(np.float32)
    y_all = np.concatenate([next_obs - obs, rew.reshape(-1, 1)], axis=1).astype(np.float32)
    d_all = terminals.astype(np.float32)
    n = len(x_all)
    known = None if next_known is None or np.all(next_known) else np.asarray(next_known, dtype=bool)
    perm = rng.permutation(n)
    if known is not None:  # held-out rows only where the target is real; unknown rows go to training
        perm = np.concatenate([perm[known[perm]], perm[~known[perm]]])
    n_hold = int(min(max(1, n * cfg.holdout_ratio), cfg.max_holdout))
    hold, train = perm[:n_hold], perm[n_hold:]
    y_rows = train if known is None else train[known[train]]  # placeholder deltas (zeros) would skew the scale
    with torch.no_grad():
        model.in_mean.copy_(torch.from_numpy(x_all[train].mean(0)))
        model.in_std.copy_(torch.from_numpy(x_all[train].std(0) + 1e-6))
        model.out_mean.copy_(torch.from_numpy(y_all[y_rows].mean(0)))
        model.out_std.copy_(torch.from_numpy(y_all[y_rows].std(0) + 1e-6))
        n_pos = float(d_all[train].sum())
        # sqrt of the class ratio: recall on rare terminals without flooding rollouts with false stops
        model.term_pos_weight.fill_(float(np.sqrt((len(train) - n_pos) / n_pos)) if n_pos > 0 else 1.0)
    xt = (torch.from_numpy(x_all).to(dev) - model.in_mean) / model.in_std
    yt = (torch.from_numpy(y_all).to(dev) - model.out_mean) / model.out_std
    dt = torch.from_numpy(d_all).to(dev)
    kt = None if known is None else torch.from_numpy(known).to(dev)
    train_t, hold_t = torch.from_numpy(train), torch.from_numpy(hold).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    best = torch.full((cfg.n_members,), float("inf"), device=dev)
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    since_improved, history = 0, []
    bar = tqdm(range(1, cfg.max_steps + 1), desc="world model", disable=not show_progress)
    model.train()
    for step in bar:
        # each member gets its own bootstrap-style random batch: [E, B]
        idx = train_t[torch.randint(0, len(train_t), (cfg.n_members, cfg.batch_size), generator=gen)].to(dev)
        loss, metrics = model.loss(xt[idx], yt[idx], dt[idx], None if kt is None else kt[idx])
        if not torch.isfinite(loss):  # checked before the update, so the weights stay at the last good step
            raise FloatingPointError(f"world model loss became {float(loss)} at step {step}; "
                                     "lower world_model.learning_rate or check the data scale.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            errs = model.holdout_errors(xt[hold_t], yt[hold_t])
            improved = errs < best * (1 - 1e-3)
            if improved.any():
                # keep each member's best weights (member-wise snapshot of the batched tensors)
                sd = model.state_dict()
                for k, v in sd.items():
                    if v.dim() >= 1 and v.shape[0] == cfg.n_members and k.startswith(("layers", "head")):
                        best_state[k][improved] = v[improved].clone()
                    elif k in ("max_logvar", "min_logvar"):
                        best_state[k] = v.clone()
                best = torch.where(improved, errs, best)
                since_improved = 0
            else:
                since_improved += 1
            history.append(float(errs.mean()))
            bar.set_postfix(holdout_mse=f"{float(errs.mean()):.4f}", nll=f"{metrics['wm_nll']:.3f}")
            if log:
                log("wm_holdout_mse", float(errs.mean()))
                log("wm_nll", metrics["wm_nll"])
            if since_improved >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    errs = model.holdout_errors(xt[hold_t], yt[hold_t])
    model.elites.copy_(torch.argsort(errs)[: cfg.n_elites])
    o_t, a_t = torch.from_numpy(obs.astype(np.float32)).to(dev), torch.from_numpy(act.astype(np.float32)).to(dev)
    sub = torch.from_numpy(rng.choice(n, size=min(n, cfg.threshold_samples), replace=False)).to(dev)
    kappa = model.calibrate_threshold(o_t[sub], a_t[sub])
    model.fitted.fill_(True)
    return {
        "wm_steps": step,
        "wm_holdout_mse_elites": float(errs[model.elites].mean()),
        "wm_holdout_mse_history": history,
        "wm_threshold": kappa,
    }
