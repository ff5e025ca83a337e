#!/usr/bin/env bash
# The one prepared GPU check: `scripts/gpu-check.sh` on a lent GPU machine, at most ~8 minutes.
#
# Runs with the machine's own python3 (no venv, no registry): the pinned wheels of
# scripts/gpu-wheels.txt install offline from wheels/gpu/ (filled beforehand by
# scripts/fetch-gpu-wheels.sh and carried along) into .gpu-site/, skipping those already installed.
# `--dry-run` lists every step and every wheel, exits 3 when one is missing (not `# image` pins), else 0.
#
# Steps (each with its own timeout, clipped to the budget; the script carries on past failures):
#   env             nvidia-smi, python / torch / triton / CUDA versions
#   install         the wheels (offline, --no-deps, --target .gpu-site)
#   pdl-smoke       a chain of PDL kernels (Hopper's programmatic dependent launch, every decode kernel)
#                   eagerly and replayed from a CUDA graph; when it fails, every later step (and the engine
#                   check after it, scripts/gpu-lease.sh) runs with PDBOX_TRITON_PDL=0, not all failing on it
#   (the steps that measure a target and the cuda_ipc appliance first, then the tests: a budget cut short
#   drops the steps at the end)
#   bench-kernels   python -m bench.kernels (decode >= 70%, page copy >= 80% of the d2d copy)
#   transfer-cuda_ipc  python -m bench.transfer --backend cuda_ipc (the 32K handoff >= 0.8x the d2d copy)
#   ttft-8k         scripts/ttft_check.py: 8K-token prompts, unified vs disagg TTFT (the handoff's share)
#   serve-cuda_ipc  pdbox up --prefill-gpus 0 --decode-gpus 0 --transport cuda_ipc: answers == unified
#   pytest-gpu      the GPU tests, selected by file (never all of tests/): kernels against their
#                   references, engine greedy tokens triton == torch on a random-weight model,
#                   TP 2 on one GPU over gloo (tokens == TP 1; NCCL itself needs 2 GPUs)
#   pytest-transport  the transport's GPU tests (cuda_ipc, nvshmem between processes): a step of their own,
#                   so a transport that hangs costs its step, not the kernel tests' results
#   pytest-engine   the engine's GPU tests (tests/engine/test_gpu_engine.py: CUDA graphs == eager == torch,
#                   the device sampler; gpu-engine-check.sh's pytest-gpu, which the lease then leaves out)
#                   (the three test steps run side by side: tests, not timings, they share the GPU)
#   serve-nvshmem   the same as serve-cuda_ipc with --transport nvshmem (two PEs on one GPU)
#   transfer-nvshmem  python -m bench.transfer --backend nvshmem (a figure, no target: after the other
#                   one-GPU steps, so the budget skips it first)
#   with 2+ GPUs:   serve-cross-gpu (prefill on GPU 0, decode on GPU 1) and serve-tp2-nccl
# No step needs the SmolLM2 GGUF (a random-weight Llama-shaped model is written on the machine).
# Logs, JUnit XML and JSON go to $OUT (or ./gpu-check-out/); summary.txt / summary.json at the end.
# Each step's timeout is clipped to what is left of the budget; a step with under half its timeout left is
# skipped, and whatever a step leaves running (a `pdbox up` killed with its check) is stopped after it
# (scripts/gpu-steps.sh).
# Exit: 0 when every step that ran passed (skips fail nothing), 1 otherwise, 2 without a CUDA device,
# 3 with a wheel missing.
# Knobs: PYTHON (default python3), GPU_WHEELS_DIR, GPU_SITE_DIR, GPU_CHECK_BUDGET_S (default 460),
# GPU_CHECK_STEPS (comma-separated step names to run, e.g. "install,transfer-nvshmem"; default all;
# env and pdl-smoke always run).
# On the device tool: carry wheels/gpu (and .gpu-site when it was built on an earlier call), and run it
# through scripts/gpu-pack.sh, which packs $OUT into one archive (the tool brings back at most 8 files).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h | --help) sed -n '2,39p' "$0"; exit 0 ;;
        *) echo "gpu-check: unknown argument $arg (use --dry-run)" >&2; exit 64 ;;
    esac
done
PY="${PYTHON:-python3}"
WHEELS_DIR="${GPU_WHEELS_DIR:-$PWD/wheels/gpu}"
SITE_DIR="${GPU_SITE_DIR:-$PWD/.gpu-site}"
WHEEL_LIST=scripts/gpu-wheels.txt
OUT_DIR="${OUT:-$PWD/gpu-check-out}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-460}"
START_S=$(date +%s)
SUMMARY=()
FAILED=0

# The GPU tests, by file and node: never the whole tests/ tree (its imports are not all there), never
# the slow SmolLM2 test (its GGUF cannot travel).
GPU_TESTS=(
    tests/kernels/test_gpu.py
    tests/kernels/test_engine_backend_gpu.py::test_tiny_model_fp32
    tests/engine/test_tp_gpu.py
)
TRANSPORT_TESTS=(tests/transport/test_gpu.py)
ENGINE_TESTS=(tests/engine/test_gpu_engine.py)  # issue 21's: CUDA graphs, the device sampler (also gpu-engine-check's)
PDL_TEST=tests/kernels/test_gpu.py::test_a_chain_of_pdl_kernels_replays_from_a_graph_as_it_runs_eagerly

# -- the wheels ------------------------------------------------------------------------------------
WHEELS=()    # name==version, in list order
FILES=()     # the matching file, or "" when missing
IMAGE=()     # 1: the machines' image holds it (`# image` in the list): a missing wheel is no error
MISSING=0
norm() { tr 'A-Z.-' 'a-z__' <<<"$1"; }   # a distribution name as wheel file names spell it
declare -A HAVE=()                      # "name-version" -> the wheel file in WHEELS_DIR
for f in "$WHEELS_DIR"/*.whl; do
    [[ -e "$f" ]] || continue
    base=$(basename "$f")
    IFS=- read -r wname wver _ <<<"$base"
    HAVE["$(norm "$wname")-$wver"]="$f"
done
while read -r line; do
    image=0
    [[ "$line" == *"# image"* ]] && image=1
    line="${line%%#*}"
    line="${line//[[:space:]]/}"
    [[ -z "$line" ]] && continue
    WHEELS+=("$line")
    IMAGE+=("$image")
    f="${HAVE["$(norm "${line%%==*}")-${line#*==}"]:-}"
    FILES+=("$f")
    [[ -n "$f" || $image == 1 ]] || MISSING=$((MISSING + 1))
done <"$WHEEL_LIST"

list_wheels() {
    local i total=0 size
    echo "wheels ($WHEEL_LIST -> $WHEELS_DIR):"
    for i in "${!WHEELS[@]}"; do
        if [[ -n "${FILES[$i]}" ]]; then
            size=$(stat -c %s "${FILES[$i]}")
            total=$((total + size))
            printf '  ok       %-32s %s (%d KB)\n' "${WHEELS[$i]}" "$(basename "${FILES[$i]}")" $((size / 1024))
        elif [[ ${IMAGE[$i]} == 1 ]]; then
            printf '  image    %-32s not carried: the machines'"'"' image has it\n' "${WHEELS[$i]}"
        else
            printf '  MISSING  %-32s run scripts/fetch-gpu-wheels.sh\n' "${WHEELS[$i]}"
        fi
    done
    echo "  ${#WHEELS[@]} wheels, $MISSING missing, $((total / 1048576)) MB present"
}

if ((DRY_RUN)); then
    echo "gpu-check --dry-run: python=$PY out=$OUT_DIR budget=${BUDGET_S}s site=$SITE_DIR"
    echo "steps:"
    echo "  env             nvidia-smi; $PY: torch, triton, CUDA versions, GPU count"
    echo "  install         $PY -m pip install --no-index --no-deps --target $SITE_DIR <the wheels not installed yet>"
    echo "  pdl-smoke       $PY -m pytest $PDL_TEST (failing: PDBOX_TRITON_PDL=0 from then on)"
    echo "  bench-kernels   $PY -m bench.kernels --out kernels-bf16.json"
    echo "  transfer-cuda_ipc  $PY -m bench.transfer --backend cuda_ipc --pages 512 --pages 2048 --out transfer-cuda_ipc.json"
    echo "  ttft-8k         $PY scripts/ttft_check.py --prompt-tokens 8192 (unified vs disagg TTFT, cuda_ipc)"
    echo "  serve-cuda_ipc  PDBOX_TRITON_AUTOTUNE=0 $PY scripts/serve_check.py --prefill-gpus 0 --decode-gpus 0 --transport cuda_ipc"
    echo "  pytest-gpu      $PY -m pytest -m 'gpu and not slow' ${GPU_TESTS[*]}"
    echo "  pytest-transport  $PY -m pytest -m 'gpu and not slow' ${TRANSPORT_TESTS[*]}"
    echo "  pytest-engine   $PY -m pytest ${ENGINE_TESTS[*]}  (the three pytest steps side by side)"
    echo "  serve-nvshmem   PDBOX_TRITON_AUTOTUNE=0 $PY scripts/serve_check.py --prefill-gpus 0 --decode-gpus 0 --transport nvshmem"
    echo "  transfer-nvshmem   $PY -m bench.transfer --backend nvshmem --pages 2048 --layout both"
    echo "  serve-cross-gpu (2+ GPUs)  scripts/serve_check.py --prefill-gpus 0 --decode-gpus 1 --transport cuda_ipc"
    echo "  serve-tp2-nccl  (2+ GPUs)  scripts/serve_check.py --prefill-gpus 0-1 --prefill-tp 2 --decode-gpus 1 --transport cuda_ipc"
    list_wheels
    ((MISSING)) && exit 3
    exit 0
fi

mkdir -p "$OUT_DIR"
if ((MISSING)); then
    list_wheels | tee "$OUT_DIR/summary.txt" >&2
    echo "gpu-check: $MISSING wheel(s) missing from $WHEELS_DIR; run scripts/fetch-gpu-wheels.sh first" >&2
    exit 3
fi

STEPS_FILTER="${GPU_CHECK_STEPS:-}"
ALWAYS_STEPS=env,pdl-smoke  # a rerun on a fresh machine decides PDL for itself
# shellcheck source=scripts/gpu-steps.sh
source scripts/gpu-steps.sh

if ! timeout 60 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu-check: $PY's torch sees no CUDA device; nothing to check." | tee "$OUT_DIR/summary.txt" >&2
    exit 2
fi
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
echo "gpu-check: python=$PY gpus=$NGPU out=$OUT_DIR budget=${BUDGET_S}s"

run_step env 20 bash -c "nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); print(torch.cuda.get_device_name(0), torch.cuda.device_count(), \"GPUs\")'"

# Offline install of the wheels whose distribution this python lacks (the machine's own stay, as the runs of
# 2026-12-04 used them), and of those in AT_LEAST that it has below the pin (scripts/wheel_status.py): the
# checks' `--session-timeout` needs pytest-timeout 2.3, which the image's version is not known to be.
AT_LEAST=" pytest-timeout "
install_wheels() {
    local todo=() lacking=() i name state rc=0
    mkdir -p "$SITE_DIR"
    for i in "${!WHEELS[@]}"; do
        name="${WHEELS[$i]%%==*}"
        state=$(PYTHONPATH="$SITE_DIR" "$PY" scripts/wheel_status.py "$name" "${WHEELS[$i]#*==}" \
            "$([[ -n "${FILES[$i]}" && "$AT_LEAST" == *" $name "* ]] && echo 1 || echo 0)" 2>/dev/null)
        if [[ "$state" == present ]]; then
            echo "present  $name"
        elif [[ -n "${FILES[$i]}" ]]; then
            [[ "$state" == older ]] && echo "older    $name: the carried ${WHEELS[$i]} goes first on PYTHONPATH"
            todo+=("${FILES[$i]}")
        else  # an `# image` pin whose wheel was not carried, and this machine lacks it after all
            lacking+=("${WHEELS[$i]}")
        fi
    done
    if ((${#lacking[@]})); then
        echo "MISSING: this machine lacks ${lacking[*]} and no wheel was carried" \
             "(GPU_WHEELS_ALL=1 scripts/fetch-gpu-wheels.sh fetches those too)" >&2
        rc=1
    fi
    ((${#todo[@]})) || { echo "nothing to install"; return "$rc"; }
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install --disable-pip-version-check --no-index --no-deps --no-compile --target "$SITE_DIR" \
            "${todo[@]}" || return 1
    else  # no pip here: a wheel is a zip laid out for site-packages
        for i in "${todo[@]}"; do "$PY" -m zipfile -e "$i" "$SITE_DIR" || return 1; done
    fi
    return "$rc"
}
run_step install 90 bash -c "$(declare -p PY SITE_DIR WHEELS FILES AT_LEAST); $(declare -f install_wheels); install_wheels"
export PYTHONPATH="$PWD:$SITE_DIR${PYTHONPATH:+:$PYTHONPATH}"
# One node: NVSHMEM bootstraps over loopback and probes no InfiniBand (as tests/transport's workers set it);
# the benches and `pdbox up` inherit this environment.
export NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME="${NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME:-lo}"
export NVSHMEM_REMOTE_TRANSPORT="${NVSHMEM_REMOTE_TRANSPORT:-none}"

# PDL had never run on a GPU when this step was written: a chain that fails turns it off for what follows
# (its compiles stay in Triton's cache for pytest-gpu).
rm -f "$OUT_DIR/pdl-off"
run_step pdl-smoke 60 env PDBOX_TRITON_AUTOTUNE=0 "$PY" -m pytest -p no:cacheprovider -q -rs --timeout 50 "$PDL_TEST"
if [[ "$LAST_STATUS" != PASS && "$LAST_STATUS" != SKIP ]]; then
    export PDBOX_TRITON_PDL=0
    echo "pdl-smoke $LAST_STATUS" >"$OUT_DIR/pdl-off"
    step_row pdl-off NOTE - "pdl-smoke $LAST_STATUS: every later step runs with PDBOX_TRITON_PDL=0"
fi

# What measures a target first (the kernels, the 32K handoff, the 8K TTFT), then the cuda_ipc appliance's
# answers, then the tests: the budget (about 430 s of the lease's 560) cuts the steps at the end first, and a
# pytest step cut short by its session deadline is a CUT row, its JUnit XML the tests that ran.
run_step bench-kernels 90 "$PY" -m bench.kernels --out "$OUT_DIR/kernels-bf16.json"
# SmolLM2's KV shape at 8K and 32K tokens, contiguous and scattered destination pages; nvshmem starts a
# two-PE job per size (seconds each), so it measures the contiguous layout only.
run_step transfer-cuda_ipc 60 "$PY" -m bench.transfer --backend cuda_ipc --pages 512 --pages 2048 \
    --out "$OUT_DIR/transfer-cuda_ipc.json"

# The serving steps compare unified and disaggregated answers token for token: every engine launches each
# kernel's fixed first config, as the tests do. Autotuned, each process would time its own pick (another
# BLOCK_N sums in another order, enough to flip a near-tie of the random model) and compile every config.
SERVE_ENV=(env PDBOX_TRITON_AUTOTUNE=0)
# The handoff's share of an 8K prompt's TTFT (51 s on an H200): a target.
run_step ttft-8k 100 "$PY" scripts/ttft_check.py --prompt-tokens 8192 --out "$OUT_DIR/ttft-8k.json" \
    --log-dir "$OUT_DIR/ttft-8k-logs"
run_step serve-cuda_ipc 90 "${SERVE_ENV[@]}" "$PY" scripts/serve_check.py --prefill-gpus 0 --decode-gpus 0 \
    --transport cuda_ipc --out "$OUT_DIR/serve-cuda_ipc.json" --log-dir "$OUT_DIR/serve-cuda_ipc-logs"

# Autotuning every specialization the tests hit would cost minutes of compiles: tests use each
# kernel's fixed first config; bench-kernels autotunes.
# NOTE: the session deadline is checked between tests, and a test started before it gets its --timeout in
# full: 75 + 45 + 10 s for the JUnit XML <= the step's 130 s (the same sum below: 70 + 25 + 5 <= 100)
# The three run side by side (STEP_BG): tests, not timings, so they can share the GPU, and their Triton
# compiles the machine's 16 cores (at h200-2026-12-04-a the tests took 82 s of a 306 s check).
STEP_BG=1 run_step pytest-gpu 130 env PDBOX_TRITON_AUTOTUNE=0 "$PY" -m pytest -p no:cacheprovider -m "gpu and not slow" \
    -q -rs --timeout 45 --session-timeout 75 --junitxml "$OUT_DIR/pytest-gpu.xml" "${GPU_TESTS[@]}"
STEP_BG=1 run_step pytest-transport 100 env PDBOX_TRITON_AUTOTUNE=0 "$PY" -m pytest -p no:cacheprovider \
    -m "gpu and not slow" -q -rs --session-timeout 70 --junitxml "$OUT_DIR/pytest-transport.xml" "${TRANSPORT_TESTS[@]}"
# 65 + 25 + 10 <= 100 (in gpu-engine-check.sh, where its time is the benches': 40 + 25 + 10)
STEP_BG=1 run_step pytest-engine 100 env PDBOX_TRITON_AUTOTUNE=0 "$PY" -m pytest -p no:cacheprovider -q -rs \
    --timeout 25 --session-timeout 65 --junitxml "$OUT_DIR/pytest-gpu-engine.xml" "${ENGINE_TESTS[@]}"
wait_steps

# nvshmem's appliance and bandwidth (a figure with no target) last: the budget skips them first.
run_step serve-nvshmem 90 "${SERVE_ENV[@]}" "$PY" scripts/serve_check.py --prefill-gpus 0 --decode-gpus 0 \
    --transport nvshmem --out "$OUT_DIR/serve-nvshmem.json" --log-dir "$OUT_DIR/serve-nvshmem-logs"
# 32K tokens on contiguous and on scattered pages (the page-copy kernel's case: puts cost a call a page)
run_step transfer-nvshmem 60 "$PY" -m bench.transfer --backend nvshmem --pages 2048 --layout both \
    --out "$OUT_DIR/transfer-nvshmem.json"

if ((NGPU >= 2)); then
    run_step serve-cross-gpu 90 "${SERVE_ENV[@]}" "$PY" scripts/serve_check.py --prefill-gpus 0 --decode-gpus 1 \
        --transport cuda_ipc --out "$OUT_DIR/serve-cross-gpu.json" --log-dir "$OUT_DIR/serve-cross-gpu-logs"
    run_step serve-tp2-nccl 90 "${SERVE_ENV[@]}" "$PY" scripts/serve_check.py --prefill-gpus 0-1 --prefill-tp 2 \
        --decode-gpus 1 --transport cuda_ipc --out "$OUT_DIR/serve-tp2-nccl.json" --log-dir "$OUT_DIR/serve-tp2-nccl-logs"
else
    skip_step serve-cross-gpu "one GPU: cross-GPU cuda_ipc needs 2"
    skip_step serve-tp2-nccl "one GPU: TP 2 over NCCL needs 2"
fi

{
    echo "gpu-check summary ($(date -u +%FT%TZ), $(($(date +%s) - START_S))s of ${BUDGET_S}s, $NGPU GPU(s))"
    printf '%s\n' "${SUMMARY[@]}"
} | tee "$OUT_DIR/summary.txt"
"$PY" - "$OUT_DIR/summary.txt" "$OUT_DIR/summary.json" <<'EOF'
import json, sys
lines = open(sys.argv[1]).read().splitlines()[1:]
steps = [{"step": ln.split()[0], "status": ln.split()[1], "line": ln} for ln in lines if ln.strip()]
json.dump({"steps": steps, "ok": all(s["status"] in ("PASS", "SKIP") for s in steps)}, open(sys.argv[2], "w"), indent=1)
EOF
exit "$FAILED"
