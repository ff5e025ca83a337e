# The step runner of the device checks (sourced by scripts/gpu-check.sh and scripts/gpu-engine-check.sh).
#
# The caller sets OUT_DIR, BUDGET_S, START_S, and SUMMARY=() FAILED=0; STEPS_FILTER (comma-separated
# step names, empty: all) runs only those, and those of ALWAYS_STEPS (default `env`) always. `run_step NAME LIMIT_S CMD...` runs CMD under
# `timeout` with its limit clipped to what is left of BUDGET_S (less STEP_RESERVE_S, so that a step killed at
# its limit and reaped still ends within the budget), output to $OUT_DIR/NAME.log, one row in
# SUMMARY (LAST_STATUS: the row's status). A step starts only with at least half its limit left: else it is a SKIP, which fails nothing
# (a spent budget says nothing of the code), while a failure, a timeout or a MISS (exit 3: it ran and a
# target was missed) sets FAILED=1. A pytest step that passed every test it started but hit its
# --session-timeout (pytest-timeout then exits 1 and starts no more tests) is a CUT, which fails nothing
# either: its row counts the tests that ran, and the summary's `ok` is false.
# `STEP_BG=1 run_step ...` starts a step in the background (steps that need no GPU to themselves: the
# correctness tests, never a bench); `wait_steps` waits for those and adds their rows in the order they
# started. Each is clipped to the budget left when it starts.
# A step's processes carry PDBOX_GPU_STEP=<its name and this shell's pid> in their environment; when the
# step ends, whatever of them still runs is stopped (TERM, then KILL): a step killed by its timeout
# cannot stop the `pdbox up` it started, which runs in a session of its own and holds the GPU.

STEP_WIDTH=${STEP_WIDTH:-18}
BG_STEPS=()  # "name:pid" of the steps running in the background (STEP_BG=1), for wait_steps
STEP_RESERVE_S=30  # kept back from each step's limit: timeout's kill-after (10 s), the reaping (15 s), slack

step_row() {  # NAME STATUS SECONDS REST
    SUMMARY+=("$(printf "%-${STEP_WIDTH}s %-7s %6s  %s" "$1" "$2" "$3" "$4")")
}

skip_step() {  # NAME WHY
    step_row "$1" SKIP - "$2"
    LAST_STATUS=SKIP
}

step_pids() {  # MARKER: the pids whose environment holds it
    local p
    for p in /proc/[0-9]*; do
        grep -qzx -- "$1" "$p/environ" 2>/dev/null && echo "${p#/proc/}"
    done
}

reap_step() {  # MARKER: stop what a step left running; echoes how many it found
    local pids n i
    mapfile -t pids < <(step_pids "$1")
    n=${#pids[@]}
    ((n)) && kill -TERM "${pids[@]}" 2>/dev/null
    for ((i = 0; i < 30 && n; i++)); do  # 15 s for a graceful stop (an appliance stops its engines)
        sleep 0.5
        mapfile -t pids < <(step_pids "$1")
        ((${#pids[@]})) || break
    done
    ((${#pids[@]})) && kill -KILL "${pids[@]}" 2>/dev/null
    echo "$n"
}

session_cut() {  # LOG: pytest stopped at its session deadline with no test failed
    grep -q 'session-timeout: .* exceeded' "$1" && ! grep -Eq '[0-9]+ (failed|errors?)\b' "$1"
}

run_step() {  # NAME LIMIT_S CMD...   (STEP_BG=1 run_step ...: in the background, until `wait_steps`)
    local name="$1" limit="$2"
    shift 2
    local left
    if [[ -n "${STEPS_FILTER:-}" && ",${ALWAYS_STEPS:-env}," != *",$name,"* && ",$STEPS_FILTER," != *",$name,"* ]]; then
        skip_step "$name" "not among the steps asked for"
        return 0
    fi
    left=$((BUDGET_S - ($(date +%s) - START_S) - STEP_RESERVE_S))
    if ((2 * left < limit)); then
        skip_step "$name" "${left}s of the ${BUDGET_S}s budget left, under half its ${limit}s"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "=== [$name] (timeout ${limit}s${STEP_BG:+, in the background}): $*"
    if [[ -n "${STEP_BG:-}" ]]; then
        exec_step "$name" "$limit" "$@" >"$OUT_DIR/$name.row" &
        BG_STEPS+=("$name:$!")
    else
        exec_step "$name" "$limit" "$@" >"$OUT_DIR/$name.row"
        record_step "$name"
    fi
    return 0
}

wait_steps() {  # the rows of the steps started with STEP_BG=1, in the order they started
    local entry
    for entry in "${BG_STEPS[@]}"; do
        wait "${entry##*:}"
        record_step "${entry%%:*}"
    done
    BG_STEPS=()
}

exec_step() {  # NAME LIMIT_S CMD...: runs it; prints "STATUS SECONDS REST" (one line)
    local name="$1" limit="$2"
    shift 2
    local rc t0 t1 status marker left_over ran=""
    marker="PDBOX_GPU_STEP=$name.$$"
    t0=$(date +%s)
    env "$marker" timeout -k 10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    rc=$?
    t1=$(date +%s)  # NOTE: before the reaping (up to 15 s): a kill well before the limit is not a timeout
    left_over=$(reap_step "$marker")
    ((left_over)) && echo "[$name] stopped $left_over process(es) it left running" >>"$OUT_DIR/$name.log"
    tail -n 25 "$OUT_DIR/$name.log" >&2
    if ((rc == 0)); then
        status=PASS
    elif ((rc == 124 || (rc == 137 && t1 - t0 >= limit))); then
        status=TIMEOUT
    elif ((rc == 137)); then  # killed before its limit: the OOM killer, or a signal from outside
        status=KILLED
    elif ((rc == 3)); then  # the step ran and measured; a target was missed (scripts/ttft_check.py)
        status=MISS
    elif ((rc == 1)) && session_cut "$OUT_DIR/$name.log"; then
        status=CUT
        ran="$(grep -Eo '[0-9]+ passed[^=]*' "$OUT_DIR/$name.log" | tail -n 1) before the deadline  "
    else
        status=FAIL
    fi
    echo "$status $((t1 - t0))s rc=$rc  $ran$OUT_DIR/$name.log"
}

record_step() {  # NAME: its row from exec_step's line, FAILED and LAST_STATUS, the progress and the archive
    local name="$1" status secs rest
    read -r status secs rest <"$OUT_DIR/$name.row" || { status=FAIL; secs=-; rest="no row: the step's shell died"; }
    rm -f "$OUT_DIR/$name.row"
    [[ $status == PASS || $status == CUT ]] || FAILED=1
    step_row "$name" "$status" "$secs" "$rest"
    LAST_STATUS=$status
    # NOTE: each row also straight to the device tool's $OUT (scripts/gpu-pack.sh): a check killed outright
    # (SIGKILL: no EXIT trap packs its folder) still brings back how far it got
    [[ -n "${GPU_PACK_PROGRESS:-}" ]] && printf '%s\n' "${SUMMARY[-1]}" >>"$GPU_PACK_PROGRESS"
    # and the archive of everything so far: a kill loses at most the step under way
    [[ -n "${GPU_PACK_SNAPSHOT:-}" ]] && bash -c "$GPU_PACK_SNAPSHOT" >/dev/null 2>&1
    return 0
}
