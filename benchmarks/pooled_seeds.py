"""Pools the rows of several result folders and tables every seed found, per dataset and label.

The head-to-head table fixes seeds 0-2 (DESIGN §5); fresh seeds run later go to another folder
(`results/alpha_check`) so they cannot shift that table. This script puts both together for a comparison over all
seeds, with each seed's score listed so the pooled mean can be checked by hand:

    python benchmarks/pooled_seeds.py --labels ipd dt \
        --datasets d4rlstyle/hopper/medium-replay-v0 d4rlstyle/hopper/full-replay-v0 d4rlstyle/hopper/medium-v0 \
        --out benchmarks/results/alpha_check/pooled_hopper.md
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from head_to_head import curve_table, load_rows, short  # noqa: E402  (the report's own reader and curves)

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def pooled_rows(folders: list[str], labels: list[str], datasets: list[str],
                alias: dict | None = None, seeds: list[int] | None = None) -> list[dict]:
    """Every row of these labels and datasets in the folders, one per (dataset, label, seed). ``alias`` maps a row
    label to the label it is pooled under (two names of the same deployment in different folders); the row keeps its
    own name in ``label_as_run``. ``seeds``: only these seeds (default: every seed found)."""
    rows, seen = [], set()
    for folder in folders:
        for r in load_rows(folder):
            if alias and r["algo"] in alias:
                r = {**r, "algo": alias[r["algo"]], "label_as_run": r["algo"]}
            if r["algo"] not in labels or r["dataset"] not in datasets or (seeds is not None and r["seed"] not in seeds):
                continue
            key = (r["dataset"], r["algo"], r["seed"])
            if key in seen:  # one run per seed: two folders holding the same seed would count it twice
                raise SystemExit(f"{r['algo']} seed {r['seed']} on {r['dataset']} is in more than one folder; "
                                 "move one aside.")
            seen.add(key)
            rows.append(r)
    return rows


def standard_error(diff: np.ndarray) -> float:
    """Standard error of the mean of paired differences (NaN for a single pair)."""
    return diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")


def parse_alias(pairs: list[str]) -> dict:
    """``--alias`` values ``ROW_LABEL=LABEL`` as a mapping."""
    return dict(a.split("=", 1) for a in pairs)


def paired_table(scores: dict, labels: list[str], datasets: list[str]) -> str:
    """For two labels: per set, the first minus the second over the seeds both have, mean ± standard error."""
    a, b = labels
    lines = [f"| dataset | seeds with both | {a} | {b} | {a} − {b}, mean ± SE |", "|---|---|---|---|---|"]
    for d in datasets:
        sa, sb = scores.get((d, a), {}), scores.get((d, b), {})
        both = sorted(set(sa) & set(sb))
        if not both:
            continue
        diff = np.array([sa[s] - sb[s] for s in both])
        se = standard_error(diff)
        lines.append(f"| {short(d)} | {','.join(map(str, both))} | {np.mean([sa[s] for s in both]):.1f} | "
                     f"{np.mean([sb[s] for s in both]):.1f} | {diff.mean():+.1f} ± {se:.1f} (n = {len(both)}) |")
    return "\n".join(lines)


def pooled_table(folders: list[str], labels: list[str], datasets: list[str],
                 rows: list[dict] | None = None) -> str:
    """Mean ± std over every pooled seed per (dataset, label); ``rows``: the folders' ``pooled_rows``, if read. With
    two labels, a second table pairs them seed by seed."""
    scores: dict = {}  # (dataset, label) -> {seed: score}
    for r in pooled_rows(folders, labels, datasets) if rows is None else rows:
        scores.setdefault((r["dataset"], r["algo"]), {})[r["seed"]] = float(r["normalized_score"])
    lines = ["| dataset | label | seeds | mean ± std | per seed |", "|---|---|---|---|---|"]
    for d in datasets:
        for a in labels:
            got = scores.get((d, a))
            if not got:
                continue
            seeds = sorted(got)
            v = np.array([got[s] for s in seeds])
            lines.append(f"| {short(d)} | {a} | {','.join(map(str, seeds))} | {v.mean():.1f} ± {v.std():.1f} | "
                         + " / ".join(f"{x:.1f}" for x in v) + " |")
    if len(datasets) > 1:  # the mean over sets of the per-set means, as the head-to-head table's: only for a label on all
        for a in labels:
            if all(scores.get((d, a)) for d in datasets):
                means = [np.mean(list(scores[(d, a)].values())) for d in datasets]
                seeds = {tuple(sorted(scores[(d, a)])) for d in datasets}
                seed_text = ",".join(map(str, seeds.pop())) if len(seeds) == 1 else "per set"
                lines.append(f"| **mean over {len(datasets)} sets** | {a} | {seed_text} | {np.mean(means):.1f} | |")
    table = "\n".join(lines)
    if len(labels) == 2:
        table += "\n\nSeed by seed, over the seeds both labels have (SE: standard error of the mean difference):\n\n"
        table += paired_table(scores, labels, datasets)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folders", nargs="+", default=[os.path.join(HERE, "head_to_head"), os.path.join(HERE, "alpha_check")],
                   help="result folders (each with runs/) to pool")
    p.add_argument("--labels", nargs="+", required=True, help="row labels, e.g. ipd dt ipd-last-iterate")
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--alias", nargs="+", default=[], metavar="ROW_LABEL=LABEL",
                   help="pool rows labelled ROW_LABEL under LABEL (e.g. ipd-avg-capped-0.999=ipd: the same deployment)")
    p.add_argument("--seeds", nargs="+", type=int, help="only these seeds (default: every seed found)")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args()
    rows = pooled_rows(args.folders, args.labels, args.datasets, parse_alias(args.alias), args.seeds)
    table = pooled_table(args.folders, args.labels, args.datasets, rows)
    curves = curve_table(rows)
    if curves:  # where each label's score stands at each share of its budget, over the same pooled seeds
        table += "\n\nMean learning curves over the same seeds:\n\n" + curves
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            aliases = f"; pooled as one label: {', '.join(args.alias)}" if args.alias else ""
            f.write(f"Pooled over {', '.join(os.path.relpath(x) for x in args.folders)} "
                    f"(`python benchmarks/pooled_seeds.py`){aliases}; normalised score, std over seeds.\n\n{table}\n")


if __name__ == "__main__":
    main()
