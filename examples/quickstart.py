"""End-to-end IPD on a small built-in default, no download needed.

1. Make a D4RL-style ``full-replay`` dataset: train SB3 SAC briefly on a MuJoCo task and keep
   its whole replay buffer (Minari format, written under ``--out``).
2. Fit IPD (value function -> world model -> imaginary planning -> value-guided transformer).
3. Fit d3rlpy's DecisionTransformer on the same dataset object, same transformer size and steps.
4. Evaluate both in the real environment, print a table of normalised scores and save a plot.

    python examples/quickstart.py            # ~10 minutes on 2 CPU cores
    python examples/quickstart.py --dataset d4rlstyle/hopper/medium-replay-v0 --minari-path ../shared/datasets
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/quickstart", help="folder for datasets, logs, results and the plot")
    p.add_argument("--env", default="InvertedPendulum-v5", help="task for the built-in dataset")
    p.add_argument("--sac-steps", type=int, default=8000, help="SAC steps that make the built-in dataset")
    p.add_argument("--dataset", default=None, help="use this Minari dataset id instead of making one")
    p.add_argument("--minari-path", default=None, help="MINARI_DATASETS_PATH for --dataset")
    p.add_argument("--value-steps", type=int, default=5000, help="IQL steps (IPD stage 1)")
    p.add_argument("--transformer-steps", type=int, default=2000, help="transformer steps for IPD and DT alike")
    p.add_argument("--episodes", type=int, default=10, help="evaluation episodes per algorithm")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)  # one thread per process: the default oversubscribes small CPUs

    import d3rlpy

    from ipd_agent import IPDConfig, load_minari
    from ipd_agent.bench import _baseline, evaluate, Profile
    from ipd_agent.data import normalized_score, reference_scores

    os.makedirs(args.out, exist_ok=True)
    timings = {}
    if args.dataset is None:
        from ipd_agent.collect import make_d4rl_datasets

        root = os.path.join(args.out, "datasets")
        print(f"[1/4] making D4RL-style datasets: SB3 SAC on {args.env} for {args.sac_steps} steps (full replay used)")
        t0 = time.perf_counter()
        info = make_d4rl_datasets(args.env, args.sac_steps, root, seed=args.seed)
        timings["make dataset"] = time.perf_counter() - t0
        dataset_id = info["full-replay"]["dataset_id"]  # the whole SAC replay buffer: poor to good episodes
        print(json.dumps(info["full-replay"]))
    else:
        root, dataset_id = args.minari_path, args.dataset
        if root:
            os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(root)
    os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(root) if root else os.environ.get("MINARI_DATASETS_PATH", "")
    import minari

    mds = minari.load_dataset(dataset_id)
    traj, meta = load_minari(mds)
    ref = reference_scores(meta)
    env_spec = mds.spec.env_spec
    print(f"dataset {dataset_id}: {traj.n_episodes} episodes, {traj.n_transitions} transitions, "
          f"mean return {traj.episode_returns().mean():.1f}")
    adapter = d3rlpy.logging.FileAdapterFactory(root_dir=os.path.join(args.out, "logs"))

    print("[2/4] fitting IPD")
    d3rlpy.seed(args.seed)
    cfg = IPDConfig(
        seed=args.seed,
        value={"n_steps": args.value_steps, "tau": 0.05},  # faster value propagation on a short CPU budget
        world_model={"max_steps": 2000, "eval_every": 250},
        planner={"n_samples": 32, "n_iterations": 2},
        augment={"n_branches": 300},
        transformer={"n_steps": args.transformer_steps, "hidden_size": 64, "n_layers": 2},
    )
    ipd = cfg.create(device="cpu:0")
    t0 = time.perf_counter()
    out = ipd.fit(traj, logger_adapter=adapter, experiment_name="quickstart_ipd")
    timings["IPD fit"] = time.perf_counter() - t0
    ipd.save(os.path.join(args.out, "ipd.d3"))
    print("augmentation:", json.dumps(out["augmentation"], indent=1))

    print("[3/4] fitting d3rlpy DecisionTransformer (same size, same steps)")
    d3rlpy.seed(args.seed)
    prof = Profile(transformer_hidden=64, transformer_layers=2)
    dt = _baseline("dt", prof, "cpu:0")
    t0 = time.perf_counter()
    dt.fit(traj.to_d3rlpy(), n_steps=args.transformer_steps, n_steps_per_epoch=args.transformer_steps,
           logger_adapter=adapter, experiment_name="quickstart_dt", save_interval=10**9)
    timings["DT fit"] = time.perf_counter() - t0
    target = ref[1] if ref else float(traj.episode_returns().max())

    print(f"[4/4] evaluating both for {args.episodes} episodes")
    results = {}
    for name, algo, tgt in (("IPD", ipd, None), ("DT", dt, target)):
        rets = evaluate(algo, env_spec, args.episodes, args.seed, tgt)
        results[name] = {"returns": rets, "mean": float(np.mean(rets)), "std": float(np.std(rets)),
                         "normalized": float(normalized_score(np.mean(rets), ref))}
    data_norm = normalized_score(float(traj.episode_returns().mean()), ref)

    print("\n| algorithm | return (mean ± std) | normalised score |")
    print("|---|---|---|")
    print(f"| dataset (behaviour) | {traj.episode_returns().mean():.1f} | {data_norm:.1f} |")
    for name, r in results.items():
        print(f"| {name} | {r['mean']:.1f} ± {r['std']:.1f} | {r['normalized']:.1f} |")
    print("\nwall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print("IPD stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in out["stage_times"].items()))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"dataset": dataset_id, "results": results, "timings": timings,
                   "ipd_stage_times": out["stage_times"], "augmentation": out["augmentation"]}, f, indent=1)
    _plot(results, data_norm, ipd, os.path.join(args.out, "quickstart.png"), dataset_id, ref)
    print(f"plot: {os.path.join(args.out, 'quickstart.png')}")


def _plot(results, data_norm, ipd, path, dataset_id, ref) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ipd_agent.data import normalized_score
    from ipd_agent.report import plot_segment_values, plot_uncertainty

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    names = ["dataset"] + list(results)
    means = [data_norm] + [r["normalized"] for r in results.values()]
    errs = [0.0] + [float(np.std([normalized_score(x, ref) for x in r["returns"]])) for r in results.values()]
    axes[0].bar(names, means, yerr=errs, capsize=6, color=["#999999", "#1f77b4", "#ff7f0e"])
    axes[0].set_ylabel("normalised score")
    axes[0].set_title(f"{dataset_id}")
    if ipd.augmentation is not None:  # the same panels as `ipd-agent augment --report`
        plot_segment_values(axes[1], ipd.augmentation)
        plot_uncertainty(axes[2], ipd.augmentation)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
