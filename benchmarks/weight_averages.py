"""Several weight averages of one and the same transformer training run, each deployed and evaluated: a paired test.

Every deployment below comes from one IPD fit under the CPU profile (its own stages, its own 5,000 transformer steps),
so two deployments differ only in how the iterates of that run are averaged -- not in the data, stages, sampling or
dropout of training. Seed noise that swamps a comparison between separate runs (hopper: 20-30 points between nearby
checkpoints) cancels here.

Deployments (each a row ``ipd-avg-<name>``, in the harness's row format, evaluated like the table's rows):
  - ``capped-0.999``: the profile's own average (``ema_warmup="capped"``), which ``fit`` deploys; spans ~560 steps.
    Same settings, seed and code as the table's ``ipd`` row, so it shows whether a run repeats on another machine.
  - ``bc-<decay>``: bias-corrected averages (``ema_warmup="bias_corrected"``), spanning about 1 / (1 - decay) steps;
    kept alongside the fit's own average by a fit callback, with the same arithmetic as ``WeightAverage``.
  - ``last-iterate``: the raw weights at the last step.

    python benchmarks/weight_averages.py --datasets d4rlstyle/hopper/full-replay-v0 --seeds 0 1 2 \\
        --minari-path ../shared/datasets --out benchmarks/results/weight_averages
    python benchmarks/paired.py benchmarks/results/weight_averages --variant ipd-avg-bc-0.9995 \\
        --control ipd-avg-capped-0.999
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_args import run_parser  # noqa: E402

DEFAULT_DECAYS = (0.999, 0.9995)  # ~1,000 steps (what the profile's 0.999 was meant to span) and ~2,000


def labels(decays=DEFAULT_DECAYS) -> list[str]:
    """The row labels one (dataset, seed) writes; the profile's own average first."""
    return (["ipd-avg-capped-0.999"] + [f"ipd-avg-bc-{d:g}" for d in decays] + ["ipd-avg-last-iterate"])


def run(dataset_id: str, seed: int, out_dir: str, profile="cpu", decays=DEFAULT_DECAYS,
        dataset_root: str | None = None) -> list[dict]:
    """Fits IPD once on ``dataset_id`` and writes one row per deployment; skips it when every row exists.

    ``profile`` is a ``Profile`` or a name / path for ``load_profile``; it must deploy a capped 0.999 average."""
    from ipd_agent.bench import (LearningCurve, evaluate, load_profile, prefit_ipd, row_path, stage_config,
                                 start_ipd_run, versions, write_row)
    from ipd_agent.data import normalized_score
    from ipd_agent.transformer import WeightAverage, set_parameters

    profile = load_profile(profile) if isinstance(profile, str) else profile
    names = labels(decays)
    paths = [row_path(out_dir, dataset_id, name, seed) for name in names]
    if all(os.path.exists(p) for p in paths):
        rows = []
        for p in paths:
            with open(p) as f:
                rows.append(json.load(f))
        return rows
    traj, meta, ref, cfg = start_ipd_run(profile, dataset_id, seed, dataset_root)
    import d3rlpy
    if cfg.transformer.ema_decay != 0.999 or cfg.transformer.ema_warmup != "capped":
        raise SystemExit(f"profile {profile.name!r} deploys ema_decay={cfg.transformer.ema_decay}, "
                         f"ema_warmup={cfg.transformer.ema_warmup!r}; this script's control is capped 0.999")
    algo, pre_times = prefit_ipd(cfg, traj, dataset_id, out_dir, stage_config(profile, seed))
    extra: dict[float, WeightAverage] = {}
    eval_env = meta.get("env_spec") or meta["env_id"]
    # the harness's learning-curve evaluations of the deployed average, as in the table's runs: the control row then
    # has the table row's curve, and the training run is the table's step for step
    curve = LearningCurve(profile, profile.transformer_steps, eval_env, seed, ref)

    def on_step(model, epoch, step):
        if not extra:  # the first step: bias-corrected averages give the initial weights no weight, so start here
            extra.update({d: WeightAverage(model.impl.transformer, d, "bias_corrected") for d in decays})
        for avg in extra.values():
            avg.update()
        curve(model, epoch, step)

    t0 = time.perf_counter()
    out = algo.fit(traj, n_steps=profile.transformer_steps, n_steps_per_epoch=profile.transformer_steps,
                   show_progress=False, logger_adapter=d3rlpy.logging.NoopAdapterFactory(), callback=on_step)
    # as in run_one: the learning-curve evaluations are left out of the training time
    train_time = (time.perf_counter() - t0 - curve.eval_time + pre_times.get("value", 0.0)
                  + pre_times.get("world_model", 0.0))
    stage_times = {**pre_times, **{k: v for k, v in out["stage_times"].items() if k not in pre_times}}
    net = algo.impl.transformer
    fit_average = [p.detach().clone() for p in net.parameters()]  # what fit deployed: the profile's own average
    weights = {"ipd-avg-capped-0.999": fit_average,
               **{f"ipd-avg-bc-{d:g}": avg.average for d, avg in extra.items()},
               "ipd-avg-last-iterate": algo.last_iterate_weights()}
    rows = []
    for name, path in zip(names, paths):
        set_parameters(net, weights[name])
        te = time.perf_counter()
        rets = evaluate(algo, eval_env, profile.eval_episodes, seed)
        scores = [normalized_score(r, ref) for r in rets]
        conf = json.loads(cfg.serialize())
        if name.startswith("ipd-avg-bc-"):
            conf["transformer"].update(ema_decay=float(name.rsplit("-", 1)[1]), ema_warmup="bias_corrected")
        elif name == "ipd-avg-last-iterate":
            conf["transformer"]["ema_decay"] = 0.0
        row = {"algo": name, "dataset": dataset_id, "env_id": meta["env_id"], "seed": seed,
               "return_mean": float(np.mean(rets)), "returns": [float(r) for r in rets],
               "normalized_score": float(np.mean(scores)), "train_wall_time_s": train_time,
               "eval_wall_time_s": time.perf_counter() - te, "stage_times_s": stage_times,
               "gradient_steps": profile.transformer_steps,
               # the intermediate points are the fit's own average's (as in the table); the last is this deployment
               "learning_curve": curve.points + [{"step": profile.transformer_steps,
                                                  "normalized_score": float(np.mean(scores))}],
               "deployment": "one transformer training run per (dataset, seed) shared by every ipd-avg-* row; "
                             "this row deploys " + name.removeprefix("ipd-avg-"),
               "augmentation": out["augmentation"], "profile": dataclasses.asdict(profile), "versions": versions(), "config": conf}
        write_row(path, row)
        rows.append(row)
        print(f"{dataset_id} seed {seed} {name}: {row['normalized_score']:.1f}", flush=True)
    return rows


def main() -> None:
    p = run_parser(__doc__, "weight_averages", datasets_required=True)
    p.add_argument("--decays", type=float, nargs="+", default=list(DEFAULT_DECAYS),
                   help="decays of the bias-corrected averages kept beside the profile's own")
    a = p.parse_args()
    for ds in a.datasets:
        for seed in a.seeds:
            run(ds, seed, a.out, a.profile, tuple(a.decays), a.minari_path)


if __name__ == "__main__":
    main()
