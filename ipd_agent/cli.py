"""``ipd-agent`` command line: fit, evaluate, augment, make-dataset, bench.

Every sub-command has ``--help`` with an example. The same functionality is available in Python:
``IPDConfig(...).create().fit``, ``ipd_agent.bench.evaluate``, ``IPD.augment`` + ``Trajectories.to_minari``,
``ipd_agent.collect.make_d4rl_datasets`` and ``ipd_agent.bench.run_sweep``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional

EXAMPLES = {
    "fit": "ipd-agent fit d4rlstyle/hopper/medium-replay-v0 --minari-path ../shared/datasets --profile cpu "
           "--out hopper_ipd.d3",
    "evaluate": "ipd-agent evaluate hopper_ipd.d3 --env Hopper-v5 --episodes 10",
    "augment": "ipd-agent augment hopper_ipd.d3 d4rlstyle/hopper/medium-replay-v0 --minari-path ../shared/datasets "
               "--out-id ipd/hopper/medium-replay-augmented-v0 --report augment.png",
    "make-dataset": "ipd-agent make-dataset InvertedPendulum-v5 --steps 8000 --root out/datasets",
    "bench": "ipd-agent bench --profile cpu --minari-path ../shared/datasets --datasets d4rlstyle/hopper/medium-replay-v0 "
             "--algos ipd dt iql --seeds 0 1 2",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ipd-agent", description="Imaginary Planning Distillation for offline RL.")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, epilog=f"example:\n  {EXAMPLES[name]}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    f = add("fit", "Fit IPD on a Minari dataset (id or local path) and save the model.")
    f.add_argument("dataset", help="Minari dataset id or local dataset folder")
    f.add_argument("--minari-path", help="folder holding Minari datasets (sets MINARI_DATASETS_PATH)")
    f.add_argument("--profile", default=None, help="budget profile: cpu, tiny, gpu or a JSON file")
    f.add_argument("--config", default=None, help="JSON file or string of IPDConfig overrides (nested dicts)")
    f.add_argument("--n-steps", type=int, default=None, help="transformer gradient steps")
    f.add_argument("--seed", type=int, default=0, help="seed of every stage")
    f.add_argument("--out", default="ipd_model.d3", help="where to save the fitted model")
    f.add_argument("--logdir", default="d3rlpy_logs", help="d3rlpy file-logger root")
    f.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: the profile's, else cpu:0)")

    e = add("evaluate", "Evaluate a saved IPD model in a Gymnasium environment (value-conditioned, no target).")
    e.add_argument("model", help="model saved by `ipd-agent fit` or IPD.save")
    e.add_argument("--env", default=None, help="Gymnasium env id (or use --dataset to take the dataset's env)")
    e.add_argument("--dataset", default=None, help="Minari dataset whose env (and reference scores) to use")
    e.add_argument("--minari-path", help="folder holding Minari datasets")
    e.add_argument("--episodes", type=int, default=10, help="evaluation episodes")
    e.add_argument("--seed", type=int, default=0, help="environment seed")

    a = add("augment", "Run only the imaginary-planning stage and save the augmented dataset as a Minari dataset.")
    a.add_argument("model", help="model with a fitted value function and world model")
    a.add_argument("dataset", help="Minari dataset id or local folder to augment")
    a.add_argument("--minari-path", help="folder holding Minari datasets (the new one is written there too)")
    a.add_argument("--out-id", required=True, help="id of the augmented Minari dataset, e.g. ns/name-v0")
    a.add_argument("--n-branches", type=int, default=None, help="override augment.n_branches")
    a.add_argument("--report", default=None, help="PNG report: real vs imagined values, reasons, uncertainty")

    m = add("make-dataset", "Train SB3 SAC and write D4RL-protocol medium / medium-replay / full-replay datasets.")
    m.add_argument("env", help="Gymnasium task, e.g. InvertedPendulum-v5 or Hopper-v5")
    m.add_argument("--steps", type=int, default=8000, help="SAC environment steps")
    m.add_argument("--root", default="datasets", help="folder to write the Minari datasets into")
    m.add_argument("--namespace", default=None, help="dataset namespace (default ipd/<task>)")
    m.add_argument("--seed", type=int, default=0)

    b = add("bench", "Run IPD and d3rlpy baselines on the same datasets, budget and evaluation.")
    b.add_argument("--profile", default="cpu", help="cpu, tiny, gpu or a JSON file")
    b.add_argument("--datasets", nargs="+", required=True, help="Minari dataset ids")
    b.add_argument("--algos", nargs="+", default=["ipd", "dt", "iql", "cql", "td3bc", "bc"])
    b.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    b.add_argument("--minari-path", default=None, help="folder holding the Minari datasets")
    b.add_argument("--workers", type=int, default=2, help="parallel runs (one torch thread each)")
    b.add_argument("--device", default=None, help="torch device of every run, e.g. cuda:0 (default: the profile's)")
    b.add_argument("--out", default="benchmarks/results/bench",
                   help="results folder: a row per run in runs/ (finished runs are skipped), then results.json, "
                        "results.csv, table.md, bars.png and curves.png")
    b.add_argument("--ray-address", default=None,
                   help="run on a Ray cluster instead of local processes ('auto', 'ray://host:10001', or 'local')")
    return p


def _minari_path(path: Optional[str]) -> None:
    if path:
        os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(path)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from .data import DatasetError

    try:
        return _COMMANDS[args.command](args)
    except (DatasetError, ValueError, FileNotFoundError) as exc:
        print(f"ipd-agent {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _check_writable(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--out {path!r}: folder {folder!r} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--out {path!r}: folder {folder!r} is not writable")


def _fit(args) -> int:
    import d3rlpy

    from .algo import IPDConfig
    from .bench import check_device, load_profile, make_ipd_config
    from .data import load_minari

    _minari_path(args.minari_path)
    _check_writable(args.out)  # before hours of fitting, not after
    overrides = {}
    if args.config:
        overrides = json.load(open(args.config)) if os.path.exists(args.config) else json.loads(args.config)
    device = args.device
    if args.profile:
        profile = load_profile(args.profile)
        cfg = make_ipd_config(profile, args.seed, overrides)
        device = device or profile.device
    else:
        cfg = IPDConfig.from_settings({"seed": args.seed, **overrides})
    check_device(device)
    traj, meta = load_minari(args.dataset)
    algo = cfg.create(device=device or "cpu:0")
    out = algo.fit(traj, n_steps=args.n_steps, logger_adapter=d3rlpy.logging.FileAdapterFactory(root_dir=args.logdir))
    algo.save(args.out)
    print(json.dumps({"model": args.out, "stage_times_s": out["stage_times"], "augmentation": out["augmentation"]},
                     indent=1))
    return 0


def _evaluate(args) -> int:
    import numpy as np

    from .algo import load_ipd
    from .bench import evaluate
    from .data import load_minari, normalized_score, reference_scores

    _minari_path(args.minari_path)
    algo = load_ipd(args.model)
    ref, env = None, args.env
    if args.dataset:
        _, meta = load_minari(args.dataset)
        env, ref = meta.get("env_spec") or meta.get("env_id"), reference_scores(meta)
    if env is None:
        raise ValueError("pass --env ENV_ID or --dataset DATASET_ID to choose the environment")
    if ref is None and isinstance(env, str):
        ref = reference_scores({}, env)
    rets = evaluate(algo, env, args.episodes, args.seed)
    print(json.dumps({"return_mean": float(np.mean(rets)), "return_std": float(np.std(rets)),
                      "normalized_score": normalized_score(float(np.mean(rets)), ref), "returns": rets}, indent=1))
    return 0


def _augment(args) -> int:
    from .algo import load_ipd
    from .data import load_minari
    from .report import augmentation_report

    _minari_path(args.minari_path)
    algo = load_ipd(args.model)
    if args.n_branches is not None:
        algo.config.augment.n_branches = args.n_branches
    import minari

    if args.out_id in minari.list_local_datasets():  # before the planning, not after
        raise ValueError(f"dataset {args.out_id!r} already exists; choose another --out-id or delete it")
    traj, meta = load_minari(args.dataset)
    res = algo.augment(traj)
    res.trajectories.to_minari(args.out_id, env=meta.get("env_spec"),
                               description="IPD-augmented dataset: infos['imagined'] flags model-generated rows")
    if args.report:
        augmentation_report(res, args.report)
    print(json.dumps({"dataset_id": args.out_id, **res.summary()}, indent=1))
    return 0


def _make_dataset(args) -> int:
    from .collect import make_d4rl_datasets

    info = make_d4rl_datasets(args.env, args.steps, args.root, args.namespace, args.seed)
    print(json.dumps(info, indent=1))
    return 0


def _bench(args) -> int:
    from .bench import check_device, load_profile, markdown_table, run_sweep
    from .bench_report import write_outputs

    prof = load_profile(args.profile)
    if args.device:
        prof = dataclasses.replace(prof, device=args.device)
    check_device(prof.device)
    # seed-major order: an interrupted sweep leaves whole seeds (every dataset and algorithm) finished
    jobs = [{"algo": a, "dataset": d, "seed": s} for s in args.seeds for d in args.datasets for a in args.algos]
    root = os.path.abspath(args.minari_path) if args.minari_path else os.environ.get("MINARI_DATASETS_PATH")
    rows = run_sweep(jobs, prof, args.out, workers=args.workers, dataset_root=root, ray_address=args.ray_address)
    print(markdown_table(rows, args.algos))
    written = write_outputs(rows, args.out, args.algos)
    print(f"wrote {', '.join(written)} to {args.out}")
    return 0


_COMMANDS = {"fit": _fit, "evaluate": _evaluate, "augment": _augment, "make-dataset": _make_dataset, "bench": _bench}

if __name__ == "__main__":
    sys.exit(main())
