#!/usr/bin/env bash
# Fill wheels/gpu/ (ignored by git) with the pinned wheels of scripts/gpu-wheels.txt, for a lent GPU
# machine that reaches no registry: cp312, manylinux x86_64 or pure python, no dependencies resolved
# (the list is the closure). Run it on a development machine before a device check, then carry
# wheels/gpu to the GPU machine; `scripts/gpu-check.sh --dry-run` says whether every wheel is there.
# Pins marked `# image` (the machines' image has them) are left out unless GPU_WHEELS_ALL=1: a run carries
# 64 MiB in all, the work tree included.
# Knobs: PIP (default: python3 -m pip, or .venv/bin/pip when present), GPU_WHEELS_DIR, GPU_WHEELS_ALL.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST="${GPU_WHEELS_DIR:-$PWD/wheels/gpu}"
if [[ -n "${PIP:-}" ]]; then
    read -r -a pip <<<"$PIP"
elif [[ -x .venv/bin/pip ]]; then
    pip=(.venv/bin/pip)
else
    pip=(python3 -m pip)
fi
mkdir -p "$DEST"
REQS=$(mktemp)
trap 'rm -f "$REQS"' EXIT
if [[ "${GPU_WHEELS_ALL:-0}" == 1 ]]; then
    cp scripts/gpu-wheels.txt "$REQS"
else
    grep -v -- "# image" scripts/gpu-wheels.txt >"$REQS"
fi
"${pip[@]}" download --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -r "$REQS" -d "$DEST"
du -sh "$DEST"
