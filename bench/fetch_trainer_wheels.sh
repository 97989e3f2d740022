#!/usr/bin/env bash
# Download the trainer side's pure-Python wheels (bench/trainer_wheels.txt) into bench/wheels/, on
# a machine with network, to carry to a GPU machine that has torch and transformers but no network
# (bench/wheels/ is git-ignored; `bash bench/gpu_check.sh --trainer-only` installs from it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf bench/wheels
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest bench/wheels -r bench/trainer_wheels.txt
du -sh bench/wheels
ls bench/wheels
