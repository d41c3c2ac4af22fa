"""The command-line options the per-run diagnostics of benchmarks/ share, declared once with one help text each, and
what their ``--report`` does."""
from __future__ import annotations

import argparse
import glob
import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run_parser(doc: str, out_name: str, datasets_required: bool = False, report: bool = False) -> argparse.ArgumentParser:
    """A parser with ``--datasets``, ``--seeds``, ``--profile``, ``--minari-path`` and ``--out`` (default
    ``benchmarks/results/<out_name>``); ``report`` adds ``--report``. The script adds its own options after these."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--datasets", nargs="+", required=datasets_required, default=None if datasets_required else [],
                   help="Minari dataset ids, e.g. d4rlstyle/hopper/full-replay-v0")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per dataset and seed")
    p.add_argument("--profile", default="cpu", help="cpu, tiny, gpu or a JSON file")
    p.add_argument("--minari-path", default=None, help="MINARI_DATASETS_PATH for the datasets")
    p.add_argument("--out", default=os.path.join(RESULTS, out_name), help="rows go to <out>/runs")
    if report:
        p.add_argument("--report", action="store_true", help="write <out>/report.md from every run in <out>/runs")
    return p


def read_rows(out_dir: str, row_pattern: str) -> list[dict]:
    """Every row ``<out>/runs/*/<row_pattern>`` of a diagnostic, in file order."""
    return [json.load(open(f)) for f in sorted(glob.glob(os.path.join(out_dir, "runs", "*", row_pattern)))]


def write_report(out_dir: str, row_pattern: str, make_report, script: str, flags: str = "") -> None:
    """``--report`` of a diagnostic: every row ``<out>/runs/*/<row_pattern>`` through ``make_report`` into
    ``<out>/report.md``, headed by the command that wrote it (``flags``: its other options), and printed."""
    rows = read_rows(out_dir, row_pattern)
    if not rows:
        raise SystemExit(f"no runs under {out_dir}/runs")
    text = make_report(rows)
    command = " ".join(filter(None, [f"python benchmarks/{script} --report", flags,
                                     f"--out {os.path.relpath(out_dir)}"]))
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(f"Written by `{command}`.\n\n" + text)
    print(text)

