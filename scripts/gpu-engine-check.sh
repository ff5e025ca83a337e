#!/usr/bin/env bash
# Issue 21's device check, at most ~170 s on one GPU: `scripts/gpu-engine-check.sh`.
#
# Runs with the machine's python3 (PYTHON overrides) and the PYTHONPATH it is given (the repo and a
# site dir with torch, triton, tokenizers, pytest); installs nothing. Steps, each under `timeout`:
#   env          python / torch / triton versions, the GPU
#   bench-8b     python -m bench.engine --device cuda --model random:llama-8b  -> bench-llama-8b.json
#                (first: its figures carry the issue's targets, and a budget cut short drops the last steps)
#   pytest-gpu   tests/engine/test_gpu_engine.py (greedy tokens with CUDA graphs == eager == the torch
#                references on random:small, bf16 graph logits == eager, sampling semantics, eager
#                fallback beyond the ladder, the device sampler), PDBOX_TRITON_AUTOTUNE=0; a CUT row where
#                its session deadline stopped it with no test failed (scripts/gpu-steps.sh)
#   bench-1b     the same for random:llama-1b                                  -> bench-llama-1b.json
#   bench-8b-nopdl, bench-1b-nopdl  batch 1 and 64 again with PDBOX_TRITON_PDL=0 (kernels launched
#                without programmatic dependent launch): PDL's A/B on the same machine
#                                                       -> bench-llama-8b-nopdl.json, bench-llama-1b-nopdl.json
#                (both profiled: the replay's device time, batch 1's and 64's kernels graphed and eager);
#                skipped where PDBOX_TRITON_PDL=0 is set already (gpu-check's PDL chain failed)
# The benches write their JSON after every figure, so one cut short by its timeout keeps what it
# measured (and fails the step). Kernels run their fixed first config (PDBOX_TRITON_AUTOTUNE=0): the
# autotuner's compiles would not fit the budget; set GPU_ENGINE_AUTOTUNE=1 to tune anyway.
# Every step's timeout is clipped to what is left of GPU_ENGINE_BUDGET_S (default 170 s); a step with under
# half its timeout left is skipped (which fails nothing); GPU_ENGINE_STEPS (comma-separated) runs only those.
# What a step leaves running is stopped after it (scripts/gpu-steps.sh).
# Output: logs, JUnit XML and JSON under $OUT (or ./gpu-check-out/); a summary table at the end.
# `--dry-run`: the steps and the budget, touching nothing. Exit: 0 when every step that ran passed,
# 1 otherwise, 2 without a CUDA device.
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
case "${1:-}" in
    "") ;;
    --dry-run)
        echo "gpu-engine-check --dry-run: ${GPU_ENGINE_BUDGET_S:-170}s; steps${GPU_ENGINE_STEPS:+ (asked: $GPU_ENGINE_STEPS)}:" \
             "env, bench-8b, pytest-gpu (tests/engine/test_gpu_engine.py), bench-1b, bench-8b-nopdl, bench-1b-nopdl"
        exit 0 ;;
    *) echo "gpu-engine-check: unknown argument $1 (use --dry-run)" >&2; exit 64 ;;
esac
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-$PWD/gpu-check-out}"
AUTOTUNE="${GPU_ENGINE_AUTOTUNE:-0}"
BUDGET_S="${GPU_ENGINE_BUDGET_S:-170}"
mkdir -p "$OUT_DIR"
START_S=$(date +%s)
SUMMARY=()
FAILED=0

STEPS_FILTER="${GPU_ENGINE_STEPS:-}"
# shellcheck source=scripts/gpu-steps.sh
source scripts/gpu-steps.sh

if ! timeout 45 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu-engine-check: $PY's torch sees no CUDA device; nothing to check." | tee "$OUT_DIR/engine-summary.txt" >&2
    exit 2
fi

run_step env 10 "$PY" -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__); print(torch.cuda.get_device_name(0))'

# Small enough to finish in the budget: 12 timed steps a batch, 256-token contexts.
# --profile-batches: the kernels of batch 1's and 64's step (graph replay and eager; the two sizes with targets)
# and every replay's device time, beside the wall step.
BENCH=(--device cuda --json --steps 12 --context 256 --batches 1,64,16,256 --prefill-lens 8192,1024
       --profile-batches 1,64)
# The 8B shape first: its figures carry issue 21's targets (a budget cut short skips the 1B shape first).
# 75 s: 20 s at h200-2026-12-04-b, before the warm-up timed the GEMV at buckets up to 64 (about 25 Triton
# compiles of it, first config) and before the profiles
run_step bench-8b 75 env PDBOX_TRITON_AUTOTUNE="$AUTOTUNE" "$PY" -m bench.engine --model random:llama-8b \
    "${BENCH[@]}" --out "$OUT_DIR/bench-llama-8b.json"
# NOTE: pytest-timeout checks its session deadline only between tests and a test started before it runs
# its own --timeout in full, so the step's limit holds both and 10 s for the JUnit XML: 40 + 25 + 10 <= 75
run_step pytest-gpu 75 env PDBOX_TRITON_AUTOTUNE=0 "$PY" -m pytest -p no:cacheprovider -q -rs --timeout 25 \
    --session-timeout 40 --junitxml "$OUT_DIR/pytest-gpu-engine.xml" tests/engine/test_gpu_engine.py

run_step bench-1b 45 env PDBOX_TRITON_AUTOTUNE="$AUTOTUNE" "$PY" -m bench.engine --model random:llama-1b \
    "${BENCH[@]}" --out "$OUT_DIR/bench-llama-1b.json"
NOPDL=(--device cuda --json --steps 12 --context 256 --batches 1,64 --prefill-lens 1024 --profile-batches 1,64)
if [[ "${PDBOX_TRITON_PDL:-}" == 0 ]]; then  # every bench above ran without PDL: no A/B to make
    skip_step bench-8b-nopdl "PDBOX_TRITON_PDL=0 for every step: the benches above ran without PDL"
    skip_step bench-1b-nopdl "PDBOX_TRITON_PDL=0 for every step: the benches above ran without PDL"
else
    run_step bench-8b-nopdl 40 env PDBOX_TRITON_AUTOTUNE="$AUTOTUNE" PDBOX_TRITON_PDL=0 "$PY" -m bench.engine \
        --model random:llama-8b "${NOPDL[@]}" --out "$OUT_DIR/bench-llama-8b-nopdl.json"
    run_step bench-1b-nopdl 30 env PDBOX_TRITON_AUTOTUNE="$AUTOTUNE" PDBOX_TRITON_PDL=0 "$PY" -m bench.engine \
        --model random:llama-1b "${NOPDL[@]}" --out "$OUT_DIR/bench-llama-1b-nopdl.json"
fi

{
    echo "gpu-engine-check ($(date -u +%FT%TZ), $(($(date +%s) - START_S)) s)"
    printf '%s\n' "${SUMMARY[@]}"
    for f in "$OUT_DIR"/bench-llama-*.json; do
        [[ -f $f ]] || continue
        "$PY" - "$f" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[1].rsplit('/', 1)[-1]} {r['model']}: PDL {r.get('pdl')}, copy {r['copy_gb_s']} GB/s, "
      f"matmul {r['matmul_tflop_s']} TFLOP/s, warm-up {r['warmup_s']} s")
for k, v in r.items():
    if k.startswith(("decode_ms_", "decode_gpu_", "decode_floor_", "graph_speedup", "prefill_tok_s", "prefill_share")):
        print(f"  {k:32s} {v}")
    elif k.startswith("profile_") and isinstance(v, dict):
        print(f"  {k}: {v['kernels']} kernels, busy {v['busy_us']} us (covered {v.get('covered_us', '-')}, "
              f"overlapped {v.get('overlap_us', '-')}), gaps {v.get('gaps_us', '-')} us")
        for row in v["top"][:8]:
            print(f"    {row['us']:9.1f} us {row['calls']:6.1f}x  {row['name'][:70]}")
    elif k.startswith("profile_"):
        print(f"  {k}: {v}")
for t in r.get("linear_choice", []):
    # SiLU and RMSNorm rows: the kernel before apart, then the layer, against the GEMV that folds it in
    label = t['name'] + (' (with SiLU)' if t.get('silu_mul') else ' (with RMSNorm)' if t.get('norm') else '')
    base = 'apart' if t.get('silu_mul') or t.get('norm') else 'cuBLAS'
    print(f"  linear {label:22s} rows {t['rows']:2d}: {base} {t['cublas_us']:7.1f} us, GEMV {t['gemv_us']:7.1f} us"
          f"{'  <- GEMV' if t['gemv'] else ''}")
EOF
    done
} | tee "$OUT_DIR/engine-summary.txt"
exit "$FAILED"
