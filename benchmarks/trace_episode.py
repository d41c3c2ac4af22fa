"""Where does a fitted IPD policy go wrong? Trace its return token and the body's pitch and speed, step by step.

Runs evaluation episodes of a kept model exactly as the benchmark does (same env seeds) and records, at every step,
the return token g_t the policy conditioned on, the torso pitch, the forward velocity and the reward. It reports the
step at which the body stopped moving for good (forward speed under 0.1 from there to the end, at least the last 50
steps), if it did.
With ``--constant-tokens`` it also evaluates the same transformer with a fixed, state-independent token, to show
whether the failure is in the token or in the policy. With ``--floor-quantiles`` it evaluates the same transformer
with the token model floored at those quantiles of its g(s) over the dataset's states (``transformer.token_floor``);
with ``--ratchet``, with the running maximum of its token within each episode (``transformer.token_ratchet``).

    python benchmarks/trace_episode.py \\
        --model benchmarks/results/head_to_head/models/d4rlstyle__halfcheetah__full-replay-v0/ipd_seed0.d3 \\
        --dataset d4rlstyle/halfcheetah/full-replay-v0 --constant-tokens 300 400 500 800 \\
        --out benchmarks/results/diagnostics/halfcheetah-fr_seed0_trace.json
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from torch import nn

# (pitch, forward velocity) positions in the MuJoCo observation vectors
BODY_INDEX = {"HalfCheetah": (1, 8), "Hopper": (1, 5), "Walker2d": (1, 8)}


class ConstantToken(nn.Module):
    """g_t = c at every step, whatever the state."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = float(c)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.full(obs.shape[:-1], self.c)


def trace(algo, env_id, episodes: int, seed: int, idx: tuple) -> list:
    import gymnasium as gym

    from ipd_agent.policy import TransformerContext

    env = gym.make(env_id)
    env.reset(seed=10_000 + seed)  # the benchmark's evaluation seeding (ipd_agent.bench.evaluate)
    env.action_space.seed(seed)
    out = []
    for _ in range(episodes):
        ctx = TransformerContext(algo, 1)
        obs, _ = env.reset()
        rows, done = [], False
        while not done:
            a = ctx.step(obs[None])[0]
            g = float(ctx.rtg[0, int(ctx.length[0]) - 1])
            obs, r, term, trunc, _ = env.step(a)
            rows.append((g, float(obs[idx[0]]), float(obs[idx[1]]), float(r)))
            done = term or trunc
        g, pitch, vel, rew = (np.array(c) for c in zip(*rows))
        moving = np.flatnonzero(np.abs(vel) >= 0.1)
        stuck_at = int(moving[-1] + 1) if len(moving) and moving[-1] + 1 < len(vel) - 50 else None
        ep = {"return": float(rew.sum()), "length": len(rew), "stuck_from_step": stuck_at,
              "token_first_10_mean": float(g[:10].mean()), "token_last_100_mean": float(g[-100:].mean()),
              "pitch_last_100_mean": float(pitch[-100:].mean()), "velocity_last_100_mean": float(vel[-100:].mean()),
              "every_50_steps": [{"t": t, "token": round(float(g[t]), 1), "pitch": round(float(pitch[t]), 2),
                                  "velocity": round(float(vel[t]), 2)} for t in range(0, len(g), 50)]}
        out.append(ep)
        print(f"return {ep['return']:.0f}, stuck from step {stuck_at}, token {ep['token_first_10_mean']:.0f} at the "
              f"start -> {ep['token_last_100_mean']:.0f} at the end, final pitch {ep['pitch_last_100_mean']:.2f}",
              flush=True)
    env.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an IPD model kept by the benchmark (models/<dataset>/<run>.d3)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--minari-path", default="../shared/datasets")
    p.add_argument("--episodes", type=int, default=3, help="traced episodes (the benchmark's first ones)")
    p.add_argument("--constant-tokens", type=float, nargs="*", default=[], help="fixed tokens to evaluate as well")
    p.add_argument("--floor-quantiles", type=float, nargs="*", default=[],
                   help="token-model floors to evaluate as well (quantiles of g(s) over the dataset's states)")
    p.add_argument("--ratchet", action="store_true",
                   help="also evaluate (and trace) the running maximum of the token within each episode")
    p.add_argument("--eval-episodes", type=int, default=10, help="episodes per constant token or floor")
    p.add_argument("--out", default=None, help="JSON file for the results")
    a = p.parse_args()
    torch.set_num_threads(1)
    os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(a.minari_path)
    from ipd_agent import load_ipd, load_minari
    from ipd_agent.bench import evaluate
    from ipd_agent.data import normalized_score, reference_scores

    algo = load_ipd(a.model)
    traj, meta = load_minari(a.dataset)
    ref, env = reference_scores(meta), meta.get("env_spec") or meta["env_id"]
    idx = next((v for k, v in BODY_INDEX.items() if meta["env_id"].startswith(k)), None)
    if idx is None:
        raise SystemExit(f"no pitch/velocity indices known for {meta['env_id']}; add them to BODY_INDEX")
    seed = algo.config.seed
    with torch.no_grad():
        data_tokens = algo.return_token(torch.from_numpy(traj.observations)).numpy()
    out: dict = {"model": a.model, "dataset": a.dataset, "seed": seed,
                 "model_token_over_data_quantiles": {q: float(np.quantile(data_tokens, q)) for q in (0.05, 0.5, 0.95)},
                 "episodes": trace(algo, env, a.episodes, seed, idx), "constant_tokens": {}, "token_floors": {}}
    stuck = [e for e in out["episodes"] if e["stuck_from_step"] is not None]
    if stuck:  # how often does the data visit the pose the policy got stuck in, and does it run again from there?
        pitch, vel = traj.observations[:, idx[0]], traj.observations[:, idx[1]]
        target = float(np.mean([e["pitch_last_100_mean"] for e in stuck]))
        near = (np.abs(pitch - target) < 0.15) & (np.abs(vel) < 0.2)
        eps = np.unique(traj.episode_ids[near])
        ran_again = 0
        for e in eps:  # "ran again": forward speed above 2 for more than 50 steps after the first visit
            s, t = traj.episode_starts[e], traj.episode_starts[e + 1]
            first = s + int(np.flatnonzero(near[s:t])[0])
            ran_again += int((vel[first + 1:t] > 2.0).sum() > 50)
        out["stuck_pose_in_data"] = {"pitch": target, "rows": int(near.sum()), "of_rows": int(len(near)),
                                     "episodes": int(len(eps)), "episodes_running_again": ran_again}
        print(f"the stuck pose (pitch {target:.2f}, speed ~0) in the data: {int(near.sum())} of {len(near)} rows, "
              f"{len(eps)} episodes, {ran_again} of which run again afterwards", flush=True)
    from ipd_agent.transformer import set_token_floor

    for q in a.floor_quantiles:  # before the constant tokens, which replace the token module
        floor = set_token_floor(algo.impl.token, traj.observations, q)
        scores = [normalized_score(r, ref) for r in evaluate(algo, env, a.eval_episodes, seed)]
        out["token_floors"][str(q)] = {"floor": floor, "normalized_score": float(np.mean(scores)),
                                       "std": float(np.std(scores))}
        print(f"token floor at quantile {q:g} ({floor:.1f}): {np.mean(scores):.1f} ± {np.std(scores):.1f}", flush=True)
    set_token_floor(algo.impl.token, traj.observations, algo.config.transformer.token_floor)  # the model's own
    if a.ratchet:  # the running maximum of g within each episode (transformer.token_ratchet), then the model's own
        own, algo.config.transformer.token_ratchet = algo.config.transformer.token_ratchet, True
        scores = [normalized_score(r, ref) for r in evaluate(algo, env, a.eval_episodes, seed)]
        out["token_ratchet"] = {"normalized_score": float(np.mean(scores)), "std": float(np.std(scores)),
                                "episodes": trace(algo, env, a.episodes, seed, idx)}
        print(f"token ratchet: {np.mean(scores):.1f} ± {np.std(scores):.1f}", flush=True)
        algo.config.transformer.token_ratchet = own
    for c in a.constant_tokens:
        algo.return_token_module = lambda m=ConstantToken(c): m  # this process only: the saved model is untouched
        scores = [normalized_score(r, ref) for r in evaluate(algo, env, a.eval_episodes, seed)]
        out["constant_tokens"][str(c)] = {"normalized_score": float(np.mean(scores)), "std": float(np.std(scores))}
        print(f"constant token {c:g}: {np.mean(scores):.1f} ± {np.std(scores):.1f}", flush=True)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
