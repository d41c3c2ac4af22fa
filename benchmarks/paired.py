"""A variant against its same-stage control, pair by pair: the figures a profile rule is decided on.

Each pair is one (dataset, seed) with a row of both labels in one results folder. The pair counts only if both runs
used the same stages 1-2 (equal imagined transitions and acceptance threshold), because a refit of the stages moves
scores by more than many of the changes under test.

    python benchmarks/paired.py benchmarks/results/learning_rate --variant ipd-lr-3e-4 --seeds 0 1 2

With ``--control-folder`` the control rows come from another folder: e.g. a row re-made by another command on the same
cache, where the last line says whether every episode's return repeated exactly.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

from ipd_agent.bench import row_path  # the harness's own row layout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from head_to_head import short  # noqa: E402  (the report's dataset names)


def _stages(row: dict) -> tuple:
    aug = row.get("augmentation") or {}
    return aug.get("imagined_transitions"), round(float(aug.get("threshold", float("nan"))), 6)


def _last_move(row: dict) -> float:
    """How far the score moved between the last two learning-curve checkpoints (nan without two): a last iterate that
    depends on where training stopped moves a lot there."""
    curve = row.get("learning_curve") or []
    if len(curve) < 2:
        return float("nan")
    return abs(curve[-1]["normalized_score"] - curve[-2]["normalized_score"])


def paired_rows(folder: str, variant: str, control: str = "ipd", seeds: list[int] | None = None,
                control_folder: str | None = None) -> list[dict]:
    """One dict per (dataset, seed) holding both labels: dataset, seed, variant and control scores, and whether every
    evaluation episode returned exactly the same."""
    pairs = []
    for vpath in sorted(glob.glob(os.path.join(folder, "runs", "*", f"{variant}_seed*.json"))):
        with open(vpath) as f:
            v = json.load(f)
        seed = v["seed"]
        cpath = row_path(folder if control_folder is None else control_folder, v["dataset"], control, seed)
        if (seeds is not None and seed not in seeds) or not os.path.exists(cpath):
            continue
        with open(cpath) as f:
            c = json.load(f)
        if _stages(v) != _stages(c):
            raise SystemExit(f"{vpath} and its control used different stages 1-2: {_stages(v)} vs {_stages(c)}")
        pairs.append({"dataset": v["dataset"], "seed": seed, "variant": v["normalized_score"],
                      "control": c["normalized_score"], "imagined": _stages(v)[0],
                      "same_returns": v.get("returns") == c.get("returns"),
                      "variant_last_move": _last_move(v), "control_last_move": _last_move(c)})
    return pairs


def report(pairs: list[dict], variant: str, control: str) -> str:
    lines = [f"| dataset | seeds | {variant} | {control} (same stages) |", "|---|---|---|---|"]
    for d in sorted({p["dataset"] for p in pairs}):
        ps = [p for p in pairs if p["dataset"] == d]
        seeds = ", ".join(str(p["seed"]) for p in ps)
        lines.append(f"| {short(d)} | {seeds} | "
                     + " / ".join(f"{p['variant']:.1f}" for p in ps) + f" = {np.mean([p['variant'] for p in ps]):.1f} | "
                     + " / ".join(f"{p['control']:.1f}" for p in ps) + f" = {np.mean([p['control'] for p in ps]):.1f} |")
    if pairs:
        lines.append(f"| **mean over {len(pairs)} pairs** | | {np.mean([p['variant'] for p in pairs]):.1f} | "
                     f"{np.mean([p['control'] for p in pairs]):.1f} |")
        lines.append(f"\nEvery episode's return identical in {sum(p['same_returns'] for p in pairs)} of {len(pairs)} pairs.")
    return "\n".join(lines)


def spread_report(pairs: list[dict], variant: str, control: str) -> str:
    """Per dataset, for each label: the std over seeds of the final score (population std, as the head-to-head table)
    and the mean move between the last two learning-curve checkpoints."""
    lines = [f"| dataset | {variant}: std over seeds | {variant}: mean move over the last checkpoint | "
             f"{control}: std over seeds | {control}: mean move over the last checkpoint |", "|---|---|---|---|---|"]
    for d in sorted({p["dataset"] for p in pairs}):
        ps = [p for p in pairs if p["dataset"] == d]
        cells = [f"{np.std([p[k] for p in ps]):.1f} | {np.mean([p[f'{k}_last_move'] for p in ps]):.1f}"
                 for k in ("variant", "control")]
        lines.append(f"| {short(d)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="results folder with runs/<dataset>/<label>_seed<k>.json")
    p.add_argument("--variant", required=True)
    p.add_argument("--control", default="ipd")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--control-folder", default=None, help="take the control rows from this results folder")
    a = p.parse_args()
    pairs = paired_rows(a.folder, a.variant, a.control, a.seeds, a.control_folder)
    if not pairs:
        raise SystemExit(f"no pairs of {a.variant} and {a.control} in {a.folder}")
    print(report(pairs, a.variant, a.control))
    print()
    print(spread_report(pairs, a.variant, a.control))


if __name__ == "__main__":
    main()
