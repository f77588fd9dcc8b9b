#!/usr/bin/env bash
# The one-shot GPU check (make gpu-check): from a fresh clone on a machine with one NVIDIA GPU,
# install through the normal install, then run bench/gpu_check.py (CUDA tests, device decode,
# the inference benchmark, end-to-end slides/hour), all within --budget-s (default 480 s,
# the install included). Prints one table; writes bench/results/gpu-check.json.
#
#   bash bench/gpu_check.sh [gpu_check.py options]
#   bash bench/gpu_check.sh --cpu-smoke [--out FILE]   # the same steps on the CPU in seconds, nothing
#                                                      # installed: runs with $PYTHON (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s.%N)

if [ "${1:-}" = --cpu-smoke ]; then
    exec "${PYTHON:-python3}" bench/gpu_check.py "$@" --t0 "$t0"
fi

# The normal install (scripts/install.sh through make): the default requirements pin torch's
# CUDA build, so nothing GPU-specific is needed. A failed install is recorded, and the check
# goes on with whatever .venv holds.
rc=0
make install || rc=$?
t1=$(date +%s.%N)
install_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
py=.venv/bin/python
[ -x "$py" ] || py=${PYTHON:-python3}  # no virtualenv at all: the interpreter at hand, recorded in the JSON
exec "$py" bench/gpu_check.py "$@" --t0 "$t0" --install-seconds "$install_s" --install-rc "$rc"
