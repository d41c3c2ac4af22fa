"""Can a run pick its own deployment without the environment? A diagnostic for a per-run deployment selector.

On hopper the deployed policy's score swings by tens of points between nearby checkpoints of one run, and every fixed
choice tried (an earlier stop, a longer weight average) helps one hopper set and hurts the other. A selector that ranks
a run's candidate weights from the run's own models and the dataset could choose per run. This script measures whether
any simple offline criterion can.

One IPD fit under the profile (its own stages 1-2, cached as the harness caches them, and its own transformer run)
keeps several candidate weights of that one training run:
  - ``step-<n>``: the weights ``fit`` would deploy (its weight average) at 60, 70, 80 and 90 % of the transformer steps;
  - ``final``: what ``fit`` returns -- the table's deployment, the control;
  - ``bc-0.9995``: a bias-corrected ~2,000-step average at the end (as in ``weight_averages.py``).
Each candidate is evaluated in the environment like the table's rows (``profile.eval_episodes`` episodes, the same env
seeds) and scored offline by every criterion in ``CRITERIA``, from the run's own models and the real dataset only:
  - ``wm_return``: the policy rolled out in the ensemble world model from dataset start states, to the first predicted
    terminal or ``horizon`` steps; the undiscounted imagined return. The same start states and model noise for every
    candidate (common random numbers), so candidates differ only by their actions.
  - ``wm_value``: the same rollouts cut at ``value_horizon`` steps: the discounted imagined return plus gamma^H V(s_H)
    where the rollout is still alive (a short model rollout bootstrapped with the fitted IQL value).
  - ``q_data``: IQL's advantage Q(s, pi(s)) - V(s) of the policy's action on real dataset windows (the context holds the
    dataset's own states and actions), averaged over every position of every window.
A selector deploys the candidate its criterion ranks first. ``--report`` compares that pick with the control per run
(paired, same training run) and with the best candidate in hindsight (the oracle, a ceiling no selector can pass).

    python benchmarks/select_deployment.py --datasets d4rlstyle/hopper/medium-replay-v0 --seeds 3 4 \\
        --minari-path ../shared/datasets --out benchmarks/results/select_deployment
    python benchmarks/select_deployment.py --report --out benchmarks/results/select_deployment
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_select_floor import imagine  # noqa: E402
from pooled_seeds import standard_error  # noqa: E402
from run_args import run_parser, write_report  # noqa: E402

CANDIDATE_FRACTIONS = (0.6, 0.7, 0.8, 0.9)  # of the transformer steps; the final weights are the control
LONG_DECAY = 0.9995  # the ~2,000-step average that scored 80.9 against 59.6 on hopper full-replay (seven seeds)
CONTROL = "final"
CRITERIA = ("wm_return", "wm_value", "q_data")


def candidate_steps(steps: int) -> list[int]:
    """The intermediate steps whose deployed weights are kept, for a run of ``steps`` transformer steps."""
    return sorted({max(1, round(steps * f)) for f in CANDIDATE_FRACTIONS} - {steps})


def row_file(out_dir: str, dataset_id: str, seed: int) -> str:
    return os.path.join(out_dir, "runs", dataset_id.replace("/", "__"), f"select_seed{seed}.json")


def start_states(traj, n: int, seed: int) -> np.ndarray:
    """``n`` episode start states of the dataset, drawn once per run (the same for every candidate)."""
    first_rows = traj.episode_starts[:-1]
    rng = np.random.default_rng(seed)
    return traj.observations[rng.choice(first_rows, size=min(n, len(first_rows)), replace=False)]


def data_windows(traj, context: int, n: int, seed: int):
    """``n`` full context windows of real episodes: start rows whose window stays inside its episode."""
    ends = traj.episode_starts[1:][traj.episode_ids]
    ok = np.flatnonzero(np.arange(traj.n_transitions) + context <= ends)
    if len(ok) == 0:
        raise SystemExit(f"no episode of the dataset is {context} steps long: q_data needs full context windows")
    rng = np.random.default_rng(seed)
    idx = rng.choice(ok, size=min(n, len(ok)), replace=False)[:, None] + np.arange(context)[None, :]
    return traj.observations[idx], traj.actions[idx]


def offline_scores(algo, starts: np.ndarray, windows, horizon: int, value_horizon: int, seed: int) -> dict:
    """Every criterion of ``CRITERIA`` for the weights the transformer holds now (no environment)."""
    import torch

    impl = algo.impl
    value, net = impl.value, impl.transformer
    # model rollouts from every start state at once, with the same model noise (seed) for every candidate
    roll = imagine(algo, starts, horizon, sample=True, seed=seed, value_horizon=value_horizon)
    with torch.no_grad():
        # q_data: the policy's action at every position of real windows, teacher-forced on the dataset's context
        net.eval()
        w_obs, w_act = (torch.from_numpy(x) for x in windows)
        token = algo.return_token_module()
        g = token(w_obs.reshape(-1, w_obs.shape[-1])).reshape(w_obs.shape[:2])
        pred = net(w_obs, w_act, g)
        adv = value.q(w_obs, pred) - value.v(w_obs)
    return {"wm_return": roll["return"], "wm_length": roll["length"], "wm_value": roll["value"],
            "q_data": float(adv.mean())}


def run(dataset_id: str, seed: int, out_dir: str, profile="cpu", dataset_root: str | None = None,
        n_starts: int = 100, horizon: int = 1000, value_horizon: int = 100, n_windows: int = 4096) -> dict:
    """Fits IPD once on ``dataset_id``, scores and evaluates every candidate, writes one JSON per (dataset, seed);
    reads it back instead when it exists."""
    from ipd_agent.bench import evaluate, versions, write_row
    from ipd_agent.data import normalized_score
    from ipd_agent.transformer import set_parameters

    path = row_file(out_dir, dataset_id, seed)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    got: dict = {}

    def check(traj, cfg):  # before any training: the criteria need this many real windows and start states
        got["windows"] = data_windows(traj, cfg.context_size, n_windows, seed)
        got["starts"] = start_states(traj, n_starts, seed)

    fit = train_candidates(dataset_id, seed, out_dir, profile, dataset_root, check)
    algo, kept, meta, ref, cfg, profile = fit["algo"], fit["kept"], fit["meta"], fit["ref"], fit["cfg"], fit["profile"]
    windows, starts = got["windows"], got["starts"]
    net = algo.impl.transformer
    eval_env = meta.get("env_spec") or meta["env_id"]
    candidates = {}
    for name, weights in kept.items():
        set_parameters(net, weights)
        ts = time.perf_counter()
        offline = offline_scores(algo, starts, windows, horizon, value_horizon, seed)
        te = time.perf_counter()
        rets = evaluate(algo, eval_env, profile.eval_episodes, seed)
        candidates[name] = {"normalized_score": float(np.mean([normalized_score(r, ref) for r in rets])),
                            "returns": [float(r) for r in rets], **offline,
                            "offline_time_s": te - ts, "eval_time_s": time.perf_counter() - te}
        print(f"{dataset_id} seed {seed} {name}: score {candidates[name]['normalized_score']:.1f}, "
              + ", ".join(f"{c} {offline[c]:.3g}" for c in CRITERIA), flush=True)
    row = {"dataset": dataset_id, "seed": seed, "control": CONTROL, "candidates": candidates,
           "criteria": {"n_starts": len(starts), "horizon": horizon, "value_horizon": value_horizon,
                        "n_windows": len(windows[0]), "gamma": algo.config.gamma},
           "train_wall_time_s": fit["train_time"], "stage_times_s": fit["stage_times"],
           "augmentation": fit["augmentation"], "profile": profile.name, "versions": versions(),
           "config": json.loads(cfg.serialize())}
    write_row(path, row)
    return row


def train_candidates(dataset_id: str, seed: int, out_dir: str, profile="cpu", dataset_root: str | None = None,
                     check=None) -> dict:
    """One IPD fit under ``profile`` (stages 1-2 cached under ``out_dir`` as the harness caches them) that keeps every
    candidate's weights. ``check(traj, cfg)`` runs after the data is loaded and before any training.

    Returns a dict: ``algo`` (holding the ``final`` weights, as ``fit`` left it), ``kept`` (candidate name -> parameter
    tensors in ``net.parameters()`` order, in the order of the module docstring), ``traj``, ``meta``, ``ref``, ``cfg``,
    ``profile``, ``train_time``, ``stage_times`` and ``augmentation``."""
    from ipd_agent.bench import load_profile, prefit_ipd, stage_config, start_ipd_run
    from ipd_agent.transformer import WeightAverage

    profile = load_profile(profile) if isinstance(profile, str) else profile
    traj, meta, ref, cfg = start_ipd_run(profile, dataset_id, seed, dataset_root)
    if check is not None:
        check(traj, cfg)
    algo, pre_times = prefit_ipd(cfg, traj, dataset_id, out_dir, stage_config(profile, seed))
    steps = profile.transformer_steps
    marks = set(candidate_steps(steps))
    kept: dict[str, list] = {}
    long_avg: list[WeightAverage] = []

    def on_step(model, epoch, step):
        net = model.impl.transformer
        if not long_avg:  # bias-corrected: the initial weights get no weight, so it starts at the first step
            long_avg.append(WeightAverage(net, LONG_DECAY, "bias_corrected"))
        long_avg[0].update()
        if step in marks:
            with model.deployed_weights():
                kept[f"step-{step}"] = [p.detach().clone() for p in net.parameters()]

    import d3rlpy

    t0 = time.perf_counter()
    out = algo.fit(traj, n_steps=steps, n_steps_per_epoch=steps, show_progress=False,
                   logger_adapter=d3rlpy.logging.NoopAdapterFactory(), callback=on_step)
    train_time = time.perf_counter() - t0
    net = algo.impl.transformer
    kept[CONTROL] = [p.detach().clone() for p in net.parameters()]  # what fit deployed
    kept[f"bc-{LONG_DECAY:g}"] = long_avg[0].average
    return {"algo": algo, "kept": kept, "traj": traj, "meta": meta, "ref": ref, "cfg": cfg, "profile": profile,
            "train_time": train_time, "stage_times": {**pre_times, **out["stage_times"]},
            "augmentation": out["augmentation"]}


def best(row: dict) -> str:
    """The candidate with the highest environment score (the oracle's pick)."""
    cands = row["candidates"]
    return max(cands, key=lambda name: cands[name]["normalized_score"])


def pick(row: dict, criterion: str) -> str:
    """The candidate a criterion deploys: the one it scores highest (ties: the first kept, i.e. the earliest)."""
    cands = row["candidates"]
    return max(cands, key=lambda name: cands[name][criterion])


def summarise(rows: list[dict]) -> dict:
    """Per criterion (and the oracle): the picked candidate's score minus the control's, per run, with mean and SE."""
    out = {}
    for crit in CRITERIA + ("oracle",):
        gains = []
        for r in rows:
            c = r["candidates"]
            name = best(r) if crit == "oracle" else pick(r, crit)
            gains.append(c[name]["normalized_score"] - c[r["control"]]["normalized_score"])
        g = np.asarray(gains, dtype=float)
        out[crit] = {"gains": gains, "mean": float(g.mean()), "se": float(standard_error(g))}
    return out


def spearman(x, y) -> float:
    """Rank correlation (average ranks for ties); nan when either side is constant."""
    from scipy.stats import spearmanr

    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def _mean_or_na(values) -> str:
    v = [x for x in values if np.isfinite(x)]
    return f"{np.mean(v):+.2f}" if v else "n/a"


def report(rows: list[dict]) -> str:
    """The markdown report: per run the control, each criterion's pick and the oracle; then the paired summary."""
    rows = sorted(rows, key=lambda r: (r["dataset"], r["seed"]))
    head = "| set | seed | control (final) | " + " | ".join(CRITERIA) + " | oracle |"
    lines = [head, "|" + "---|" * (len(CRITERIA) + 4)]
    for r in rows:
        c = r["candidates"]
        top = best(r)
        cells = [f"{c[pick(r, k)]['normalized_score']:.1f} ({pick(r, k)})" for k in CRITERIA]
        lines.append(f"| {r['dataset'].split('/', 1)[-1]} | {r['seed']} | {c[r['control']]['normalized_score']:.1f} | "
                     + " | ".join(cells) + f" | {c[top]['normalized_score']:.1f} ({top}) |")
    lines += ["", "Paired gain of the picked candidate over the control (mean ± SE over runs; same training run):", "",
              "| | " + " | ".join(CRITERIA) + " | oracle |", "|" + "---|" * (len(CRITERIA) + 2)]
    sets = sorted({r["dataset"] for r in rows})
    for ds in sets + ["all"]:
        sub = rows if ds == "all" else [r for r in rows if r["dataset"] == ds]
        ss = summarise(sub)
        lines.append(f"| {'all runs' if ds == 'all' else ds.split('/', 1)[-1]} (n = {len(sub)}) | "
                     + " | ".join(f"{ss[k]['mean']:+.1f} ± {ss[k]['se']:.1f}" for k in CRITERIA + ("oracle",)) + " |")
    rho = {k: [spearman([r["candidates"][n][k] for n in r["candidates"]],
                        [r["candidates"][n]["normalized_score"] for n in r["candidates"]]) for r in rows]
           for k in CRITERIA}
    lines += ["", "Rank correlation (Spearman) of each criterion with the candidates' scores within a run, mean over "
              "runs: " + ", ".join(f"{k} {_mean_or_na(v)}" for k, v in rho.items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = run_parser(__doc__, "select_deployment", report=True)
    a = p.parse_args()
    for ds in a.datasets:
        for seed in a.seeds:
            run(ds, seed, a.out, a.profile, a.minari_path)
    if a.report:
        write_report(a.out, "select_seed*.json", report, "select_deployment.py")


if __name__ == "__main__":
    main()
