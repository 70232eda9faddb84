#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs mpqkit with its pinned dependencies
# (torch 2.14.1, torchvision 0.29.1) and the test tools. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import mpqkit, torch, torchvision; print('mpqkit', mpqkit.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__)"
echo "mpqkit is .venv/bin/mpqkit: 'source .venv/bin/activate' puts it on the PATH; set MPQKIT_DATA_DIR (or pass --data-dir) to the folder with the datasets, e.g. ../shared/data"
