"""What do the imagined actions look like? Compares the actions IPD splices into the data with the data's own.

For each kept model the augmentation is re-run (deterministic for a given seed, so it is the one the transformer was
trained on) and three figures are reported for the imagined actions and for the dataset's actions:
  mean_abs_a            mean |a| over action components
  saturated_fraction    fraction of components at the bound (|a| > 0.99)
  mean_abs_delta_a      mean |a_t − a_{t−1}| between consecutive steps of the same segment or episode (jerk)
plus, for the imagined actions only, mean |a − π_IQL(s)|: how far the rollout moved from the IQL policy it started
from (0 for greedy rollouts, which are that policy), and the augmentation's summary (acceptance, imagined and real
segment values). ``--execute best mean`` re-runs each model's augmentation with each MPPI output
(``PlannerConfig.execute``) instead of the model's own, so one model shows both on the same stages.

    python benchmarks/imagined_actions.py --dataset d4rlstyle/hopper/medium-replay-v0 \\
        --models benchmarks/results/head_to_head/models/d4rlstyle__hopper__medium-replay-v0/ipd_seed0.d3 \\
                 benchmarks/results/head_to_head/models/d4rlstyle__hopper__medium-replay-v0/ipd-greedy_seed0.d3 \\
        --out benchmarks/results/diagnostics/hopper-mr_seed0_imagined_actions.json
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch


def action_stats(actions: np.ndarray, segment_ids: np.ndarray) -> dict:
    """Magnitude, saturation and step-to-step change of actions; segment_ids marks which rows are consecutive."""
    same = segment_ids[1:] == segment_ids[:-1]
    return {"mean_abs_a": float(np.abs(actions).mean()),
            "saturated_fraction": float((np.abs(actions) > 0.99).mean()),
            "mean_abs_delta_a": float(np.abs(np.diff(actions, axis=0))[same].mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--models", nargs="+", required=True, help="fitted IPD models (.d3) on that dataset")
    p.add_argument("--minari-path", default="../shared/datasets")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--execute", nargs="+", choices=["best", "mean"], default=None,
                   help="re-run each model's augmentation with each of these MPPI outputs (default: the model's own)")
    a = p.parse_args()
    torch.set_num_threads(1)
    os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(a.minari_path)
    from ipd_agent import load_ipd, load_minari

    traj, _ = load_minari(a.dataset)
    out = {"dataset": a.dataset, "data": action_stats(traj.actions, traj.episode_ids), "models": {}}
    print("data", out["data"], flush=True)
    runs = [(path, ex) for path in a.models for ex in (a.execute or [None])]
    for path, ex in runs:
        algo = load_ipd(path)
        if ex is not None:
            algo.config.planner.execute = ex
        res = algo.augment(traj, show_progress=True)
        t = res.trajectories
        rows = np.flatnonzero(t.imagined)
        s = action_stats(t.actions[rows], t.branch_ids[rows])
        with torch.no_grad():
            pi = algo.impl.value.act(torch.as_tensor(t.observations[rows], dtype=torch.float32)).clamp(-1, 1).numpy()
        s["mean_abs_a_minus_iql"] = float(np.abs(t.actions[rows] - pi).mean())
        s["imagined_transitions"] = int(len(rows))
        s["greedy"] = bool(algo.config.planner.greedy)
        s["execute"] = algo.config.planner.execute
        s["augmentation"] = res.summary()
        name = os.path.basename(path) + ("" if ex is None else f"[execute={ex}]")
        out["models"][name] = s
        print(name, s, flush=True)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        json.dump(out, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
