"""What a run would have deployed had it stopped at ``--step``, against what it deployed at the end, from the rows.

A learning-curve point evaluates the weights ``fit`` would deploy at that step (for IPD the weight average), with the
profile's ``curve_episodes`` episodes. ``evaluate`` seeds the environment the same way for every call, so those
episodes start where the first ``curve_episodes`` episodes of the final evaluation start: the pair below compares
the two deployments on the same episodes; "mean of its size" is how far a run's score moves between the two, whatever
the direction. The IPD transformer's rate is constant after warm-up, so a run stopped at
``--step`` deploys exactly the curve point's weights. Nothing is trained or evaluated here; it reads committed rows.

    python benchmarks/curve_at_step.py --step 3000 --labels ipd --folders benchmarks/results/head_to_head \\
        --out benchmarks/results/early_stop/step3000_table_rows.md
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from head_to_head import DATASETS, short  # noqa: E402
from pooled_seeds import parse_alias, pooled_rows, standard_error  # noqa: E402

from ipd_agent.data import normalized_score, reference_scores  # noqa: E402


def step_pairs(rows: list[dict], step: int) -> dict:
    """{(dataset, label): [(seed, score at ``step``, final score on the same episodes, final score, episodes)]}."""
    out: dict = {}
    for r in sorted(rows, key=lambda r: (r["dataset"], r["algo"], r["seed"])):
        at = [p["normalized_score"] for p in r.get("learning_curve", []) if p["step"] == step]
        if not at or r.get("gradient_steps") == step:  # no such point, or that point is the final evaluation itself
            continue
        k = int(r["profile"]["curve_episodes"])
        ref = reference_scores({}, r["env_id"])
        if not np.isclose(normalized_score(r["return_mean"], ref), r["normalized_score"]):
            raise SystemExit(f"{r['dataset']} seed {r['seed']}: the row was normalised with other reference scores")
        same = float(np.mean([normalized_score(x, ref) for x in r["returns"][:k]]))
        out.setdefault((r["dataset"], r["algo"]), []).append((r["seed"], at[0], same, float(r["normalized_score"]), k))
    return out


def step_table(pairs: dict, datasets: list[str], labels: list[str], step: int) -> str:
    lines = [f"| dataset | label | seeds | step {step:,} | end, same episodes | difference, mean ± SE | mean of its "
             "size | end, all 10 episodes | per seed (step / end, same episodes) |", "|---|---|---|---|---|---|---|---|---|"]
    at_means: dict = {}
    end_means: dict = {}
    for d, a in ((d, a) for d in datasets for a in labels):
        got = pairs.get((d, a))
        if not got:
            continue
        at, same, final = (np.array([g[i] for g in got]) for i in (1, 2, 3))
        diff = at - same
        se = standard_error(diff)
        eps = sorted({g[4] for g in got})
        at_means.setdefault(a, []).append(at.mean())
        end_means.setdefault(a, []).append(same.mean())
        lines.append(f"| {short(d)} | {a} | {','.join(str(g[0]) for g in got)} ({'/'.join(map(str, eps))} ep.) | "
                     f"{at.mean():.1f} | {same.mean():.1f} | {diff.mean():+.1f} ± {se:.1f} | {np.abs(diff).mean():.1f} | "
                     f"{final.mean():.1f} | "
                     + " · ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(at, same)) + " |")
    for a, means in at_means.items():  # per label, over the sets it has (the difference of the two means)
        if len(means) > 1:
            lines.append(f"| **mean over {len(means)} sets** | {a} | | {np.mean(means):.1f} | "
                         f"{np.mean(end_means[a]):.1f} | {np.mean(means) - np.mean(end_means[a]):+.1f} | | | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step", type=int, required=True, help="the learning-curve step to compare with the end")
    p.add_argument("--folders", nargs="+", required=True, help="result folders (each with runs/)")
    p.add_argument("--labels", nargs="+", required=True, help="row labels, each read on its own (--alias pools two)")
    p.add_argument("--alias", nargs="+", default=[], metavar="ROW_LABEL=LABEL", help="as in pooled_seeds.py")
    p.add_argument("--datasets", nargs="+", default=DATASETS)
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args()
    rows = pooled_rows(args.folders, args.labels, args.datasets, parse_alias(args.alias))
    table = step_table(step_pairs(rows, args.step), args.datasets, list(dict.fromkeys(args.labels)), args.step)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"From the rows of {', '.join(os.path.relpath(x) for x in args.folders)} (labels "
                    f"{', '.join(args.labels)}{'; ' + ', '.join(args.alias) if args.alias else ''}), by "
                    f"`python benchmarks/curve_at_step.py --step {args.step}`: the deployment at step {args.step:,} "
                    "against the end of the run, on the same evaluation episodes (SE: standard error of the mean "
                    f"difference over seeds).\n\n{table}\n")


if __name__ == "__main__":
    main()
