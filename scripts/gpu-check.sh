#!/usr/bin/env bash
# The one prepared GPU check (`make gpu-check`): at most ~5 minutes on a CUDA machine.
#
#   1. env        nvidia-smi, torch / triton / CUDA versions
#   2. pytest     `pytest -m gpu` over the whole repo (tests/kernels, tests/transport, tests/engine ...)
#   3. kernels    python -m bench.kernels (GB/s vs HBM peak; decode >= 70%, page copy >= 80% of d2d)
#   4. transfer   python -m bench.transfer --backend cuda_ipc, then nvshmem (when bench.transfer exists)
#
# Every step has its own timeout and the script carries on past failures; logs, JUnit XML and JSON go
# to $OUT (when set) or ./gpu-check-out/, with summary.txt / summary.json at the end. Exit status: 0
# when every step that ran passed, 1 otherwise, 2 when there is no CUDA device.
# Knobs: PYTHON (interpreter to use), GPU_CHECK_BUDGET_S (total seconds, default 290),
# GPU_CHECK_TRANSFER_BACKENDS (default "cuda_ipc nvshmem").
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT_DIR"
BUDGET_S="${GPU_CHECK_BUDGET_S:-290}"
START_S=$(date +%s)
SUMMARY=()
FAILED=0

# The first interpreter whose torch sees a CUDA device (a repo venv may hold a CPU-only torch).
pick_python() {
    local c
    for c in ${PYTHON:-} .venv/bin/python python3 python; do
        if command -v "$c" >/dev/null 2>&1 \
            && timeout 60 "$c" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
            echo "$c"
            return 0
        fi
    done
    return 1
}

# run_step NAME TIMEOUT_S CMD...: run with a timeout clipped to the remaining budget, log, record.
run_step() {
    local name="$1" limit="$2"
    shift 2
    local now left rc t0 t1 status
    now=$(date +%s)
    left=$((BUDGET_S - (now - START_S)))
    if ((left < 10)); then
        SUMMARY+=("$(printf '%-18s %-6s %6s  %s' "$name" "SKIP" "-" "out of time budget")")
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "=== [$name] (timeout ${limit}s): $*"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    rc=$?
    t1=$(date +%s)
    tail -n 25 "$OUT_DIR/$name.log"
    if ((rc == 0)); then
        status=PASS
    elif ((rc == 124 || rc == 137)); then
        status=TIMEOUT
        FAILED=1
    else
        status=FAIL
        FAILED=1
    fi
    SUMMARY+=("$(printf '%-18s %-7s %5ss  rc=%s  %s' "$name" "$status" "$((t1 - t0))" "$rc" "$OUT_DIR/$name.log")")
}

skip_step() {
    SUMMARY+=("$(printf '%-18s %-7s %6s  %s' "$1" "SKIP" "-" "$2")")
}

if ! PY=$(pick_python); then
    echo "gpu-check: no Python here sees a CUDA device (torch.cuda.is_available() is False); nothing to check." \
        | tee "$OUT_DIR/summary.txt" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu-check: python=$PY out=$OUT_DIR budget=${BUDGET_S}s"

run_step env 20 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); print(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0))'"

# Autotuning every specialization the tests hit would cost minutes of compiles: tests use each
# kernel's fixed first config; the bench below autotunes.
run_step pytest-gpu 150 env PDBOX_TRITON_AUTOTUNE=0 "$PY" -m pytest -m gpu -q -rs --timeout 120 \
    --junitxml "$OUT_DIR/pytest-gpu.xml" tests

run_step bench-kernels 75 "$PY" -m bench.kernels --out "$OUT_DIR/kernels-bf16.json"

if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('bench.transfer') is None)" 2>/dev/null; then
    transfer_help=$(timeout 30 "$PY" -m bench.transfer --help 2>&1 || true)
    for backend in ${GPU_CHECK_TRANSFER_BACKENDS:-cuda_ipc nvshmem}; do
        if ! grep -q -- "$backend" <<<"$transfer_help"; then
            skip_step "transfer-$backend" "bench.transfer does not offer --backend $backend"
            continue
        fi
        json="$OUT_DIR/transfer-$backend.json"
        if grep -q -- "--out" <<<"$transfer_help"; then
            run_step "transfer-$backend" 40 "$PY" -m bench.transfer --backend "$backend" --out "$json"
        elif grep -q -- "--json" <<<"$transfer_help"; then  # the JSON report is stdout; the log keeps stderr
            run_step "transfer-$backend" 40 bash -c '"$1" -m bench.transfer --backend "$2" --json > "$3"' \
                _ "$PY" "$backend" "$json"
        else
            run_step "transfer-$backend" 40 "$PY" -m bench.transfer --backend "$backend"
        fi
    done
else
    skip_step transfer-cuda_ipc "bench.transfer is not in this checkout"
    skip_step transfer-nvshmem "bench.transfer is not in this checkout"
fi

{
    echo "gpu-check summary ($(date -u +%FT%TZ), $(($(date +%s) - START_S))s of ${BUDGET_S}s)"
    printf '%s\n' "${SUMMARY[@]}"
} | tee "$OUT_DIR/summary.txt"
"$PY" - "$OUT_DIR/summary.txt" "$OUT_DIR/summary.json" <<'EOF'
import json, sys
lines = open(sys.argv[1]).read().splitlines()[1:]
steps = [{"step": ln.split()[0], "status": ln.split()[1], "line": ln} for ln in lines if ln.strip()]
json.dump({"steps": steps, "ok": all(s["status"] in ("PASS", "SKIP") for s in steps)}, open(sys.argv[2], "w"), indent=1)
EOF
exit "$FAILED"
