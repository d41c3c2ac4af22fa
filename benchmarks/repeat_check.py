"""Does an IPD run repeat itself on one machine? Refits one (dataset, seed) from its cached stages 1-2, once as
``seed_ensemble.py`` fits ``member-0`` (no callback) and once as the harness does (its learning-curve callback
evaluating mid-training), and compares each with the recorded rows: the final score of ``member-0`` and the harness
row's learning curve (member 0's, for ``ipd-members3``).

    python benchmarks/repeat_check.py --dataset d4rlstyle/hopper/full-replay-v0 --seed 0 \\
        --cache benchmarks/results/seed_ensemble --ensemble-row <seed_ensemble row> --harness-row <head_to_head row>
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    import d3rlpy

    from ipd_agent.bench import LearningCurve, evaluate, load_profile, prefit_ipd, stage_config, start_ipd_run
    from ipd_agent.data import normalized_score

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default="cpu")
    p.add_argument("--minari-path", default=None)
    p.add_argument("--cache", required=True, help="folder whose cache/ holds the run's stages 1-2")
    p.add_argument("--ensemble-row", required=True, help="seed_ensemble.py's row of this (dataset, seed)")
    p.add_argument("--harness-row", required=True, help="head_to_head's ipd-members3 row of this (dataset, seed)")
    a = p.parse_args()
    profile = load_profile(a.profile)
    with open(a.ensemble_row) as f:
        ensemble = json.load(f)
    with open(a.harness_row) as f:
        harness = json.load(f)
    work = tempfile.mkdtemp()
    shutil.copytree(os.path.join(a.cache, "cache"), os.path.join(work, "cache"))
    steps = profile.transformer_steps
    for name in ("no callback", "harness callback"):
        traj, meta, ref, cfg = start_ipd_run(profile, a.dataset, a.seed, a.minari_path)
        algo, _ = prefit_ipd(cfg, traj, a.dataset, work, stage_config(profile, a.seed))
        env = meta.get("env_spec") or meta["env_id"]
        curve = LearningCurve(profile, steps, env, a.seed, ref) if name == "harness callback" else None
        algo.fit(traj, n_steps=steps, n_steps_per_epoch=steps, show_progress=False, callback=curve,
                 logger_adapter=d3rlpy.logging.NoopAdapterFactory())
        rets = evaluate(algo, env, profile.eval_episodes, a.seed)
        score = float(np.mean([normalized_score(r, ref) for r in rets]))
        recorded = ensemble["results"]["member-0"]
        print(f"{name}: member-0 {score:.3f} (seed_ensemble row {recorded['normalized_score']:.3f}, returns "
              f"{'identical' if rets == recorded['returns'] else 'differ'})", flush=True)
        if curve is not None:
            mine = [round(c["normalized_score"], 3) for c in curve.points]
            theirs = [round(c["normalized_score"], 3) for c in harness["learning_curve"][:-1]]
            print(f"  learning curve {mine}; harness row {theirs}", flush=True)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
