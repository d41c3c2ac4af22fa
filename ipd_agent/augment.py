"""Stages 3-5: choose branch points, re-plan from them in the model, splice the better futures in.

``augment`` takes the real ``Trajectories`` and returns an ``AugmentationResult`` holding the real
episodes followed by the spliced ones (real prefix ``τ[0:t]`` bit-for-bit, then the imagined
segment), per-branch statistics (why each rollout was accepted or rejected, imagined vs real value)
and provenance flags on every row.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import AugmentConfig
from .data import Trajectories
from .planner import MPCPlanner
from .value import ValueFunctions, map_rows, module_device
from .world_model import WorldModel

__all__ = ["AugmentationResult", "augment", "segment_values", "select_branch_points", "batched_values"]

# why an imagined rollout was not kept
REASONS = ("accepted", "uncertainty", "terminal", "no_improvement")


def batched_values(value: ValueFunctions, obs: np.ndarray, batch: int = 16384) -> np.ndarray:
    """V(s) for many states, in unscaled reward units."""
    return map_rows(value.v, obs, batch=batch, device=value.reward_scale.device)


def segment_values(traj: Trajectories, v_next: np.ndarray, gamma: float, lengths, rows: Optional[np.ndarray] = None):
    """Real segment value from each row (DESIGN §2.3).

    ``G_t = Σ_{j<ℓ} γ^j r_{t+j} + γ^ℓ V(s_{t+ℓ})`` with ℓ = min(length, steps left in the episode) and no
    bootstrap after a true terminal. ``lengths`` is an int or one int per row. Returns (G [n], ℓ [n]).
    """
    rows = np.arange(traj.n_transitions) if rows is None else np.asarray(rows)
    lengths = np.broadcast_to(np.asarray(lengths), rows.shape)
    max_len = int(lengths.max()) if len(rows) else 0
    ep_end = traj.episode_starts[1:][traj.episode_ids[rows]]  # exclusive end row of each row's episode
    ell = np.minimum(lengths, ep_end - rows)
    j = np.arange(max_len)
    idx = rows[:, None] + j[None, :]
    valid = j[None, :] < ell[:, None]
    r = np.where(valid, traj.rewards[np.minimum(idx, traj.n_transitions - 1)], 0.0).astype(np.float64)
    g = (r * gamma ** j[None, :]).sum(axis=1)
    last = rows + ell - 1
    boot = np.where(traj.terminals[last], 0.0, v_next[last])
    return g + gamma ** ell * boot, ell


def select_branch_points(gap: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Rows in the top ``branch_fraction`` of value gaps; a random ``n_branches`` of them when more qualify
    (random rather than the very largest so that branches spread over the data instead of piling onto
    the few states where V is most over-optimistic)."""
    n_top = int(np.ceil(cfg.branch_fraction * len(gap)))
    if n_top == 0 or cfg.n_branches <= 0:
        return np.zeros(0, dtype=np.int64)
    top = np.argsort(-gap, kind="stable")[:n_top]
    top = top[gap[top] > 0]  # only where the data did worse than V says is possible
    if len(top) > cfg.n_branches:
        top = rng.choice(top, size=cfg.n_branches, replace=False)
    return np.sort(top).astype(np.int64)


@dataclasses.dataclass
class AugmentationResult:
    """Everything augmentation produced, for training and for inspection."""

    trajectories: Trajectories  # real episodes first, then one spliced episode per accepted branch
    n_real_episodes: int
    branch_rows: np.ndarray  # [n_branches] dataset row each rollout started from
    rollout_lengths: np.ndarray  # [n_branches] imagined steps before stopping
    stop_reasons: np.ndarray  # [n_branches] "horizon" | "uncertainty" | "terminal"
    imagined_values: np.ndarray  # [n_branches] Σγ^j r̂_j + γ^ℓ V(ŝ_end)
    real_values: np.ndarray  # [n_branches] the real segment of the same length from the same state
    outcomes: np.ndarray  # [n_branches] one of REASONS
    uncertainties: np.ndarray  # U of every executed imagined step (for the histogram)
    threshold: float  # κ
    n_candidates: int  # rows in the top branch_fraction of value gaps

    @property
    def accepted(self) -> np.ndarray:
        return self.outcomes == "accepted"

    def imagined_transitions(self) -> dict[str, np.ndarray]:
        """Every imagined row with its provenance (branch id and source dataset row)."""
        t = self.trajectories
        m = t.imagined
        return {
            "observations": t.observations[m], "actions": t.actions[m], "rewards": t.rewards[m],
            "next_observations": t.next_observations[m], "terminals": t.terminals[m],
            "branch_ids": t.branch_ids[m], "source_rows": self.branch_rows[t.branch_ids[m]],
        }

    def summary(self) -> dict:
        acc = self.accepted
        out = {
            "n_candidates": int(self.n_candidates),
            "n_branches": int(len(self.branch_rows)),
            "n_accepted": int(acc.sum()),
            "acceptance_rate": float(acc.mean()) if len(acc) else 0.0,
            "imagined_transitions": int(self.trajectories.imagined.sum()),
            "threshold": float(self.threshold),
            "mean_rollout_length": float(self.rollout_lengths.mean()) if len(acc) else 0.0,
        }
        for reason in REASONS[1:]:
            out[f"rejected_{reason}"] = int((self.outcomes == reason).sum())
        for reason in ("horizon", "uncertainty", "terminal"):
            out[f"stopped_{reason}"] = int((self.stop_reasons == reason).sum())
        if acc.any():
            out["accepted_imagined_value"] = float(self.imagined_values[acc].mean())
            out["accepted_real_value"] = float(self.real_values[acc].mean())
        if len(acc):
            out["all_imagined_value"] = float(self.imagined_values.mean())
            out["all_real_value"] = float(self.real_values.mean())
        return out

    def __str__(self) -> str:
        return json.dumps(self.summary(), indent=1)

    def save(self, path: str) -> None:
        """Writes every array to one ``.npz`` atomically (a half-written file is never left under ``path``)."""
        arrays = {f"traj_{f.name}": getattr(self.trajectories, f.name) for f in dataclasses.fields(Trajectories)}
        for f in dataclasses.fields(self):
            if f.name != "trajectories":
                arrays[f.name] = np.asarray(getattr(self, f.name))
        tmp = path + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "AugmentationResult":
        with np.load(path, allow_pickle=False) as z:
            # files written before a field existed lack it; its default applies
            traj = Trajectories(**{f.name: z[f"traj_{f.name}"] for f in dataclasses.fields(Trajectories)
                                   if f"traj_{f.name}" in z})
            kw = {f.name: z[f.name] for f in dataclasses.fields(cls) if f.name != "trajectories"}
        kw["n_real_episodes"], kw["n_candidates"] = int(kw["n_real_episodes"]), int(kw["n_candidates"])
        kw["threshold"] = float(kw["threshold"])
        return cls(trajectories=traj, **kw)


@torch.no_grad()
def _rollout_chunk(planner: MPCPlanner, wm: WorldModel, start: torch.Tensor, length: int, gen: torch.Generator):
    """Executes MPC for up to ``length`` steps from every start state at once (on the start states' device)."""
    c, od = start.shape
    ad = wm.act_dim
    dev = start.device
    obs = torch.zeros(c, length, od, device=dev)
    act = torch.zeros(c, length, ad, device=dev)
    rew = torch.zeros(c, length, device=dev)
    nxt = torch.zeros(c, length, od, device=dev)
    term = torch.zeros(c, length, dtype=torch.bool, device=dev)
    lens = torch.zeros(c, dtype=torch.long, device=dev)
    reason = np.full(c, "horizon", dtype=object)
    us = []
    s = start.clone()
    alive = torch.ones(c, dtype=torch.bool, device=dev)
    for t in range(length):
        idx = torch.nonzero(alive).squeeze(1)
        if len(idx) == 0:
            break
        a = planner.plan(s[idx], generator=gen)
        n_s, r, done, u = wm.step(s[idx], a, generator=gen)
        untrusted = u > wm.threshold
        ok = idx[~untrusted]
        reason[idx[untrusted].cpu().numpy()] = "uncertainty"
        alive[idx[untrusted]] = False
        keep = ~untrusted
        obs[ok, t], act[ok, t], rew[ok, t], nxt[ok, t] = s[ok], a[keep], r[keep], n_s[keep]
        term[ok, t] = done[keep]
        lens[ok] += 1
        us.append(u[keep])
        s[ok] = n_s[keep]
        ended = ok[done[keep]]
        reason[ended.cpu().numpy()] = "terminal"
        alive[ended] = False
    return obs, act, rew, nxt, term, lens, reason, torch.cat(us) if us else torch.zeros(0)


def augment(
    traj: Trajectories,
    world_model: WorldModel,
    value: ValueFunctions,
    planner: MPCPlanner,
    cfg: AugmentConfig,
    gamma: float = 0.99,
    seed: int = 0,
    show_progress: bool = True,
) -> AugmentationResult:
    """Runs branch selection, batched MPC rollouts, acceptance and splicing (DESIGN §2.3-2.4)."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    L = cfg.segment_length
    v_now = batched_values(value, traj.observations)
    v_next = batched_values(value, traj.next_observations)
    g_real, _ = segment_values(traj, v_next, gamma, L)
    gap = v_now - g_real
    n_cand = int(np.ceil(cfg.branch_fraction * len(gap)))
    rows = select_branch_points(gap, cfg, rng) if cfg.enabled else np.zeros(0, dtype=np.int64)
    nb = len(rows)
    od, ad = traj.observation_dim, traj.action_dim
    I_obs = np.zeros((nb, L, od), np.float32)
    I_act = np.zeros((nb, L, ad), np.float32)
    I_rew = np.zeros((nb, L), np.float32)
    I_nxt = np.zeros((nb, L, od), np.float32)
    I_term = np.zeros((nb, L), bool)
    lens = np.zeros(nb, np.int64)
    reasons = np.full(nb, "horizon", dtype=object)
    us = []
    bar = tqdm(range(0, nb, cfg.chunk_size), desc="imaginary planning", disable=not show_progress or nb == 0)
    for c0 in bar:
        sl = slice(c0, min(nb, c0 + cfg.chunk_size))
        start = torch.from_numpy(traj.observations[rows[sl]]).to(module_device(world_model))
        o, a, r, n, te, ln, rs, u = (x.cpu() if torch.is_tensor(x) else x
                                     for x in _rollout_chunk(planner, world_model, start, L, gen))
        I_obs[sl], I_act[sl], I_rew[sl], I_nxt[sl], I_term[sl] = o.numpy(), a.numpy(), r.numpy(), n.numpy(), te.numpy()
        lens[sl], reasons[sl] = ln.numpy(), rs
        us.append(u.numpy())
        bar.set_postfix(branches=f"{sl.stop}/{nb}")
    # imagined segment value with the same convention as the real one
    j = np.arange(L)
    valid = j[None, :] < lens[:, None]
    g_im = (np.where(valid, I_rew, 0.0) * gamma ** j[None, :]).sum(axis=1)
    last_i = np.maximum(lens - 1, 0)
    end_state = I_nxt[np.arange(nb), last_i] if nb else np.zeros((0, od), np.float32)
    end_term = I_term[np.arange(nb), last_i] & (lens > 0) if nb else np.zeros(0, bool)
    v_end = batched_values(value, end_state) if nb else np.zeros(0)
    # a zero-length rollout is worth V(s_t) (nothing was executed)
    v_end = np.where(lens > 0, v_end, v_now[rows] if nb else v_end)
    g_im = g_im + np.where(end_term, 0.0, gamma ** lens * v_end)
    g_same, _ = segment_values(traj, v_next, gamma, np.maximum(lens, 1), rows=rows)
    improved = g_im > g_same + cfg.accept_margin
    outcomes = np.full(nb, "accepted", dtype=object)
    long_enough = lens >= cfg.min_rollout_length
    outcomes[~improved] = "no_improvement"
    outcomes[~improved & (reasons == "terminal")] = "terminal"
    outcomes[~long_enough] = "uncertainty"
    acc = np.flatnonzero(outcomes == "accepted")
    spliced = _splice(traj, rows[acc], acc, I_obs[acc], I_act[acc], I_rew[acc], I_nxt[acc], I_term[acc], lens[acc])
    full = Trajectories.concatenate([traj, spliced]) if spliced is not None else traj
    return AugmentationResult(
        trajectories=full,
        n_real_episodes=traj.n_episodes,
        branch_rows=rows,
        rollout_lengths=lens,
        stop_reasons=reasons.astype(str),
        imagined_values=g_im,
        real_values=g_same,
        outcomes=outcomes.astype(str),
        uncertainties=np.concatenate(us) if us else np.zeros(0, np.float32),
        threshold=float(world_model.threshold),
        n_candidates=n_cand,
    )


def _splice(traj: Trajectories, rows, branch_ids, obs, act, rew, nxt, term, lens) -> Optional[Trajectories]:
    """New episodes ``τ[0:t] + imagined``, built with index arithmetic (no per-episode copies)."""
    k = len(rows)
    if k == 0:
        return None
    ep_start = traj.episode_starts[traj.episode_ids[rows]]
    pre_len = rows - ep_start
    total = pre_len + lens
    starts = np.concatenate([[0], np.cumsum(total)]).astype(np.int64)
    n = int(starts[-1])
    # position of each output row inside its new episode, and which new episode it belongs to
    owner = np.repeat(np.arange(k), total)
    pos = np.arange(n) - starts[owner]
    is_im = pos >= pre_len[owner]
    real_src = ep_start[owner] + pos  # valid where not imagined
    im_pos = pos - pre_len[owner]  # valid where imagined
    out = {}
    for name, im in (("observations", obs), ("actions", act), ("rewards", rew), ("next_observations", nxt),
                     ("terminals", term)):
        real = getattr(traj, name)
        arr = np.empty((n,) + real.shape[1:], dtype=real.dtype)
        arr[~is_im] = real[real_src[~is_im]]
        arr[is_im] = im[owner[is_im], im_pos[is_im]]
        out[name] = arr
    # only an imagined predicted terminal may end a spliced episode (a real prefix row never is terminal)
    out["terminals"][~is_im] = False
    return Trajectories(
        episode_starts=starts, imagined=is_im, branch_ids=np.where(is_im, np.asarray(branch_ids)[owner], -1), **out
    )
