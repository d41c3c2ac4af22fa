"""Give finished result rows another label, keeping what they measured and saying where they came from.

A row's label (its ``algo`` field and file name) says which table column it belongs to. When the profile changes,
a run made as a variant becomes the profile's own run (or the profile's old runs become a variant) without any
retraining: the config the run recorded is the same either way. This moves each row to its new label in the target
folder and adds ``renamed_from`` (old label, old folder, and why) so the move is never silent. Nothing is
overwritten: an existing row under the new label is an error.

    python benchmarks/rename_rows.py --src benchmarks/results/head_to_head --label ipd --to ipd-lr-1e-4 \
        --why "the table's ipd runs at the CPU profile's previous transformer rate"
"""
from __future__ import annotations

import argparse
import glob
import json
import os

from ipd_agent.bench import row_path, write_row  # the harness's own row layout and atomic write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rename_rows(src: str, label: str, to: str, why: str, dst: str | None = None, copy: bool = False,
                seeds: list[int] | None = None) -> list[str]:
    """Moves (or copies) every ``runs/*/<label>_seed*.json`` of ``src`` (of ``seeds`` only, if given) to
    ``<to>_seed*.json`` in ``dst`` (default ``src``). Returns the new paths. Checks every target first, so a clash
    changes nothing."""
    dst = src if dst is None else dst
    pairs = []
    for path in sorted(glob.glob(os.path.join(src, "runs", "*", f"{label}_seed*.json"))):
        with open(path) as f:
            row = json.load(f)
        if seeds is not None and row["seed"] not in seeds:
            continue
        if row["algo"] != label:
            raise SystemExit(f"{path} is labelled {row['algo']!r}, not {label!r} (nothing was renamed)")
        target = row_path(dst, row["dataset"], to, row["seed"])
        if os.path.exists(target):
            raise SystemExit(f"{target} exists; move it away first (nothing was renamed)")
        pairs.append((path, target, row))
    if not pairs:
        raise SystemExit(f"no rows labelled {label!r} under {src}/runs")
    # the folder as the repository names it (never a machine path)
    folder = os.path.relpath(os.path.abspath(src), REPO)
    folder = os.path.basename(os.path.abspath(src)) if folder.startswith("..") else folder
    for path, target, row in pairs:
        row["algo"] = to
        row.setdefault("renamed_from", []).append({"label": label, "folder": folder, "why": why})
        write_row(target, row)
        if not copy:
            os.remove(path)
    return [t for _, t, _ in pairs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="results folder holding runs/<dataset>/<label>_seed<k>.json")
    p.add_argument("--label", required=True, help="the rows' current label")
    p.add_argument("--to", required=True, help="their new label")
    p.add_argument("--why", required=True, help="recorded in each row's renamed_from")
    p.add_argument("--dst", default=None, help="results folder to write them to (default: --src)")
    p.add_argument("--copy", action="store_true", help="keep the originals")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="only these seeds' rows")
    a = p.parse_args()
    for t in rename_rows(a.src, a.label, a.to, a.why, a.dst, a.copy, a.seeds):
        print(t)


if __name__ == "__main__":
    main()
