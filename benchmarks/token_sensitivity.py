"""How much does IPD's score depend on the return-token expectile? (No transformer retraining needed.)

The return-token model only sets g_t at inference, so one trained IPD can be evaluated with several token
expectiles: the augmentation is recomputed (deterministic, same seed as the fit), the token model is refitted for
each expectile (seconds) and the policy is evaluated exactly as the benchmark does (same seeds, same episodes).
The configured expectile therefore reproduces the benchmark row's score; ``value`` is DESIGN's g = V(s).

    python benchmarks/token_sensitivity.py \\
        --model benchmarks/results/head_to_head/models/d4rlstyle__halfcheetah__full-replay-v0/ipd_seed0.d3 \\
        --dataset d4rlstyle/halfcheetah/full-replay-v0 --expectiles 0.7 0.9 0.97 0.99 \\
        --out benchmarks/results/diagnostics/halfcheetah-fr_seed0_token.json
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
    p.add_argument("--model", required=True, help="an IPD model kept by the benchmark (models/<dataset>/ipd_seedN.d3)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--minari-path", default="../shared/datasets")
    p.add_argument("--expectiles", type=float, nargs="+", default=[0.7, 0.9, 0.97, 0.99])
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--out", default=None, help="JSON file for the results")
    a = p.parse_args()
    torch.set_num_threads(1)
    os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(a.minari_path)
    from tqdm.auto import tqdm

    from ipd_agent import load_ipd, load_minari
    from ipd_agent.bench import evaluate
    from ipd_agent.data import normalized_score, reference_scores

    algo = load_ipd(a.model)
    traj, meta = load_minari(a.dataset)
    ref, env = reference_scores(meta), meta.get("env_spec") or meta["env_id"]
    seed, tcfg = algo.config.seed, algo.config.transformer
    t0 = time.perf_counter()
    aug = algo.augment(traj, show_progress=False)
    out: dict = {"model": a.model, "dataset": a.dataset, "seed": seed, "configured_expectile": tcfg.token_expectile,
                 "augment_seconds": time.perf_counter() - t0, "results": {}}
    o0 = torch.from_numpy(traj.observations[traj.episode_starts[:-1]])
    for e in tqdm(["value"] + a.expectiles, desc="token"):
        if e == "value":
            tcfg.return_token = "value"
        else:
            tcfg.return_token = "upper"
            algo.fit_return_token(aug, expectile=e)
        rets = evaluate(algo, env, a.episodes, seed)
        scores = [normalized_score(r, ref) for r in rets]
        out["results"][str(e)] = {"normalized_score": float(np.mean(scores)), "std": float(np.std(scores)),
                                  "token_at_starts_mean": float(algo.return_token(o0).mean())}
        print(e, out["results"][str(e)], flush=True)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
