#!/usr/bin/env bash
# Make a pattern image and hold it as a direct-I/O loop device (root).
#   images/ci-loop-image.sh IMAGE SIZE [BLOCK_SIZE] [SEED]
# Prints the device path on stdout, then what the kernel enabled on
# stderr; holds the device until killed.  Autoclear removes the device
# whenever this process goes away, kill -9 included.
set -euo pipefail
image=${1:?usage: $0 IMAGE SIZE [BLOCK_SIZE] [SEED]}
size=${2:?usage: $0 IMAGE SIZE [BLOCK_SIZE] [SEED]}
# IMAGE is relative to the caller's directory, not to the repository.
image=$(realpath -m -- "$image")
cd "$(dirname "$0")/.."
bs=${3:-512}
seed=${4:-0}
py=${PYTHON:-.venv/bin/python}
"$py" -m blockdev.images create "$image" "$size" --seed "$seed" >&2
exec "$py" -m blockdev.loop attach "$image" --block-size "$bs"
