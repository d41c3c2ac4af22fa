"""The command-line options the per-run diagnostics of benchmarks/ share, declared once with one help text each."""
from __future__ import annotations

import argparse
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
