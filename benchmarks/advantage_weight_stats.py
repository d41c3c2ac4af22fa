"""How uneven are IQL's actor weights over a dataset? (the `adv-weight` diagnostic's weights, before any training)

For a fitted stage 1 (any IPD model or benchmark cache) and each beta, prints the effective sample size of
min(exp(beta * A(s, a)), 100) over the dataset's rows as a share of the rows, the median and 95th percentile weight,
and the share of rows at the clip:

    python benchmarks/advantage_weight_stats.py --dataset d4rlstyle/hopper/medium-replay-v0 --betas 0.3 1 3 \
        --model benchmarks/results/advantage_weight/cache/d4rlstyle__hopper__medium-replay-v0__s0__8ac483bd3e51.d3
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="an IPD model or stage-1-2 cache (.d3)")
    ap.add_argument("--dataset", required=True, help="the Minari dataset id the model was fitted on")
    ap.add_argument("--minari-path", default=None, help="MINARI_DATASETS_PATH (default: the environment's)")
    ap.add_argument("--betas", type=float, nargs="+", default=[3.0])
    args = ap.parse_args()
    if args.minari_path:
        os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(args.minari_path)
    torch.set_num_threads(1)
    from ipd_agent.algo import load_ipd
    from ipd_agent.data import load_minari
    from ipd_agent.transformer import advantage_weights

    value = load_ipd(args.model).impl.value
    traj, _ = load_minari(args.dataset)
    print(f"{args.dataset}: {traj.n_transitions} rows")
    print("| beta | effective sample size / rows | median weight | 95th percentile | rows at the clip |")
    print("|---|---|---|---|---|")
    for beta in args.betas:
        w = advantage_weights(value, traj.observations, traj.actions, beta).astype(np.float64)
        ess = w.sum() ** 2 / (w ** 2).sum() / len(w)
        print(f"| {beta:g} | {ess:.1%} | {np.median(w):.3f} | {np.quantile(w, 0.95):.2f} | "
              f"{(w >= value.max_weight).mean():.1%} |")


if __name__ == "__main__":
    main()
