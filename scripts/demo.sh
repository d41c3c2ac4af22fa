#!/usr/bin/env bash
# One command: set up, then fit IPD and d3rlpy's DT on a small built-in dataset, evaluate both, plot.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
${PYTHON:-python3} examples/quickstart.py "$@"
