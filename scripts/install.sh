#!/usr/bin/env bash
# Create .venv and install meddiff (CPU torch pinned by constraints.txt; torchvision never installed).
#   bash scripts/install.sh         # the package
#   bash scripts/install.sh test    # the package and the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: an unpinned resolver would pull a CUDA build and gigabytes of nvidia packages
.venv/bin/python -m pip install -q -c constraints.txt torch
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
.venv/bin/python -m pip install -q -c constraints.txt -e ".${extra}"
if .venv/bin/python -m pip list 2>/dev/null | grep -i -E "^(torchvision|nvidia-)" ; then
  echo "error: torchvision or CUDA packages were installed; they break transformers/peft on this CPU" >&2
  exit 1
fi
