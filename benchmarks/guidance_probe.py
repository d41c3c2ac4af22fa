"""What does the value-guided loss do to the policy's actions? Compare fitted IPD models on real data windows.

For each model, on the same random windows of real episodes (context as in training, the model's own inference
return token at every step, the data's past actions), it reports the policy's action at every step against the data's:
- ``action_mse``: mean squared error to the data action, per action dimension;
- ``saturated``: share of action components with |a| > 0.99 (tanh at its bound), next to the data's own share;
- ``q_gain``: IQL's Q(s, π) − Q(s, a_data), with the model's own critic (models fitted with the same seed share
  the cached critic, so their gains are comparable).
A guided policy that leaves the data for saturated actions which the in-sample critic rates higher is the
signature of the critic being exploited.

    python benchmarks/guidance_probe.py --dataset d4rlstyle/hopper/medium-v0 \\
        --models benchmarks/results/head_to_head/models/d4rlstyle__hopper__medium-v0/ipd-alpha7.5_seed0.d3 \\
                 benchmarks/results/head_to_head/models/d4rlstyle__hopper__medium-v0/ipd_seed0.d3
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch


def windows(traj, k: int, n: int, seed: int) -> np.ndarray:
    """[n, k] row indices of k-step windows that lie inside one real episode."""
    ends = traj.episode_starts[1:][traj.episode_ids]  # exclusive end of each row's episode
    starts = np.flatnonzero(np.arange(traj.n_transitions) + k <= ends)
    pick = np.random.default_rng(seed).choice(starts, size=min(n, len(starts)), replace=False)
    return pick[:, None] + np.arange(k)[None, :]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="fitted IPD models (.d3) of the same dataset")
    p.add_argument("--dataset", required=True)
    p.add_argument("--minari-path", default="../shared/datasets")
    p.add_argument("--windows", type=int, default=1000, help="random real-data windows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    a = p.parse_args()
    torch.set_num_threads(1)
    os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(a.minari_path)
    from ipd_agent import load_ipd, load_minari

    traj, _ = load_minari(a.dataset)
    out: dict = {"dataset": a.dataset, "windows": a.windows,
                 "data_saturated": float((np.abs(traj.actions) > 0.99).mean())}
    for path in a.models:
        algo = load_ipd(path)
        impl, net = algo.impl, algo.impl.transformer.eval()
        idx = windows(traj, algo.config.context_size, a.windows, a.seed)
        obs = torch.from_numpy(traj.observations[idx])  # [n, k, o]
        act = torch.from_numpy(traj.actions[idx])
        with torch.no_grad():
            g = algo.return_token_module()(obs)  # the token deployment would feed at each step
            pi = net(obs, act, g)  # position t predicts a_t from s_<=t, a_<t
            s, pa, da = obs.reshape(-1, obs.shape[-1]), pi.reshape(-1, pi.shape[-1]), act.reshape(-1, act.shape[-1])
            q_data = impl.value.q(s, da)
            q_gain = impl.value.q(s, pa) - q_data
        out[os.path.basename(path)] = {
            "value_guidance": algo.config.transformer.value_guidance,
            "action_mse": float(((pa - da) ** 2).mean()),
            "saturated": float((pa.abs() > 0.99).float().mean()),
            "q_data_mean": float(q_data.mean()),  # the scale the gain is on
            "q_gain_mean": float(q_gain.mean()),
            "q_gain_positive_share": float((q_gain > 0).float().mean()),
        }
    print(json.dumps(out, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
