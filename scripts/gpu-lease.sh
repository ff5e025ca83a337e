#!/usr/bin/env bash
# A lent GPU's whole check in ONE device call: scripts/gpu-check.sh (issue 19: installs the carried wheels
# into .gpu-site, then the kernels' bench, the 32K handoff, the 8K-token TTFT, serving, and the GPU tests,
# issue 21's engine tests among them), then scripts/gpu-engine-check.sh's benches (issue 21: decode and
# prefill against their floors, PDL's A/B) on the site the first one installed.
# One call, because the device tool gives an idle machine back within seconds (its idle_release_s), and a
# second call on a fresh machine finds no .gpu-site. On the device tool, carrying wheels/gpu:
#
#   GPU_LEASE_BUDGET_S=560 bash scripts/gpu-pack.sh lease -- bash scripts/gpu-lease.sh     # timeout_s 595
#
# GPU_LEASE_BUDGET_S (default 560 s): gpu-check gets it less GPU_LEASE_ENGINE_S (default 130 s), the
# engine check whatever is left then. Output: $OUT/check/, $OUT/engine/, and $OUT/summary.txt holding both
# summaries. `--dry-run`: the plan, then gpu-check's dry run (its exit status: 3 with a wheel missing).
# Exit: 0 when both checks passed; else gpu-check's status when it failed, then the engine check's (5: it
# had no time to run a step).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
BUDGET_S="${GPU_LEASE_BUDGET_S:-560}"
ENGINE_S="${GPU_LEASE_ENGINE_S:-130}"
OUT_DIR="${OUT:-$PWD/gpu-check-out}"
SITE_DIR="${GPU_SITE_DIR:-$PWD/.gpu-site}"
LEASE_ENGINE_STEPS=bench-8b,bench-1b,bench-8b-nopdl,bench-1b-nopdl  # the engine check's steps in a lease
case "${1:-}" in
    "") ;;
    --dry-run)
        echo "gpu-lease --dry-run: ${BUDGET_S}s in all: scripts/gpu-check.sh with $((BUDGET_S - ENGINE_S))s," \
             "then scripts/gpu-engine-check.sh with what is left (>= ${ENGINE_S}s) on PYTHONPATH=$PWD:$SITE_DIR," \
             "steps ${GPU_ENGINE_STEPS-$LEASE_ENGINE_STEPS} (its tests run in gpu-check: pytest-engine)"
        GPU_CHECK_BUDGET_S=$((BUDGET_S - ENGINE_S)) exec bash scripts/gpu-check.sh --dry-run ;;
    *) echo "gpu-lease: unknown argument $1 (use --dry-run)" >&2; exit 64 ;;
esac
if ((ENGINE_S < 60 || BUDGET_S - ENGINE_S < 120)); then
    echo "gpu-lease: budget ${BUDGET_S}s with ${ENGINE_S}s for the engine check leaves too little for one of them" >&2
    exit 64
fi
START_S=$(date +%s)
mkdir -p "$OUT_DIR/check" "$OUT_DIR/engine"

OUT="$OUT_DIR/check" GPU_CHECK_BUDGET_S=$((BUDGET_S - ENGINE_S)) GPU_SITE_DIR="$SITE_DIR" bash scripts/gpu-check.sh
check_rc=$?
engine_rc=0
if ((check_rc == 2 || check_rc == 3)); then
    echo "gpu-lease: gpu-check exited $check_rc (2: no CUDA device, 3: a wheel missing): no engine check" \
        | tee "$OUT_DIR/engine/engine-summary.txt"
else
    left=$((BUDGET_S - ($(date +%s) - START_S)))
    if [[ -e "$OUT_DIR/check/pdl-off" ]]; then  # gpu-check's chain of PDL kernels failed: the engine check too
        export PDBOX_TRITON_PDL=0
        echo "gpu-lease: PDL off for the engine check ($(cat "$OUT_DIR/check/pdl-off"))"
    fi
    # NOTE: its tests ran in gpu-check (pytest-engine, beside the other tests): here the benches alone, unless
    # GPU_ENGINE_STEPS says otherwise
    OUT="$OUT_DIR/engine" GPU_ENGINE_BUDGET_S=$left PYTHONPATH="$PWD:$SITE_DIR${PYTHONPATH:+:$PYTHONPATH}" \
        GPU_ENGINE_STEPS="${GPU_ENGINE_STEPS-$LEASE_ENGINE_STEPS}" bash scripts/gpu-engine-check.sh
    engine_rc=$?
    rows=$(grep -v '^env ' "$OUT_DIR/engine/engine-summary.txt")
    # NOTE: no step ran for want of time (steps left out by GPU_ENGINE_STEPS are no failure)
    if ! grep -Eq '^[a-z0-9-]+ +(PASS|FAIL|TIMEOUT|KILLED|MISS|CUT) ' <<<"$rows" && grep -q 'budget left' <<<"$rows"; then
        echo "gpu-lease: the engine check ran no step (${left}s were left of ${BUDGET_S}s)" \
            | tee -a "$OUT_DIR/engine/engine-summary.txt"
        ((engine_rc)) || engine_rc=5
    fi
fi
cat "$OUT_DIR/check/summary.txt" "$OUT_DIR/engine/engine-summary.txt" >"$OUT_DIR/summary.txt" 2>/dev/null
((check_rc)) && exit "$check_rc"
exit "$engine_rc"
