"""How long one run of a budget profile takes on this machine, measured stage by stage and projected to the profile.

The paper-scale ``gpu`` profile (1M Q steps, 100k transformer steps, 50k branch points) is hours per run; this times
every stage of one real IPD fit under that profile's settings (same networks, batch sizes, planner and chunk size)
for a few thousand steps on a real dataset, on the profile's device, and scales each measured rate linearly to the
profile's budget. It also times d3rlpy's DT and the four Q-learning baselines under the same profile. The measured
rates are readings; the projected hours are those rates times the budget (the world model's is an upper bound: early
stopping usually ends it sooner).

    python benchmarks/gpu_profile_time.py --profile gpu --minari-path ../shared/datasets \
        --out benchmarks/results/gpu_profile_time.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import numpy as np


def _timed_fit(algo, ds, steps: int) -> float:
    """Seconds per gradient step of a d3rlpy algorithm's own fit loop (a short warm-up fit first)."""
    import d3rlpy

    noop = d3rlpy.logging.NoopAdapterFactory()
    kw = dict(show_progress=False, logger_adapter=noop, save_interval=10**9)
    algo.fit(ds, n_steps=50, n_steps_per_epoch=50, **kw)  # builds the networks, warms the kernels
    t0 = time.perf_counter()
    algo.fit(ds, n_steps=steps, n_steps_per_epoch=steps, **kw)
    return (time.perf_counter() - t0) / steps


def measure(profile, dataset_id: str, q_steps: int, wm_steps: int, branches: int, transformer_steps: int,
            baseline_steps: int, episodes: int) -> dict:
    import d3rlpy
    import torch

    from ipd_agent.bench import _baseline, evaluate, make_ipd_config
    from ipd_agent.data import load_minari
    from ipd_agent.value import make_iql

    torch.set_num_threads(profile.threads)
    traj, meta = load_minari(dataset_id)
    env = meta.get("env_spec") or meta["env_id"]
    d3rlpy.seed(0)
    full = make_ipd_config(profile, 0)
    cfg = copy.deepcopy(full)  # the profile's settings with fewer steps of each stage
    cfg.value.n_steps = q_steps
    cfg.world_model.max_steps = wm_steps
    cfg.world_model.patience = 10**9  # time every step asked for: no early stop
    cfg.augment.n_branches = branches
    algo = cfg.create(device=profile.device)
    out = algo.fit(traj, n_steps=transformer_steps, n_steps_per_epoch=transformer_steps, show_progress=True,
                   logger_adapter=d3rlpy.logging.NoopAdapterFactory())
    st = out["stage_times"]
    token_s = algo.stage_metrics["return_token"]["seconds"] if "return_token" in algo.stage_metrics else 0.0
    n_branched = out["augmentation"]["n_branches"]
    t_ep0 = time.perf_counter()
    evaluate(algo, env, episodes, seed=0)
    per_episode = (time.perf_counter() - t_ep0) / episodes
    ds = traj.to_d3rlpy()
    d3rlpy.seed(0)
    ipd = {
        # stage 1 is d3rlpy's IQL under IPD's value settings: its rate from its own loop, without the fit's set-up
        "value_s_per_step": _timed_fit(make_iql(full.value, profile.device), ds, q_steps),
        "world_model_s_per_step": st["world_model"] / wm_steps,
        "augment_s_per_branch": st["augment"] / max(1, n_branched),
        "transformer_s_per_step": (st["transformer"] - token_s) / transformer_steps,
        "return_token_s": token_s,
        "eval_s_per_episode": per_episode,
        "measured_branches": n_branched,
    }
    episodes_per_run = profile.eval_episodes + (profile.curve_points - 1) * profile.curve_episodes
    ipd["projected_s"] = {
        "value": ipd["value_s_per_step"] * full.value.n_steps,
        "world_model_at_most": ipd["world_model_s_per_step"] * full.world_model.max_steps,
        "augment": ipd["augment_s_per_branch"] * full.augment.n_branches,
        "transformer": ipd["transformer_s_per_step"] * profile.transformer_steps + token_s,
        "evaluation": per_episode * episodes_per_run,
    }
    ipd["projected_hours"] = sum(ipd["projected_s"].values()) / 3600
    baselines = {}
    for name in ("dt", "iql", "cql", "td3bc", "bc"):
        d3rlpy.seed(0)
        per_step = _timed_fit(_baseline(name, profile, profile.device), ds, baseline_steps)
        steps = profile.transformer_steps if name == "dt" else profile.q_steps
        baselines[name] = {"s_per_step": per_step, "projected_train_hours": per_step * steps / 3600}
    return {"ipd": ipd, "baselines": baselines}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="gpu", help="budget profile: gpu, cpu, tiny or a JSON file")
    p.add_argument("--device", default=None, help="override the profile's device (e.g. cpu:0 for a CPU reading)")
    p.add_argument("--dataset", default="d4rlstyle/hopper/medium-v0", help="Minari dataset id")
    p.add_argument("--minari-path", default=None, help="folder holding the Minari datasets")
    p.add_argument("--q-steps", type=int, default=3000, help="IQL (stage 1) steps timed")
    p.add_argument("--wm-steps", type=int, default=2000, help="world-model steps timed")
    p.add_argument("--branches", type=int, default=4096, help="branch points planned (the gpu profile's chunk size)")
    p.add_argument("--transformer-steps", type=int, default=2000, help="transformer steps timed")
    p.add_argument("--baseline-steps", type=int, default=1000, help="steps timed per d3rlpy baseline")
    p.add_argument("--episodes", type=int, default=2, help="evaluation episodes timed")
    p.add_argument("--out", default=None, help="write the JSON here")
    a = p.parse_args()
    if a.minari_path:
        os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(a.minari_path)
    import dataclasses

    import torch

    from ipd_agent.bench import check_device, load_profile, versions

    prof = load_profile(a.profile)
    if a.device:
        prof = dataclasses.replace(prof, device=a.device)
    try:
        check_device(prof.device)
    except ValueError as exc:  # a message, not a traceback
        raise SystemExit(str(exc)) from None
    t0 = time.perf_counter()
    res = measure(prof, a.dataset, a.q_steps, a.wm_steps, a.branches, a.transformer_steps, a.baseline_steps,
                  a.episodes)
    res.update({
        "profile": dataclasses.asdict(prof), "dataset": a.dataset, "wall_s": time.perf_counter() - t0,
        "versions": versions(),
        "device_name": torch.cuda.get_device_name(0) if prof.device.startswith("cuda") else "cpu",
        "command": "python benchmarks/gpu_profile_time.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not None and k not in ("out",)),
    })
    ipd = res["ipd"]
    print(f"{res['device_name']}: IPD projected {ipd['projected_hours']:.2f} h per run under '{prof.name}' "
          + ", ".join(f"{k} {v / 60:.1f} min" for k, v in ipd["projected_s"].items()))
    for name, b in res["baselines"].items():
        print(f"  {name}: {1 / b['s_per_step']:.0f} steps/s, projected {b['projected_train_hours']:.2f} h training")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1, default=float)


if __name__ == "__main__":
    main()
