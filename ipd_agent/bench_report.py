"""What a sweep's rows become: results JSON and CSV, a markdown table, a per-dataset bar chart with error bars and the
learning curves, as PNG. ``ipd-agent bench`` writes them all; ``benchmarks/head_to_head.py`` draws its figures with
the same functions.
"""
from __future__ import annotations

import csv
import json
import os
import re
from typing import Callable, Optional

import numpy as np

from .bench import ALGOS, markdown_table, summarise

__all__ = ["write_outputs", "write_csv", "bar_chart", "learning_curves", "mean_curves", "label_colours", "short_name"]

# the columns of results.csv; every row keeps everything else (config, versions, curves) in results.json
CSV_KEYS = ["algo", "dataset", "seed", "normalized_score", "return_mean", "train_wall_time_s", "gradient_steps",
            "peak_rss_mib"]
# colours for labels beyond the six algorithms (C0-C5), in legend order
EXTRA_COLOURS = ["C6", "C7", "C8", "C9", "black", "gold", "navy", "teal", "orchid", "sienna", "olive", "crimson"]


def short_name(dataset_id: str) -> str:
    """A Minari id without its namespace and version (d4rlstyle/hopper/medium-replay-v0 -> hopper/medium-replay)."""
    parts = re.sub(r"-v\d+$", "", dataset_id).split("/")
    return "/".join(parts[1:] if len(parts) > 2 else parts)


def label_colours(present: list[str]) -> dict[str, str]:
    """One distinct colour per drawn label: the six algorithms keep theirs in every figure (C0-C5), other labels drawn
    beside them take the next free ones in legend order (a global index would wrap past C9 onto ipd's)."""
    extra = iter(EXTRA_COLOURS)
    return {a: f"C{ALGOS.index(a)}" if a in ALGOS else next(extra) for a in present}


def mean_curves(rows: list[dict]) -> dict:
    """(dataset, label) -> {percent of the run's gradient-step budget: [score of each seed there]}: learning curves
    line up by share of the budget, so algorithms with different step budgets share one axis."""
    curves: dict = {}
    for r in rows:
        for p in r.get("learning_curve", []):
            frac = round(100 * p["step"] / r["gradient_steps"])
            curves.setdefault((r["dataset"], r["algo"]), {}).setdefault(frac, []).append(p["normalized_score"])
    return curves


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a benchmark machine
    import matplotlib.pyplot as plt

    return plt


def bar_chart(rows: list[dict], datasets: list[str], labels: list[str], path: str, title: str,
              name: Callable[[str], str] = short_name, colours: Optional[dict] = None,
              width: Optional[float] = None) -> None:
    """Final normalised score per dataset and label, mean ± std over seeds as error bars (``width`` in inches)."""
    plt = _pyplot()
    summ = summarise(rows)
    colour = colours or label_colours(labels)
    width = width or (7.0 if len(datasets) < 3 else max(11.0, 1.5 * len(datasets)))
    fig, ax = plt.subplots(figsize=(width, 4))
    w = 0.8 / len(labels)
    for i, a in enumerate(labels):
        m = [summ[d][a][0] if a in summ.get(d, {}) else np.nan for d in datasets]
        s = [summ[d][a][1] if a in summ.get(d, {}) else 0.0 for d in datasets]
        ax.bar(np.arange(len(datasets)) + (i - (len(labels) - 1) / 2) * w, m, w, yerr=s, capsize=2, label=a,
               color=colour[a])
    ax.set_xticks(np.arange(len(datasets)), [name(d).replace("/", "\n") for d in datasets])
    ax.set_ylabel("normalised score (final policy)")
    ax.legend(ncol=len(labels), fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def learning_curves(rows: list[dict], datasets: list[str], labels: list[str], path: str,
                    name: Callable[[str], str] = short_name, colours: Optional[dict] = None,
                    final_episodes: Optional[int] = None) -> None:
    """Mean score over seeds at each evaluation point, x = the share of each algorithm's own step budget.
    ``final_episodes``: named in the title (by default read from the runs' final returns)."""
    plt = _pyplot()
    curves = mean_curves(rows)
    colour = colours or label_colours(labels)
    if len(datasets) > 3:  # two rows of at least three panels
        cols = max(3, (len(datasets) + 1) // 2)
        fig, axes = plt.subplots(2, cols, figsize=(4 * cols, 6), sharex=True, squeeze=False)
    else:  # one row, so every panel keeps its x axis
        fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), squeeze=False)
    for ax, d in zip(axes.T.ravel(), datasets):
        for a in labels:
            c = curves.get((d, a))
            if not c:
                continue
            fracs = sorted(c)
            ax.plot([f / 100 for f in fracs], [np.mean(c[f]) for f in fracs], marker="o", ms=3, label=a,
                    color=colour[a])
        ax.set_title(name(d), fontsize=9)
    for ax in axes.T.ravel()[len(datasets):]:
        ax.set_visible(False)  # datasets without finished runs yet
    for ax in axes[-1]:
        ax.set_xlabel("fraction of training budget")
    for ax in axes[:, 0]:
        ax.set_ylabel("normalised score")
    legend: dict = {}  # every label drawn on any panel, once
    for ax in axes.ravel():
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    axes[0, 0].legend(list(legend.values()), list(legend), fontsize=7)
    if final_episodes is None:  # the final evaluation's episodes, where every drawn run had the same number
        counts = {len(r["returns"]) for r in rows
                  if r["algo"] in labels and r["dataset"] in datasets and r.get("returns")}
        final_episodes = counts.pop() if len(counts) == 1 else None
    final = f"{final_episodes}-episode final evaluation" if final_episodes else "final evaluation"
    fig.suptitle("Learning curves (mean over seeds;" + ("\n" if len(datasets) < 3 else " ") + f"last point = {final})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(rows: list[dict], path: str) -> None:
    """One line per run: the score, budget, wall time and memory, and the commit of the code that ran it."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_KEYS + ["git_commit"])
        for r in rows:
            w.writerow([r.get(k) for k in CSV_KEYS] + [r.get("versions", {}).get("git_commit")])


def write_outputs(rows: list[dict], out: str, algos: Optional[list[str]] = None) -> list[str]:
    """results.json, results.csv, table.md, bars.png and curves.png of a sweep under ``out``; returns the names."""
    os.makedirs(out, exist_ok=True)
    algos = list(algos or sorted({r["algo"] for r in rows}))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    write_csv(rows, os.path.join(out, "results.csv"))
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(markdown_table(rows, algos) + "\n")
    written = ["results.json", "results.csv", "table.md"]
    labels = [a for a in algos if any(r["algo"] == a for r in rows)]
    datasets = sorted({r["dataset"] for r in rows})
    if labels:
        bar_chart(rows, datasets, labels, os.path.join(out, "bars.png"), "Final score, mean ± std over seeds")
        learning_curves(rows, datasets, labels, os.path.join(out, "curves.png"))
        written += ["bars.png", "curves.png"]
    return written
