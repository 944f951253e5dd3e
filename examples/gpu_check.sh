#!/usr/bin/env bash
# The CUDA check of issue 23 (item 6), one command from the root of a clone:
#
#     bash examples/gpu_check.sh [--out gpu-check.json] [--budget-s 480] [--predict-gb 4]
#
# Without CUDA it prints one line and exits 0. On CUDA it runs, within 8 minutes in all (each step
# under a timeout from the budget left; a failed or timed-out step is recorded and the next runs):
# emtile bench at amp off/bf16/fp16, channels_last off, readers 0/2/4/8, base 64; bench --pipeline
# where it exists; a predict of a 4 GB volume at bf16; predict --cluster cuda with one worker
# (needs dask-cuda); nvidia-smi and the versions. It writes one JSON (--out) and prints a table.
# Everything is done by examples/gpu_check.py; --out is relative to where you run it.
#
# The interpreter is ${PYTHON:-.venv/bin/python}: on a GPU machine whose CUDA torch is installed
# elsewhere, run `PYTHON=python3 bash examples/gpu_check.sh` (emtile must be importable there:
# `python3 -m pip install -e .`). With the default and no .venv yet, `bash .ci/setup` makes one
# (its torch is the CPU build: the check then says so and stops).
set -euo pipefail
root=$(dirname "$0")/..
if [ -z "${PYTHON:-}" ]; then
  [ -x "$root/.venv/bin/python" ] || bash "$root/.ci/setup"
  PYTHON=$root/.venv/bin/python
fi
exec "$PYTHON" "$root/examples/gpu_check.py" "$@"
