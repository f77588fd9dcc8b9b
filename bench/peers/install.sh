#!/bin/sh
# The peers' virtualenv for bench/bench_peers.py (make bench-peers), apart from wsipipe's own:
# torch and torchvision first (the pinned builds), then TIAToolbox's other requirements, then
# TIAToolbox itself without its torch < 2.13 pin (its patch extraction does not use torch).
#
#   bench/peers/install.sh PYTHON VENV
set -eu
cd "$(dirname "$0")/../.."
PY=${1:?usage: bench/peers/install.sh PYTHON VENV}
VENV=${2:?usage: bench/peers/install.sh PYTHON VENV}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r bench/peers/requirements.txt
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps tiatoolbox==2.1.3
