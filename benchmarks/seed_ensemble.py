"""Deploy separately seeded policies together: the median action of several stage-6 trainings on one run's data.

On hopper a run's score is decided by where its transformer happens to stop: the deployed policy's score swings by
tens of points between nearby steps. Deploying a run's own candidates together (``deploy_together.py``) did not help:
weights of one training run tend to fail together. This tests members that fail independently: the transformer
(stage 6: its initial weights, batches, dropout and return-token model) trained ``--members`` times with different
seeds on the same stages 1-5 (IQL value, world model, augmentation) of one run, deployed as one policy that executes
the element-wise median of the members' actions (``deploy_together.MedianOfPolicies``).

One IPD run under the profile (stages 1-2 cached as the harness caches them), then per (dataset, seed):
  - ``member-0``: what ``fit`` returns, the table's run of that seed (the control);
  - ``member-<m>``: the same model with stage 6 trained afresh under seed ``seed + 1000 m`` (``fit``'s own stage-6
    routine, same steps and settings);
  - ``median``: all members, each with its own context and return token; every context records the executed action.
Each is evaluated like the table's rows (``profile.eval_episodes`` episodes, the table's env seeds). ``--report`` gives,
per run, the median's gain over the members' mean (the expected score of deploying one of them) and over
``member-0``, and how much of the hopper's seed-to-seed spread stage 6 alone accounts for.

``--algo dt`` does the same for the table's DecisionTransformer (the harness's config and target return): ``member-0``
trained after ``d3rlpy.seed(seed)`` as the table's run, ``member-<m>`` after ``d3rlpy.seed(seed + 1000 m)``, and the
median deployment records the executed action in every member's context. An ensemble costs each method the same
multiple of its training, so a gain for IPD counts against DT only beside DT's own.

    python benchmarks/seed_ensemble.py --datasets d4rlstyle/hopper/full-replay-v0 --seeds 0 1 \\
        --minari-path ../shared/datasets --out benchmarks/results/seed_ensemble
    python benchmarks/seed_ensemble.py --report --out benchmarks/results/seed_ensemble
    python benchmarks/seed_ensemble.py --algo dt --datasets d4rlstyle/hopper/full-replay-v0 --seeds 0 \\
        --minari-path ../shared/datasets --out benchmarks/results/seed_ensemble_dt
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deploy_together import MedianOfPolicies  # noqa: E402
from pooled_seeds import standard_error  # noqa: E402
from run_args import RESULTS, read_rows, run_parser, write_report  # noqa: E402

SEED_STRIDE = 1000  # member m's stage 6 is seeded seed + 1000 m: far from every table seed's own


def row_file(out_dir: str, dataset_id: str, seed: int) -> str:
    return os.path.join(out_dir, "runs", dataset_id.replace("/", "__"), f"ensemble_seed{seed}.json")


def finished_row(path: str, n_members: int) -> dict | None:
    """The row of a finished run (read back, not rerun), else None; refuses too few members before any training."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if n_members < 2:
        raise SystemExit("--members must be at least 2: the median of one policy is the policy")
    return None


def evaluate_all(policies: list, env, episodes: int, seed: int, ref, label: str, target=None) -> dict:
    """Every ``(name, policy, model)`` evaluated like the table's rows (same env seeds): score, returns, time."""
    from ipd_agent.bench import evaluate
    from ipd_agent.data import normalized_score

    results = {}
    for name, policy, model in policies:
        t0 = time.perf_counter()
        rets = evaluate(model, env, episodes, seed, target, policy=policy)
        results[name] = {"normalized_score": float(np.mean([normalized_score(r, ref) for r in rets])),
                         "returns": [float(r) for r in rets], "eval_time_s": time.perf_counter() - t0}
        print(f"{label} {name}: {results[name]['normalized_score']:.1f}", flush=True)
    return results


def train_member(algo, m: int, steps: int):
    """A copy of the fitted ``algo`` whose stage 6 (transformer and return token) is trained afresh under seed
    ``seed + SEED_STRIDE * m``, on the same augmented data, with ``fit``'s own stage-6 routine."""
    import d3rlpy
    from d3rlpy.logging import D3RLPyLogger

    member = copy.deepcopy(algo)
    member.config.seed = algo.config.seed + SEED_STRIDE * m  # stage 6 draws every seed from config.seed
    member._reset_transformer()  # fresh initial weights under the member's seed, token model unfitted
    logger = D3RLPyLogger(algo=member, adapter_factory=d3rlpy.logging.NoopAdapterFactory(),
                          experiment_name=f"member{m}", n_steps_per_epoch=steps, with_timestamp=False)
    t0 = time.perf_counter()
    member._fit_transformer(member.augmentation, steps, steps, logger, False, None, 0, 10**9, None)
    logger.close()
    return member, time.perf_counter() - t0


class MedianOfDT:
    """The median deployment for d3rlpy DecisionTransformer members (their ``StatefulTransformerWrapper``s): every
    wrapper predicts from its own context; each then records the executed action in place of its own."""

    def __init__(self, wrappers: list) -> None:
        self.wrappers = wrappers

    def predict(self, x: np.ndarray, reward: float = 0.0) -> np.ndarray:
        import torch

        from ipd_agent.policy import median_action  # the same rule as IPD's members

        acts = [torch.as_tensor(w.predict(x, reward)) for w in self.wrappers]
        action = median_action(acts).numpy().astype(np.float32)
        for w in self.wrappers:  # the wrapper appended a pad after its own action: overwrite the action before it
            w._actions[-2] = action
        return action

    def reset(self) -> None:
        for w in self.wrappers:
            w.reset()


def run_dt(dataset_id: str, seed: int, out_dir: str, n_members: int = 3, profile="cpu",
           dataset_root: str | None = None) -> dict:
    """``run`` for the table's DecisionTransformer: ``n_members`` trainings under seeds ``seed + 1000 m``."""
    import d3rlpy
    import torch

    from ipd_agent.bench import _baseline, load_profile, versions, write_row
    from ipd_agent.data import load_minari, reference_scores

    path = row_file(out_dir, dataset_id, seed)
    done = finished_row(path, n_members)
    if done is not None:
        return done
    profile = load_profile(profile) if isinstance(profile, str) else profile
    torch.set_num_threads(profile.threads)
    if dataset_root:
        os.environ["MINARI_DATASETS_PATH"] = dataset_root
    traj, meta = load_minari(dataset_id)
    ref, env_id = reference_scores(meta), meta["env_id"]
    target = next((v for k, v in profile.dt_target_return.items() if env_id.startswith(k)), 3600.0)
    steps = profile.transformer_steps
    members, train_times = [], []
    for m in range(n_members):
        d3rlpy.seed(seed + SEED_STRIDE * m)  # as run_one seeds the table's run, for m = 0
        algo = _baseline("dt", profile, profile.device)
        t0 = time.perf_counter()
        algo.fit(traj.to_d3rlpy(), n_steps=steps, n_steps_per_epoch=steps, show_progress=False, save_interval=10**9,
                 logger_adapter=d3rlpy.logging.NoopAdapterFactory(), experiment_name=f"dt_member{m}")
        members.append(algo)
        train_times.append(time.perf_counter() - t0)
    env = meta.get("env_spec") or env_id
    policies = [(f"member-{m}", None, a) for m, a in enumerate(members)]
    policies.append(("median", MedianOfDT([a.as_stateful_wrapper(target) for a in members]), members[0]))
    results = evaluate_all(policies, env, profile.eval_episodes, seed, ref, f"{dataset_id} seed {seed} dt", target)
    row = {"algo": "dt", "dataset": dataset_id, "seed": seed, "n_members": n_members, "seed_stride": SEED_STRIDE,
           "results": results, "member_train_time_s": train_times, "target_return": target,
           "profile": profile.name, "versions": versions(), "config": json.loads(members[0].config.serialize())}
    write_row(path, row)
    return row


def run(dataset_id: str, seed: int, out_dir: str, n_members: int = 3, profile="cpu",
        dataset_root: str | None = None) -> dict:
    """Fits ``n_members`` separately seeded transformers on one run's stages 1-5, evaluates each alone and their
    median; one JSON per (dataset, seed), read back if it exists."""
    import d3rlpy

    from ipd_agent.bench import load_profile, prefit_ipd, stage_config, start_ipd_run, versions, write_row
    from ipd_agent.policy import TransformerContext

    path = row_file(out_dir, dataset_id, seed)
    done = finished_row(path, n_members)
    if done is not None:
        return done
    profile = load_profile(profile) if isinstance(profile, str) else profile
    traj, meta, ref, cfg = start_ipd_run(profile, dataset_id, seed, dataset_root)
    algo, pre_times = prefit_ipd(cfg, traj, dataset_id, out_dir, stage_config(profile, seed))
    steps = profile.transformer_steps
    t0 = time.perf_counter()
    out = algo.fit(traj, n_steps=steps, n_steps_per_epoch=steps, show_progress=False,
                   logger_adapter=d3rlpy.logging.NoopAdapterFactory())
    members, train_times = [algo], [time.perf_counter() - t0]
    for m in range(1, n_members):
        member, seconds = train_member(algo, m, steps)
        members.append(member)
        train_times.append(seconds)
    env = meta.get("env_spec") or meta["env_id"]
    policies = [(f"member-{m}", None, a) for m, a in enumerate(members)]
    policies.append(("median", MedianOfPolicies(contexts=[TransformerContext(a, 1) for a in members]), algo))
    results = evaluate_all(policies, env, profile.eval_episodes, seed, ref, f"{dataset_id} seed {seed}")
    row = {"dataset": dataset_id, "seed": seed, "n_members": n_members, "seed_stride": SEED_STRIDE,
           "results": results, "member_train_time_s": train_times, "stage_times_s": {**pre_times, **out["stage_times"]},
           "augmentation": out["augmentation"], "profile": profile.name, "versions": versions(),
           "config": json.loads(cfg.serialize())}
    write_row(path, row)
    return row


def member_scores(row: dict) -> np.ndarray:
    return np.asarray([v["normalized_score"] for k, v in sorted(row["results"].items()) if k.startswith("member-")])


def report(rows: list[dict]) -> str:
    """Per run every member, their mean and the median's score; then the paired gains and the spread of scores
    within a run (stage 6 alone) against the spread of ``member-0`` across runs (every stage)."""
    rows = sorted(rows, key=lambda r: (r["dataset"], r["seed"]))
    lines = ["| set | seed | members alone (member-0 first) | members' mean | median of members | gain over mean | "
             "gain over member-0 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        s, med = member_scores(r), r["results"]["median"]["normalized_score"]
        lines.append(f"| {r['dataset'].split('/', 1)[-1]} | {r['seed']} | {', '.join(f'{x:.1f}' for x in s)} | "
                     f"{s.mean():.1f} | {med:.1f} | {med - s.mean():+.1f} | {med - s[0]:+.1f} |")
    ipd = rows[0].get("algo", "ipd") == "ipd"
    shared = "; members share stages 1-5" if ipd else ""
    lines += ["", f"Paired gains of the median (mean ± SE over runs{shared}), and "
              "the spread of single-member scores: within a run (" + ("stage 6 reseeded" if ipd else "DT reseeded")
              + "; root mean of the per-run variances) and across runs (`member-0` of each seed" + ("; every stage "
              "reseeded" if ipd else "") + "):", "",
              "| | gain over members' mean | gain over member-0 | SD within a run | SD of member-0 across runs |",
              "|---|---|---|---|---|"]
    for ds in sorted({r["dataset"] for r in rows}) + ["all"]:
        sub = rows if ds == "all" else [r for r in rows if r["dataset"] == ds]
        med = np.asarray([r["results"]["median"]["normalized_score"] for r in sub])
        s = [member_scores(r) for r in sub]
        over_mean, over_first = med - np.asarray([x.mean() for x in s]), med - np.asarray([x[0] for x in s])
        within = float(np.sqrt(np.mean([x.var(ddof=1) for x in s])))
        across = float(np.std([x[0] for x in s], ddof=1)) if len(s) > 1 else float("nan")
        lines.append(f"| {'all runs' if ds == 'all' else ds.split('/', 1)[-1]} (n = {len(sub)}) | "
                     f"{over_mean.mean():+.1f} ± {standard_error(over_mean):.1f} | "
                     f"{over_first.mean():+.1f} ± {standard_error(over_first):.1f} | {within:.1f} | {across:.1f} |")
    return "\n".join(lines) + "\n"


TABLE_SEEDS = (0, 1, 2)  # the table's seeds: the comparison below uses these runs only
BASELINES = ("dt", "iql", "cql", "td3bc", "bc")


BESIDE_BARS = {  # label in the summary -> (legend, the table's algorithm whose colour it takes, alpha, hatch)
    "median": ("IPD, median of 3", "ipd", 1.0, ""), "member-0": ("IPD member-0 (this machine)", "ipd", 0.45, ""),
    "table-ipd": ("table ipd", "ipd", 0.2, "//"), "table-dt": ("table dt", "dt", 0.45, ""),
    "dt-median": ("DT, median of 3", "dt", 1.0, "")}


def beside_plot(summ: dict, path: str) -> None:
    """``beside.png``: per set, IPD's median of 3 beside the same machine's single policy, the table's IPD and DT, and
    DT's own median of 3 where it ran (mean ± std over seeds 0-2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from head_to_head import DATASETS, label_colours, short

    colour = label_colours(["ipd", "dt"])
    fig, ax = plt.subplots(figsize=(11, 4))
    w = 0.8 / len(BESIDE_BARS)
    for i, (key, (legend, algo, alpha, hatch)) in enumerate(BESIDE_BARS.items()):
        got = [summ[ds].get(key) for ds in DATASETS]
        ax.bar(np.arange(len(DATASETS)) + (i - (len(BESIDE_BARS) - 1) / 2) * w,
               [g[0] if g else np.nan for g in got], w, yerr=[g[1] if g else 0.0 for g in got], capsize=2,
               color=colour[algo], alpha=alpha, hatch=hatch, edgecolor=colour[algo], label=legend)
    ax.set_xticks(np.arange(len(DATASETS)), [short(d).replace("/", "\n") for d in DATASETS])
    ax.set_ylabel("normalised score (final policy)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)  # room for the legend above the error bars
    ax.legend(ncol=len(BESIDE_BARS), fontsize=8)
    ax.set_title("Median of three separately seeded policies beside the main table, mean ± std over seeds 0-2")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def beside_the_table(rows: list[dict], table_rows: list[dict], dt_rows: list[dict] = (),
                     plot: str | None = None) -> str:
    """The median of members as a whole IPD variant beside the main table (``--table``, seeds 0-2): per set its mean
    over seeds, this machine's single run (``member-0``), the table's ``ipd`` and baselines, and DT's own median where
    run; then the bar: its six-set mean above every baseline's, and above the table's DT on every replay set, and
    against DT's own median where it has every seed. With every replay set but not all six run to seeds 0-2, the
    replay-set parts alone. ``plot``: also draw the bars there (``beside_plot``)."""
    from head_to_head import DATASETS, cell, short

    from ipd_agent.bench import summarise

    def labelled(rs, label, pick) -> list[dict]:  # as table rows, so the table's own summary and cells apply
        return [{"dataset": r["dataset"], "algo": label, "normalized_score": pick(r)} for r in rs
                if r["seed"] in TABLE_SEEDS]

    median = lambda r: r["results"]["median"]["normalized_score"]  # noqa: E731
    summ = summarise([*labelled(rows, "median", median),
                      *labelled(rows, "member-0", lambda r: r["results"]["member-0"]["normalized_score"]),
                      *labelled(dt_rows, "dt-median", median),
                      *[{**r, "algo": "table-" + r["algo"]} for r in table_rows
                        if r["algo"] in ("ipd",) + BASELINES and r["seed"] in TABLE_SEEDS]])
    lines = ["| dataset | median of 3 | `member-0` (this machine) | table `ipd` | table `dt` | DT's median of 3 | "
             "best other baseline |", "|---|---|---|---|---|---|---|"]
    for ds in DATASETS:
        got = summ.get(ds, {})
        others = {a: got[f"table-{a}"][0] for a in BASELINES[1:] if f"table-{a}" in got}
        best = max(others, key=others.get) if others else None
        lines.append(f"| {short(ds)} | " + " | ".join(cell(summ, ds, a) for a in (
            "median", "member-0", "table-ipd", "table-dt", "dt-median")) + " | "
                     + (f"{best} {others[best]:.1f}" if best else "–") + " |")
    complete = [ds for ds in DATASETS if summ.get(ds, {}).get("median", (0, 0, 0))[2] == len(TABLE_SEEDS)]
    lines += ["", f"Sets with all of seeds {list(TABLE_SEEDS)}: {len(complete)} of {len(DATASETS)}."]
    replay = [ds for ds in DATASETS if "replay" in ds]
    if not set(replay) <= set(complete):  # the bar's DT part needs every replay set
        return "\n".join(lines) + "\n"
    if plot:
        beside_plot(summ, plot)
        lines += ["", f"![beside the table]({os.path.basename(plot)})"]
    misses = [short(ds) for ds in replay if summ[ds]["median"][0] <= summ[ds]["table-dt"][0]]
    above_dt = "yes" if not misses else "no (" + ", ".join(misses) + ")"
    if len(complete) == len(DATASETS):
        set_mean = lambda a: float(np.mean([summ[ds][a][0] for ds in DATASETS]))  # noqa: E731
        ours = set_mean("median")
        lines += ["", f"Mean over the six sets: median of 3 **{ours:.1f}**, `member-0` {set_mean('member-0'):.1f}; "
                  "table: " + ", ".join(f"`{a}` {set_mean('table-' + a):.1f}" for a in ("ipd",) + BASELINES) + ".", ""]
        above_all = all(ours > set_mean("table-" + a) for a in BASELINES)
        lines.append(f"The bar: six-set mean above every baseline's: {'yes' if above_all else 'no'}; above the table's "
                     f"DT on every replay set: {above_dt}.")
    else:  # the replay sets alone: no six-set mean
        lines += ["", "The bar on the replay sets (the six-set mean needs all six sets): above the table's DT on "
                  f"every replay set: {above_dt}."]
    # DT trained as many times and deployed the same way: the same-multiple comparison, on the sets where it ran
    dt_done = [ds for ds in replay if summ[ds].get("dt-median", (0, 0, 0))[2] == len(TABLE_SEEDS)]
    if dt_done:
        verdict = lambda ds: "higher" if summ[ds]["median"][0] > summ[ds]["dt-median"][0] else "not higher"  # noqa
        lines += ["", "Against DT's own median of 3 (three DT trainings, the same deployment), on the replay sets "
                  f"where it has all of seeds {list(TABLE_SEEDS)}: " + "; ".join(
                      f"{short(ds)} {summ[ds]['median'][0]:.1f} against {summ[ds]['dt-median'][0]:.1f} "
                      f"({verdict(ds)})" for ds in dt_done) + "."
                  + ("" if len(dt_done) == len(replay) else " Not run to three seeds: "
                     + ", ".join(short(ds) for ds in replay if ds not in dt_done) + ".")]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = run_parser(__doc__, "seed_ensemble", report=True)
    p.add_argument("--members", type=int, default=3, help="separately seeded stage-6 trainings per run")
    p.add_argument("--algo", choices=["ipd", "dt"], default="ipd",
                   help="whose members: IPD's stage 6, or the table's DecisionTransformer (give it its own --out)")
    p.add_argument("--table", nargs="?", const=os.path.join(RESULTS, "head_to_head"), default=None,
                   help="with --report: also set the median beside the main table of this head_to_head folder")
    p.add_argument("--table-dt", default=os.path.join(RESULTS, "seed_ensemble_dt"),
                   help="with --table: the folder of DT's own median runs (--algo dt)")
    a = p.parse_args()
    for ds in a.datasets:
        for seed in a.seeds:
            (run_dt if a.algo == "dt" else run)(ds, seed, a.out, a.members, a.profile, a.minari_path)
    if a.report:
        table = None
        if a.algo == "ipd" and a.table:
            from head_to_head import load_rows

            dt_rows = read_rows(a.table_dt, "ensemble_seed*.json")
            table = lambda rows: beside_the_table(  # noqa: E731
                rows, load_rows(a.table), dt_rows, os.path.join(a.out, "beside.png"))
        flags = []  # the options besides --report and --out, for the report's header
        if table is not None:
            flags.append("--table" if a.table == os.path.join(RESULTS, "head_to_head")
                         else f"--table {os.path.relpath(a.table)}")
            if a.table_dt != os.path.join(RESULTS, "seed_ensemble_dt"):
                flags.append(f"--table-dt {os.path.relpath(a.table_dt)}")
        write_report(a.out, "ensemble_seed*.json",
                     report if table is None else (lambda rows: report(rows) + "\n## Beside the table\n\n"
                                                   + table(rows)), "seed_ensemble.py", " ".join(flags))


if __name__ == "__main__":
    main()
