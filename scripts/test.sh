#!/usr/bin/env bash
# One command: set up, then run the test suite (the suite takes 5-15 minutes on 2 CPU cores depending on the machine; set-up adds the downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the shared D4RL-style datasets are used when present (../shared/datasets); tests that need them skip otherwise
${PYTHON:-python3} -m pytest -q -p no:cacheprovider --durations=10 tests "$@"
