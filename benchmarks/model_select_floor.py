"""Can the world model tell, without any evaluation return, whether a token floor helps a fitted IPD policy?

Runs the deployed policy (transformer + return token, exactly as ``predict`` does) inside the model's own ensemble
world model, from start states of the dataset's episodes, twice: with the token model's floor removed and with the
floor the model was fitted with (``transformer.token_floor``, or ``--quantile``). It reports, for each, the imagined
return (undiscounted, to the first predicted terminal or the horizon), the imagined episode length, and the same
return cut at the first step the ensemble does not trust (uncertainty above the augmenter's threshold κ). Nothing here
touches the environment.

    python benchmarks/model_select_floor.py \\
        --model benchmarks/results/head_to_head/models/d4rlstyle__hopper__medium-replay-v0/ipd-token-floor-0.95_seed0.d3 \\
        --dataset d4rlstyle/hopper/medium-replay-v0 --out benchmarks/results/diagnostics/floor_select.json
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch


@torch.no_grad()
@torch.no_grad()
def imagine(algo, starts: np.ndarray, horizon: int, sample: bool, seed: int, value_horizon: int | None = None) -> dict:
    """Rolls the deployed policy out in the world model from every start state at once (one batch).

    Returns the mean undiscounted return, its std, the mean length and the return up to the first untrusted step
    (U > κ). With ``value_horizon`` also ``value``: the discounted return of the first ``value_horizon`` steps plus
    γ^H·V(s_H) where the rollout is still going (the whole rollout's, bootstrapped at its end, if it is shorter);
    ``benchmarks/select_deployment.py`` scores candidates with it."""
    from ipd_agent.policy import TransformerContext

    wm, value, gamma = algo.impl.world_model, algo.impl.value, algo.config.gamma
    n = len(starts)
    ctx = TransformerContext(algo, n)  # deployment exactly as predict: eval mode, the return token from s_t
    gen = torch.Generator().manual_seed(seed)
    obs = torch.from_numpy(starts.astype(np.float32))
    ret, ret_trusted, disc = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    alive, trusted = torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
    length = torch.zeros(n, dtype=torch.long)
    boot = None
    for t in range(horizon):
        if t == value_horizon:
            boot = disc + gamma ** t * torch.where(alive, value.v(obs), 0.0)
        act = torch.from_numpy(ctx.step(obs.numpy())).clamp(-1.0, 1.0)
        nxt, rew, term, u = wm.step(obs, act, generator=gen, sample=sample)
        trusted &= u <= wm.threshold
        ret += torch.where(alive, rew, 0.0)
        ret_trusted += torch.where(alive & trusted, rew, 0.0)
        disc += torch.where(alive, gamma ** t * rew, 0.0)
        length += alive.long()
        alive &= ~term
        if not alive.any():  # nothing left to add (a bootstrap would be 0 everywhere)
            break
        obs = torch.where(alive[:, None], nxt, obs)  # finished rollouts idle on their last state
    out = {"return": float(ret.mean()), "return_std": float(ret.std()), "length": float(length.float().mean()),
           "return_trusted": float(ret_trusted.mean())}
    if value_horizon is not None:
        if boot is None:  # the rollout ended (or its horizon came) before value_horizon
            boot = disc + gamma ** horizon * torch.where(alive, value.v(obs), 0.0)
        out["value"] = float(boot.mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, nargs="+", help="IPD models kept by the benchmark (models/<set>/<run>.d3)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--minari-path", default="../shared/datasets")
    p.add_argument("--quantile", type=float, default=None, help="floor quantile (default: the model's own setting)")
    p.add_argument("--starts", type=int, default=50, help="start states, drawn from the dataset's episode starts")
    p.add_argument("--horizon", type=int, default=1000)
    p.add_argument("--sample", action="store_true", help="draw next states from one elite (default: elites' mean)")
    p.add_argument("--out", default=None, help="JSON file to add the results to (keyed by model path)")
    a = p.parse_args()
    torch.set_num_threads(1)
    os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(a.minari_path)
    from ipd_agent import load_ipd, load_minari
    from ipd_agent.transformer import set_token_floor

    traj, _ = load_minari(a.dataset)
    first_rows = traj.episode_starts[:-1]
    results = json.load(open(a.out)) if a.out and os.path.exists(a.out) else {}
    for path in a.model:
        algo = load_ipd(path)
        seed = algo.config.seed
        rng = np.random.default_rng(seed)
        starts = traj.observations[rng.choice(first_rows, size=min(a.starts, len(first_rows)), replace=False)]
        q = a.quantile if a.quantile is not None else algo.config.transformer.token_floor
        row = {"dataset": a.dataset, "seed": seed, "quantile": q, "starts": len(starts), "horizon": a.horizon,
               "sample": a.sample}
        for name, quant in (("no_floor", None), ("floor", q)):
            row[f"{name}_token_floor"] = set_token_floor(algo.impl.token, traj.observations, quant)
            row[name] = imagine(algo, starts, a.horizon, a.sample, seed)
        row["select_floor"] = row["floor"]["return"] > row["no_floor"]["return"]
        results[path] = row
        print(f"{path}: imagined return without floor {row['no_floor']['return']:.0f} (length "
              f"{row['no_floor']['length']:.0f}), with floor {row['floor']['return']:.0f} (length "
              f"{row['floor']['length']:.0f}) -> {'floor' if row['select_floor'] else 'no floor'}", flush=True)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
