#!/usr/bin/env bash
# Create .venv and install meddiff with the torch build this machine needs (torchvision is never installed).
#   bash scripts/install.sh            # the package (with the web page, `meddiff serve`)
#   bash scripts/install.sh test       # the package, the test tools (pytest, playwright + Debian's chromium) and the
#                                      # survival extra
#   bash scripts/install.sh survival   # the package and pyradiomics for `meddiff survival`
#   bash scripts/install.sh bench      # the package and the benchmark peers (MONAI)
#   bash scripts/install.sh --dry-run  # print which torch would be installed and why; install nothing
# Which torch (scripts/choose_torch.py decides; its docstring has the whole order):
#   Linux with an NVIDIA GPU (nvidia-smi lists one) -> PyPI's torch, a CUDA build
#   Linux without one -> a CPU wheel in pip's find-links or a configured CPU index, else PyPI's default build
#   macOS on Apple silicon -> PyPI's torch (MPS); an installed torch >= 2.6 in .venv is kept
#   MEDDIFF_TORCH=cpu|cu126|cu128|rocm6.3|default or MEDDIFF_TORCH_INDEX=URL choose explicitly.
# Ends with a health check that imports torch, diffusers, transformers, peft and accelerate (one line if broken).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
dry=0
extras=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    test|survival|bench) extras+=("$arg") ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install: error: unknown argument '$arg' (use test, survival, bench or --dry-run)" >&2; exit 2 ;;
  esac
done
has() { local x; for x in "${extras[@]+"${extras[@]}"}"; do [ "$x" = "$1" ] && return 0; done; return 1; }

if [ "$dry" = 1 ]; then
  installed=none
  [ -x .venv/bin/python ] && installed=$(.venv/bin/python -c \
    'from importlib import metadata as m
try: print(m.version("torch"))
except m.PackageNotFoundError: print("none")' 2>/dev/null || echo none)
  dry_py=$PY
  [ -x .venv/bin/python ] && dry_py=.venv/bin/python  # the interpreter (and pip settings) the install would use
  exec "$dry_py" scripts/choose_torch.py --installed "$installed"
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip
plan=$($VPY scripts/choose_torch.py --installed auto --shell)  # exits 2 with one line when nothing fits
eval "$plan"
$VPY scripts/choose_torch.py --installed auto | sed 's/^/install: /'
if [ "$TORCH_REPLACE" = 1 ]; then
  $VPY -m pip uninstall -q -y torch
fi
if [ "$TORCH_ACTION" = install ]; then
  $VPY -m pip install -q "${TORCH_PIP_ARGS[@]}"
fi
# meddiff itself; the installed torch satisfies its torch>=2.6, so pip leaves it alone
extra="serve"
has test && extra="$extra,test"
has bench && extra="$extra,bench"
$VPY -m pip install -q -e ".[${extra}]"
if has test || has survival; then
  # pyradiomics (meddiff[survival]): its newest source release (3.1.0) has broken metadata (it says 3.0.1a1), so
  # 3.0.1 is pinned; it builds against the installed numpy only without build isolation, with versioneer present
  $VPY -m pip install -q --upgrade setuptools wheel versioneer
  $VPY -m pip install -q --no-build-isolation "pyradiomics==3.0.1"
fi
if has test && ! command -v chromium >/dev/null; then
  # the browser tests drive Debian's Chromium with Playwright (no browser download of Playwright's own)
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: chromium is not installed and this user cannot apt-get it; the browser tests will be skipped" >&2
  fi
fi
if [ "$TORCH_CPU_ONLY" = 1 ] && $VPY -m pip list 2>/dev/null | grep -q -i -E "^nvidia-"; then
  # a CPU build was chosen, yet a package pulled CUDA libraries (several GB): say so, it still works
  echo "install: warning: CUDA (nvidia-*) packages were installed although the CPU build of torch was chosen" >&2
fi
# the health check: import what meddiff needs; one line and exit 1 if something is broken
$VPY -m meddiff.environment --check
# a CUDA build chosen for an NVIDIA GPU must be able to use it (an older driver cannot run a newer CUDA build)
if [ "$TORCH_BUILD" = cuda ] && ! $VPY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  driver=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -n 1)
  built=$($VPY -c 'import torch; print(torch.__version__, "built for CUDA", torch.version.cuda)')
  flavor=$($VPY scripts/choose_torch.py --cuda-flavor-for "${driver:-0.0}" || true)
  if [ "$flavor" = none ] || [ -z "$flavor" ]; then fix="update the NVIDIA driver (torch >= 2.6 needs CUDA 11.8 or newer)"
  else fix="MEDDIFF_TORCH=$flavor bash scripts/install.sh installs a build for this driver"; fi
  echo "install: error: torch $built cannot use the GPU (the driver supports CUDA ${driver:-unknown}): $fix" >&2
  exit 1
fi
