#!/bin/sh
# The one install path. `make install|test|demo` and the Dockerfile run exactly this.
#
#   scripts/install.sh PYTHON deps                  pinned dependencies from requirements.lock
#   scripts/install.sh PYTHON package [--editable]  wsipipe itself, without touching the pins
#
# TORCH=cpu (the container's default) installs the CPU builds of the pinned torch and
# torchvision from PyTorch's CPU wheel index and leaves out the lock's CUDA runtime wheels
# (nvidia-*, cuda-*, triton): an image ~5 GB smaller that cannot use a GPU. Any other value
# (the default here and in CI) installs requirements.lock exactly as pinned.
# WSIPIPE_INSTALL_DRY_RUN=1 prints the commands instead of running them.
set -eu
cd "$(dirname "$0")/.."
PY=${1:?usage: scripts/install.sh PYTHON deps|package [--editable]}
STEP=${2:?usage: scripts/install.sh PYTHON deps|package [--editable]}
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

run() {
    if [ "${WSIPIPE_INSTALL_DRY_RUN:-0}" = 1 ]; then echo "$*"; else "$@"; fi
}

case "$STEP" in
deps)
    if [ "${TORCH:-}" = cpu ]; then
        reqs=$(mktemp)
        grep -viE '^(nvidia-|cuda-|triton==)' requirements.lock >"$reqs"
        # torch==X also matches the CPU index's X+cpu, which pip prefers (a higher version).
        run "$PY" -m pip install -q --disable-pip-version-check --extra-index-url "$TORCH_CPU_INDEX" -r "$reqs"
        if [ "${WSIPIPE_INSTALL_DRY_RUN:-0}" = 1 ]; then cat "$reqs"; fi
        rm -f "$reqs"
    else
        run "$PY" -m pip install -q --disable-pip-version-check -r requirements.lock
    fi
    ;;
package)
    if [ "${3:-}" = --editable ]; then
        run "$PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
    else
        run "$PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation .
    fi
    ;;
*)
    echo "scripts/install.sh: unknown step '$STEP' (deps or package)" >&2
    exit 2
    ;;
esac
