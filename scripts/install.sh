#!/usr/bin/env bash
# Create .venv and install meddiff (CPU torch pinned by constraints.txt; torchvision never installed).
#   bash scripts/install.sh         # the package (with the web page, `meddiff serve`)
#   bash scripts/install.sh test    # the package and the test tools (pytest, playwright + Debian's chromium),
#                                   # and the survival extra
#   bash scripts/install.sh survival  # the package and pyradiomics for `meddiff survival`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: an unpinned resolver would pull a CUDA build and gigabytes of nvidia packages
.venv/bin/python -m pip install -q -c constraints.txt torch
extra="[serve]"
[ "${1:-}" = "test" ] && extra="[serve,test]"
.venv/bin/python -m pip install -q -c constraints.txt -e ".${extra}"
if [ "${1:-}" = "test" ] || [ "${1:-}" = "survival" ]; then
  # pyradiomics (meddiff[survival]): its newest source release (3.1.0) has broken metadata (it says 3.0.1a1), so
  # 3.0.1 is pinned; it builds against the installed numpy only without build isolation, with versioneer present
  .venv/bin/python -m pip install -q -c constraints.txt --upgrade setuptools wheel versioneer
  .venv/bin/python -m pip install -q -c constraints.txt --no-build-isolation "pyradiomics==3.0.1"
fi
if [ "${1:-}" = "test" ] && ! command -v chromium >/dev/null; then
  # the browser tests drive Debian's Chromium with Playwright (no browser download of Playwright's own)
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: chromium is not installed and this user cannot apt-get it; the browser tests will be skipped" >&2
  fi
fi
if .venv/bin/python -m pip list 2>/dev/null | grep -i -E "^(torchvision|nvidia-)" ; then
  echo "error: torchvision or CUDA packages were installed; they break transformers/peft on this CPU" >&2
  exit 1
fi
