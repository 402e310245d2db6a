#!/usr/bin/env bash
# One check of a GPU machine in 8 minutes, install included: install meddiff, run the GPU tests, measure pixel (64 px)
# and latent (256 px) training img/s, sampling img/s (DPM++ 20 steps), and SD-1.5-size fine-tuning at 512 px
# (unet, lora; random weights) next to a plain diffusers loop on the same model, batch and precision.
# Every stage is time-boxed by bench/gpu_check.py (skipped, with a note, when too little time is left); everything
# goes to one JSON (bench/results/gpu_check.json) and a table on stdout.
#
#   bash bench/gpu_check.sh                        # from anywhere; works in the repository root
#   bash bench/gpu_check.sh --skip pytest_gpu      # extra arguments go to bench/gpu_check.py (see its --help)
#   GPU_CHECK_SECONDS=900 bash bench/gpu_check.sh  # another total budget (seconds, install included)
#   GPU_CHECK_SKIP_INSTALL=1 bash bench/gpu_check.sh   # reuse an existing .venv
#
# Without CUDA the driver runs its quick mode (tiny sizes, the tiny offline SD): a smoke test, not a measurement.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
budget=${GPU_CHECK_SECONDS:-480}
log=${TMPDIR:-/tmp}/meddiff-gpu-check-install.log

install_rc=0
if [ -n "${GPU_CHECK_SKIP_INSTALL:-}" ] && [ -x .venv/bin/python ]; then
  echo "== install: skipped (GPU_CHECK_SKIP_INSTALL), using .venv"
else
  echo "== install: bash scripts/install.sh test (log: $log)"
  # at most half the budget: what is left is for the tests and the measurements
  timeout $((budget / 2)) bash scripts/install.sh test >"$log" 2>&1 || install_rc=$?
  [ "$install_rc" = 0 ] || { echo "install failed (exit $install_rc); last lines:"; tail -n 15 "$log"; }
fi
install_s=$(( $(date +%s) - start ))
echo "   ${install_s} s, exit ${install_rc}"

if [ ! -x .venv/bin/python ]; then
  mkdir -p bench/results
  printf '{"benchmark": "gpu_check", "complete": false, "stages": {"install": {"status": "failed", "rc": %d, "seconds": %d, "note": "no .venv; see %s"}}, "rows": []}\n' \
    "$install_rc" "$install_s" "$log" > bench/results/gpu_check.json
  echo "no .venv/bin/python: nothing else can run (bench/results/gpu_check.json written)" >&2
  exit 1
fi

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
# what this machine offers meddiff (devices, precision, attention), where this version has `meddiff env`
timeout 60 .venv/bin/meddiff env 2>/dev/null || true

echo "== tests and measurements: bench/gpu_check.py ($(( start + budget - $(date +%s) )) s left)"
exec .venv/bin/python bench/gpu_check.py --deadline $(( start + budget )) --install-seconds "$install_s" \
  --install-rc "$install_rc" "$@"
