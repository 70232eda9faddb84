#!/usr/bin/env bash
# The test command (README, and .ci/run): installs everything into .venv, then lint + tests.
# CIFAR-10 tests read ../shared/data (or $MPQKIT_DATA_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${MPQKIT_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export MPQKIT_DATA_DIR="$(cd ../shared/data && pwd)"
fi
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -q "$@"
