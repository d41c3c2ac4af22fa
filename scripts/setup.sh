#!/usr/bin/env bash
# Installs ipd-agent and its pinned dependencies into the current Python (3.10+).
# torch goes first, pinned, so nothing pulls a multi-GB CUDA build in its place.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install --quiet --upgrade pip
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu picks PyTorch's CPU wheel where plain pip would fetch the
# CUDA one; unset, pip's own configuration decides (a local wheel, a mirror)
$PY -m pip install --quiet "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
$PY -m pip install --quiet -e ".[test,export,ray]"
$PY -c "import ipd_agent, torch, d3rlpy, minari, mujoco; print('ipd-agent', ipd_agent.__version__, '| torch', torch.__version__, '| d3rlpy', d3rlpy.__version__, '| mujoco', mujoco.__version__)" 2>/dev/null
