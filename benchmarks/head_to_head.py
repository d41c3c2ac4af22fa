"""Head-to-head: IPD vs d3rlpy CQL, IQL, TD3+BC, BC and DT on the six shared datasets, with the paper's
ablations and the imagined-data scaling sweep. Same data objects, same budget, same evaluation (DESIGN §5).

    python benchmarks/head_to_head.py --minari-path ../shared/datasets            # all parts, CPU profile
    python benchmarks/head_to_head.py --part main --seeds 0                        # one part, one seed
    python benchmarks/head_to_head.py --report-only                                # tables + plots from finished runs
    python benchmarks/head_to_head.py --ray-address auto                           # the same sweep on a Ray cluster

Finished runs (one JSON file each under <out>/runs/) are skipped, so the command can be stopped and re-run.
Parts:
  main       six datasets x six algorithms
  ablations  on the medium-replay sets: no augmentation; greedy augmentation (IQL policy rollouts instead of MPC);
             value guidance on (alpha = 7.5, and DESIGN's alpha = 1; the CPU profile trains with alpha = 0);
             g = V(s) instead of the return-token model (DESIGN §2.6); fixed target return instead of a
             state-dependent token (evaluated on every IPD run); imagined windows at half of each batch
             (imagined-0.5); the token model's expectile at 0.97 (expectile-0.97); the previous CPU profile's QDT
             max-relabel tokens (qdt-token); the
             transformer's last iterate deployed instead of its weight average (last-iterate)
  scaling    imagined data volume x {0, 0.25, 0.5, 1, 2} of the default (number of branch points)
Writes <out>/results.csv, results.json, summary.md and bars.png, curves.png, scaling.png.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Optional

import numpy as np

from ipd_agent.bench import load_profile, run_sweep, summarise
from ipd_agent.bench_report import bar_chart, label_colours, learning_curves, mean_curves, write_csv

DATASETS = [f"d4rlstyle/{env}/{kind}-v0" for kind in ("medium-replay", "full-replay", "medium")
            for env in ("hopper", "halfcheetah")]
MEDIUM_REPLAY = [d for d in DATASETS if "medium-replay" in d]
ALGOS = ["ipd", "dt", "iql", "cql", "td3bc", "bc"]
# The CPU profile conditions on plain discounted returns at the 0.99 expectile, with imagined windows at a tenth of
# each batch, trains without the Q term (alpha = 0) at a learning rate of 3e-4 and deploys the weight average of its
# transformer (ema_decay 0.999). Each was chosen by a rule written down before fresh seeds (README "Results"), so the
# ablations below are switches away from that profile. The ablation rows in results/head_to_head were all trained at
# the previous rate, 1e-4: compare them with `ipd-lr-1e-4` (the table's `ipd` runs before the rate changed), not with
# today's `ipd`. Most were also run before the weight average joined the profile, so they deploy the last iterate:
# compare those with `ipd-last-iterate`.
ABLATIONS = {  # tag -> IPDConfig overrides
    # the last iterate deployed instead of the weight average (the profile before; training is the same)
    "last-iterate": {"transformer": {"ema_decay": 0.0}},
    "no-augment": {"augment": {"enabled": False}},
    "greedy": {"planner": {"greedy": True}},
    "alpha7.5": {"transformer": {"value_guidance": 7.5}},  # the Q term on, at the CPU profile's first weight
    "alpha1": {"transformer": {"value_guidance": 1.0}},  # DESIGN's default weight
    "value-token": {"transformer": {"return_token": "value"}},  # DESIGN §2.6's g = V(s) instead of the token model
    "imagined-0.5": {"transformer": {"imagined_ratio": 0.5}},  # imagined windows at half of each batch
    # a lower return-token expectile: only the token model differs (it sets g_t at inference; the transformer trains
    # on the data's own returns either way)
    "expectile-0.97": {"transformer": {"token_expectile": 0.97}},
    # the previous CPU profile: QDT tokens r + γ·max(g', V(s')), which give bad episodes' actions the good episodes'
    # tokens, asked for at the 0.9 expectile, imagined windows at half of each batch
    "qdt-token": {"transformer": {"rtg_relabel": "max", "token_expectile": 0.9, "imagined_ratio": 0.5}},
}
# Opt-in switches for diagnosing a gap (run only when named with --ablations; not part of the default sweep)
DIAGNOSTICS = {
    # DT's token layout: g_t, s_t, a_t as three tokens instead of (g_t + s_t), a_t -- does IPD's two-token layout
    # learn slower on mixed-quality data (halfcheetah full-replay learning curves lag DT's)?
    "dt-layout": {"transformer": {"tokens_per_step": 3}},
    # the token model floored at the 0.95 quantile of its g(s) over the dataset's states: near the states where the
    # data's episodes end (a hopper about to fall) g(s) drops and the policy copies those episodes; a DT target never
    # drops like that. Inference only: the transformer is the `ipd` run's own
    "token-floor-0.95": {"transformer": {"token_floor": 0.95}},
    # the running maximum of g(s) within each episode: the ask never drops (the hopper's pre-fall drop), but the
    # first steps keep g(s_0), unlike the floor that tipped the cheetah. Inference only: the `ipd` run's transformer
    "token-ratchet": {"transformer": {"token_ratchet": True}},
    # MPPI's weighted mean executed instead of its best sampled candidate: the best of 32 noisy candidates keeps their
    # noise (14.5 % of MPC action components at the bound on hopper medium-replay, 5 % in the data and in greedy
    # rollouts), which the transformer then imitates. Same stages, same warm-start guard; only the imagined actions
    "mppi-mean": {"planner": {"execute": "mean"}},
    # each action's imitation error weighted by IQL's own actor weights, min(exp(3·A(s, a)), 100): where one token
    # covers good and bad actions (the cheetah's stuck pose, the hopper's pre-fall steps) the better ones are copied
    # more. Same stages and imagined data; only the transformer's loss differs
    "adv-weight": {"transformer": {"advantage_weight": 3.0}},
    # three times the transformer's learning rate (3e-4, warm-up and everything else unchanged): on halfcheetah
    # full-replay IPD is still climbing steeply at 5,000 steps (35.4 -> 42.5 over the last 1,000) and reaches 45.3 at
    # 10,000; a larger step may get there within the budget of gradient steps
    # (since 2026-12-03 the CPU profile's own rate: its rows in results/learning_rate are the rule's evidence)
    "lr-3e-4": {"transformer": {"learning_rate": 3e-4}},
    # the rate of the CPU profile before that switch (DT's recipe): what the ablation rows were trained with
    "lr-1e-4": {"transformer": {"learning_rate": 1e-4}},
    # the rate decayed along a half cosine to 0 at the last step (after the same warm-up): on hopper full-replay the
    # deployed policy swings by tens of points between 20 % checkpoints (seed 0: 21/84/35/24/80) with the rate still
    # at its peak; annealed, the last iterates barely move, so the score should not depend on where training stops
    "lr-cosine": {"transformer": {"lr_schedule": "cosine"}},
    # the constant rate after warm-up (the profile's schedule until a switch to cosine)
    "lr-constant": {"transformer": {"lr_schedule": "constant"}},
    # meant as a weight average over ~2,000 steps instead of ~1,000 (hopper full-replay is at its best near 60 % of
    # the budget). A no-op at 5,000 steps: the average's warm-up caps its decay at (1 + n) / (10 + n) = 0.9982 by the
    # last step, below both 0.999 and 0.9995, so its runs repeat the profile's episode for episode (2 of 2 seeds)
    "ema-0.9995": {"transformer": {"ema_decay": 0.9995}},
    # three separately seeded transformers (stage 6 under seed + 1000 m) on the run's stages 1-5, deployed together:
    # the median of their actions. Its learning curve is member 0's alone (the members train one after another).
    # The same runs as benchmarks/seed_ensemble.py's `median` (tests/test_members.py)
    "members3": {"transformer": {"n_members": 3}},
}
VARIANTS = {**ABLATIONS, **DIAGNOSTICS}
SCALES = [0.25, 0.5, 2.0]  # 0 is the no-augment ablation and 1 the default run, both shared with the other parts


def jobs_for(part: str, seeds: list[int], profile, ablation_sets: list[str], scaling_sets: list[str],
             ablations: list[str] | None = None, scales: list[float] | None = None) -> list[dict]:
    if part == "main":
        # seed-major, so an interrupted sweep leaves whole seeds finished
        return [{"algo": a, "dataset": d, "seed": s} for s in seeds for d in DATASETS for a in ALGOS]
    if part == "ablations":
        tags = list(ABLATIONS) if ablations is None else ablations
        return [{"algo": "ipd", "tag": tag, "ipd_overrides": VARIANTS[tag], "dataset": d, "seed": s}
                for s in seeds for d in ablation_sets for tag in tags]
    if part == "scaling":
        base = profile.ipd.get("augment", {}).get("n_branches", 1000)
        return [{"algo": "ipd", "tag": f"branches-{round(base * f)}",
                 "ipd_overrides": {"augment": {"n_branches": round(base * f)}}, "dataset": d, "seed": s}
                for s in seeds for d in scaling_sets for f in (SCALES if scales is None else scales)]
    raise ValueError(part)


# ----- report ----------------------------------------------------------------------------------------------------

def load_rows(out: str) -> list[dict]:
    rows = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(out, "runs", "*", "*.json")))]
    derived = []
    for r in rows:  # the fixed-target-return ablation is a second evaluation of each IPD run
        if r["algo"] == "ipd" and "target_rtg" in r:
            derived.append({**r, "algo": "ipd-target-rtg", "normalized_score": r["target_rtg"]["normalized_score"],
                            "returns": r["target_rtg"]["returns"], "learning_curve": []})
    return rows + derived


def short(d: str) -> str:
    return d.replace("d4rlstyle/", "").replace("-v0", "")


def cell(summ, d, a, best=None) -> str:
    if a not in summ.get(d, {}):
        return "–"
    m, s, n = summ[d][a]
    txt = f"{m:.1f} (n=1)" if n == 1 else f"{m:.1f} ± {s:.1f}" + ("" if n >= 3 else f" (n={n})")
    return f"**{txt}**" if best is not None and a == best else txt


def main_table(rows: list[dict]) -> tuple[str, dict]:
    summ = summarise([r for r in rows if r["algo"] in ALGOS])
    if not summ:  # a folder of variant rows only (e.g. a diagnostic's): no table of means over no sets
        return "(no rows of the six algorithms in this folder)", {a: None for a in ALGOS}
    lines = ["| dataset | " + " | ".join(ALGOS) + " |", "|---|" + "---|" * len(ALGOS)]
    means: dict = {a: [] for a in ALGOS}
    for d in DATASETS:
        if d not in summ:
            continue
        best = max(summ[d], key=lambda a: summ[d][a][0])
        lines.append(f"| {short(d)} | " + " | ".join(cell(summ, d, a, best) for a in ALGOS) + " |")
        for a in ALGOS:
            if a in summ[d]:
                means[a].append(summ[d][a][0])
    n_sets = len([d for d in DATASETS if d in summ])
    avg = {a: (float(np.mean(v)) if len(v) == n_sets else None) for a, v in means.items()}
    lines.append(f"| **mean over {n_sets}** | " + " | ".join("–" if avg[a] is None else f"{avg[a]:.1f}"
                                                               for a in ALGOS) + " |")
    return "\n".join(lines), avg


def variant_table(rows: list[dict], labels: list[str], datasets: list[str]) -> str:
    """One row per dataset with any variant result; a mean row for variants run on every such dataset."""
    summ = summarise([r for r in rows if r["algo"] in labels])
    shown = [d for d in datasets if any(a in summ.get(d, {}) for a in labels[1:])]
    lines = ["| dataset | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for d in shown:
        lines.append(f"| {short(d)} | " + " | ".join(cell(summ, d, a) for a in labels) + " |")
    if len(shown) > 1:
        means = [f"{np.mean([summ[d][a][0] for d in shown]):.1f}" if all(a in summ[d] for d in shown) else "–"
                 for a in labels]
        lines.append(f"| **mean over {len(shown)}** | " + " | ".join(means) + " |")
    return "\n".join(lines)


def _ema(r: dict) -> float:
    return float(r.get("config", {}).get("transformer", {}).get("ema_decay", 0.0))


def scaling_points(rows: list[dict], dataset: str, default_branches: int) -> list[tuple]:
    """(n_branches, imagined transitions mean, score mean, score std, n) per volume on one dataset.

    The default volume comes from the `ipd` rows, or from `ipd-last-iterate` where the sweep's rows deploy the last
    iterate and `ipd` does not (the sweep ran before the profile deployed the weight average)."""
    sweep = {_ema(r) for r in rows if r["dataset"] == dataset and r["algo"].startswith("ipd-branches-")}
    ipd = {_ema(r) for r in rows if r["dataset"] == dataset and r["algo"] == "ipd"}
    default_label = "ipd-last-iterate" if sweep == {0.0} and ipd - sweep else "ipd"
    by: dict = {}
    for r in rows:
        if r["dataset"] != dataset:
            continue
        if r["algo"] == "ipd-no-augment":
            nb = 0
        elif r["algo"] == default_label:
            nb = default_branches
        elif r["algo"].startswith("ipd-branches-"):
            nb = int(r["algo"].rsplit("-", 1)[1])
        else:
            continue
        im = r.get("augmentation", {}).get("imagined_transitions", 0) if nb else 0
        by.setdefault(nb, []).append((im, r["normalized_score"]))
    return [(nb, float(np.mean([x[0] for x in v])), float(np.mean([x[1] for x in v])),
             float(np.std([x[1] for x in v])), len(v)) for nb, v in sorted(by.items())]


# the six algorithms, and an opt-in diagnostic where its rows are in a folder without baselines (not the ablations:
# they have their own table); the index fixes each label's colour
PLOTTED = ALGOS + [f"ipd-{t}" for t in DIAGNOSTICS]


def plotted_labels(rows: list[dict]) -> list[str]:
    """The labels the bar chart and the learning curves draw, in legend order: those of PLOTTED with rows here.

    A folder with baseline rows is a main table: it draws the six algorithms only, so a diagnostic run there (not the
    profile) never sits among them on the front page; diagnostics are drawn in folders of IPD rows alone."""
    have = {r["algo"] for r in rows}
    shown = ALGOS if have & (set(ALGOS) - {"ipd"}) else PLOTTED
    return [a for a in shown if a in have]


def plots(rows: list[dict], out: str, scaling_sets: list[str], default_branches: int) -> list[str]:
    written = []
    plotted = [r for r in rows if r["algo"] in PLOTTED]
    sets = [d for d in DATASETS if d in summarise(plotted)]
    if sets:  # per-dataset bars with std error bars, and the learning curves
        present = plotted_labels(rows)
        colour = label_colours(present)
        bar_chart(plotted, sets, present, os.path.join(out, "bars.png"),
                  "IPD vs d3rlpy baselines, mean ± std over seeds" if set(present) <= set(ALGOS)
                  else "Final score per label, mean ± std over seeds", name=short, colours=colour, width=11)
        written.append("bars.png")
        learning_curves(rows, sets, present, os.path.join(out, "curves.png"), name=short, colours=colour)
        written.append("curves.png")
    pts = {d: scaling_points(rows, d, default_branches) for d in scaling_sets}
    if any(len(p) > 1 for p in pts.values()):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 4))
        for d, p in pts.items():
            if len(p) > 1:
                ax.errorbar([x[1] for x in p], [x[2] for x in p], yerr=[x[3] for x in p], marker="o", capsize=3,
                            label=short(d))
        ax.set_xlabel("imagined transitions in the training set")
        ax.set_ylabel("normalised score")
        ax.set_title("IPD score vs imagined data volume")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "scaling.png"), dpi=110)
        plt.close(fig)
        written.append("scaling.png")
    return written


def curve_table(rows: list[dict]) -> str:
    """Mean normalised score at each evaluation point, per dataset and label: how fast each algorithm gets there,
    not only where it ends."""
    curves = mean_curves(rows)
    if not curves:
        return ""
    fracs = sorted({f for c in curves.values() for f in c})
    order = {a: i for i, a in enumerate(ALGOS)}
    keys = sorted(curves, key=lambda k: (DATASETS.index(k[0]) if k[0] in DATASETS else len(DATASETS), k[0],
                                         order.get(k[1], len(ALGOS)), k[1]))
    lines = ["| dataset | label | n | " + " | ".join(f"{f} %" for f in fracs) + " |",
             "|---|---|---|" + "---|" * len(fracs)]
    for d, a in keys:
        c = curves[(d, a)]
        n = max(len(v) for v in c.values())
        lines.append(f"| {short(d)} | {a} | {n} | " +
                     " | ".join(f"{np.mean(c[f]):.1f}" if f in c else "–" for f in fracs) + " |")
    return "\n".join(lines)


README_START = "<!-- head_to_head main table: written by benchmarks/head_to_head.py --readme README.md -->"
README_END = "<!-- end of head_to_head main table -->"


def header_line(rows: list[dict], profile) -> str:
    """What the numbers are: profile, budget, seeds and the commits the rows were made at."""
    seeds = sorted({r["seed"] for r in rows})
    commits = sorted({str(r["versions"].get("git_commit")) for r in rows})
    return (f"Profile `{profile.name}` ({profile.q_steps} Q-learning steps, {profile.transformer_steps} transformer "
            f"steps, {profile.eval_episodes} evaluation episodes of the policy fit returns, no selection by "
            f"evaluation); normalised score, mean ± std over seeds {seeds} (n shown where < 3); code at "
            f"{', '.join(commits)}.")


def readme_block(rows: list[dict], profile) -> str:
    """The README's copy of the main table, between its two markers, so the front page cannot drift from the rows.
    Its header names the seeds and commits of the six algorithms' rows only: an ablation row does not touch it."""
    main = [r for r in rows if r["algo"] in ALGOS]
    return "\n".join([README_START, header_line(main, profile), "", main_table(main)[0], README_END])


def update_readme(path: str, block: str) -> None:
    with open(path) as f:
        text = f.read()
    if text.count(README_START) != 1 or text.count(README_END) != 1:
        raise SystemExit(f"{path} needs exactly one pair of main-table markers:\n{README_START}\n{README_END}")
    head, rest = text.split(README_START)
    tail = rest.split(README_END)[1]
    with open(path, "w") as f:
        f.write(head + block + tail)


def ablation_labels(rows: list[dict]) -> list[str]:
    """The ablation table's columns: `ipd`, its previous-rate control, the ablations in order, any other kept variant,
    the fixed target return last; only those with rows in this folder."""
    labels = ["ipd", "ipd-lr-1e-4"] + [f"ipd-{t}" for t in ABLATIONS]
    # rows of variants no longer in ABLATIONS (kept results, e.g. benchmarks/results/alpha_check) still get a column
    labels += sorted({r["algo"] for r in rows if r["algo"].startswith("ipd-") and r["algo"] not in labels
                      and not r["algo"].startswith(("ipd-branches-", "ipd-target-rtg"))}) + ["ipd-target-rtg"]
    # a variant without rows here (alpha7.5's are in runs_alpha7.5) gets no all-dash column
    return [a for a in labels if any(r["algo"] == a for r in rows)]


def report(out: str, profile, scaling_sets: list[str], rows: Optional[list[dict]] = None) -> str:
    rows = load_rows(out) if rows is None else rows
    default_branches = profile.ipd.get("augment", {}).get("n_branches", 1000)
    table, avg = main_table(rows)
    ab_labels = ablation_labels(rows)
    lines = [header_line(rows, profile), "", "## Main table", "", table, "",
             "## Ablations", "", variant_table(rows, ab_labels, DATASETS), "",
             "## Scaling with imagined data", ""]
    for d in scaling_sets:
        pts = scaling_points(rows, d, default_branches)
        if pts:
            lines += [f"{short(d)}:", "", "| branch points | imagined transitions | score |", "|---|---|---|"]
            lines += [f"| {nb} | {im:.0f} | {m:.1f} ± {s:.1f} (n={n}) |" for nb, im, m, s, n in pts] + [""]
    curves = curve_table(rows)
    if curves:
        lines += ["## Learning curves (mean normalised score at each share of the step budget)", "", curves, ""]
    times: dict = {}
    for r in rows:
        if r["algo"] in ALGOS:
            times.setdefault(r["algo"], []).append(r["train_wall_time_s"])
    lines += ["## Training wall time per run (s, one CPU thread, mean)", "",
              ", ".join(f"{a} {np.mean(v):.0f}" for a, v in times.items())]
    ipd_stages: dict = {}
    for r in rows:
        if r["algo"] == "ipd":
            for k, v in r["stage_times_s"].items():
                ipd_stages.setdefault(k, []).append(v)
    if ipd_stages:
        lines.append("; IPD by stage: " + ", ".join(f"{k} {np.mean(v):.0f}" for k, v in ipd_stages.items()))
    lines += ["", "Plots: " + ", ".join(plots(rows, out, scaling_sets, default_branches))]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    write_csv(rows, os.path.join(out, "results.csv"))
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="+", default=["main", "ablations", "scaling"], choices=["main", "ablations", "scaling"])
    p.add_argument("--minari-path", default=os.environ.get("MINARI_DATASETS_PATH", "../shared/datasets"))
    p.add_argument("--profile", default="cpu", help="cpu, tiny, gpu or a JSON file")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--algos", nargs="+", default=None, help="restrict the main part to these algorithms")
    p.add_argument("--datasets", nargs="+", default=None, choices=DATASETS,
                   help="restrict the main part to these datasets")
    p.add_argument("--ablations", nargs="+", default=None, choices=list(VARIANTS),
                   help="run only these ablations; diagnostics (" + ", ".join(DIAGNOSTICS) + ") run only when named")
    p.add_argument("--ablation-datasets", nargs="+", default=MEDIUM_REPLAY)
    p.add_argument("--scaling-datasets", nargs="+", default=[MEDIUM_REPLAY[0]])
    p.add_argument("--scales", type=float, nargs="+", default=SCALES,
                   help="imagined-data volumes of the scaling part, as multiples of the profile's branch points")
    p.add_argument("--workers", type=int, default=2, help="parallel runs, one torch thread each")
    p.add_argument("--ray-address", default=None, help="run on this Ray cluster instead of local processes")
    p.add_argument("--out", default="benchmarks/results/head_to_head")
    p.add_argument("--report-only", action="store_true", help="only rebuild tables and plots from finished runs")
    p.add_argument("--readme", default=None, help="also rewrite the main table between the markers in this file")
    a = p.parse_args()
    prof = load_profile(a.profile)
    if not a.report_only:
        jobs = []
        for part in a.part:
            for j in jobs_for(part, a.seeds, prof, a.ablation_datasets, a.scaling_datasets, a.ablations,
                              a.scales):
                if part == "main" and ((a.algos and j["algo"] not in a.algos) or
                                       (a.datasets and j["dataset"] not in a.datasets)):
                    continue
                jobs.append(j)
        run_sweep(jobs, prof, a.out, workers=a.workers, dataset_root=os.path.abspath(a.minari_path),
                  ray_address=a.ray_address)
    rows = load_rows(a.out)
    print(report(a.out, prof, a.scaling_datasets, rows))
    if a.readme:
        update_readme(a.readme, readme_block(rows, prof))


if __name__ == "__main__":
    main()
