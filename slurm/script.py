"""A plain sbatch script running the whole appliance in ONE allocation, for users who submit with
sbatch themselves: the router in the batch step on the first node, the prefill ranks on the first
`prefill.nodes` nodes and the decode ranks on the next `decode.nodes`, each pool one `srun` step whose
tasks run `python -m slurm.task -- <worker argv>`.

In a worker argv, ROUTER_URL ("${PDBOX_ROUTER_URL}") stands for the router's address, known only once
the router runs; the script leaves it to the shell. The job writes <run_root>/sbatch-<jobid>/ (token,
router.port, router.url, router.log) and logs to <run_root>/sbatch-<jobid>.out.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

from slurm.commands import router_argv
from slurm.jobs import PoolSpec, pool_env

ROUTER_URL = "${PDBOX_ROUTER_URL}"


def _word(arg: str) -> str:
    """Shell-quote `arg`, leaving ROUTER_URL in it to be expanded."""
    return '"${PDBOX_ROUTER_URL}"'.join(shlex.quote(p) if p else "" for p in arg.split(ROUTER_URL)) or "''"


def _cmd(argv: Sequence[str]) -> str:
    return " ".join(_word(a) for a in argv)


def _srun_line(spec: PoolSpec, nodelist_var: str, argv: Sequence[str], python: str) -> str:
    env = {k: v for k, v in pool_env(spec, ROUTER_URL, "").items()
           if k not in ("PDBOX_ROUTER_URL", "PDBOX_CLUSTER_TOKEN")}  # exported by the script itself
    gpus = (f" --gpus-per-task={spec.gpus_per_task}" if spec.gpus_per_task
            else f" --gpus-per-node={spec.gpus_per_node}" if spec.gpus_per_node else "")
    return (
        "env " + " ".join(f"{k}={_word(v)}" for k, v in env.items())
        + f' srun --nodes={spec.nodes} --nodelist="${nodelist_var}" --ntasks={spec.num_tasks}'
        + f" --ntasks-per-node={spec.tasks_per_node}"
        + f" --cpus-per-task={spec.cpus_per_task}{gpus} --kill-on-bad-exit=1"
        + f" {shlex.quote(python)} -m slurm.task -- {_cmd(argv)} &"
    )


def render_sbatch(
    prefill: PoolSpec,
    decode: PoolSpec,
    *,
    prefill_argv: Sequence[str],
    decode_argv: Sequence[str],
    run_root: str,
    router_cmd: Sequence[str] | None = None,
    job_name: str = "pdbox",
    python: str = sys.executable,
) -> str:
    """The sbatch script text. `router_cmd` defaults to `slurm.commands.router_argv` on port 0; a custom
    one must write its bound port to "$RUN_DIR/router.port" once it serves."""
    if prefill.partition != decode.partition:
        raise ValueError("one allocation has one partition: give both pools the same partition")
    if prefill.sbatch or decode.sbatch:
        raise ValueError("PoolSpec.sbatch options do not apply to the single-allocation script")
    router = list(router_cmd) if router_cmd else router_argv("0.0.0.0", 0, "$RUN_DIR/router.port", python=python)
    p, d = prefill.nodes, decode.nodes
    gpus = max(prefill.gpus_per_node, decode.gpus_per_node)
    header = [
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={p + d}",
        f"#SBATCH --ntasks-per-node={max(prefill.tasks_per_node, decode.tasks_per_node)}",
        f"#SBATCH --cpus-per-task={max(prefill.cpus_per_task, decode.cpus_per_task)}",
        f"#SBATCH --time={max(prefill.time_min, decode.time_min)}",
        f"#SBATCH --output={run_root}/sbatch-%j.out",
    ]
    if gpus:
        header.append(f"#SBATCH --gpus-per-node={gpus}")
    if prefill.partition:
        header.append(f"#SBATCH --partition={prefill.partition}")
    router_words = " ".join('"$RUN_DIR/router.port"' if a == "$RUN_DIR/router.port" else shlex.quote(a)
                            for a in router)
    return f"""#!/bin/bash
# pdbox in one Slurm allocation: router + {p} prefill node(s) + {d} decode node(s). Rendered by slurm/script.py.
{chr(10).join(header)}
set -euo pipefail

RUN_DIR={shlex.quote(run_root)}/sbatch-"$SLURM_JOB_ID"
mkdir -p "$RUN_DIR" && chmod 700 "$RUN_DIR"
PDBOX_CLUSTER_TOKEN=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \\n')
export PDBOX_CLUSTER_TOKEN
(umask 077 && echo "$PDBOX_CLUSTER_TOKEN" > "$RUN_DIR/token")

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
PREFILL_NODES=$(IFS=,; echo "${{NODES[*]:0:{p}}}")
DECODE_NODES=$(IFS=,; echo "${{NODES[*]:{p}:{d}}}")

# the router, in this batch step on the first node; it binds a free port and writes it to router.port
rm -f "$RUN_DIR/router.port"
{router_words} > "$RUN_DIR/router.log" 2>&1 &
PIDS=($!)
for _ in $(seq 600); do
  [[ -s $RUN_DIR/router.port ]] && break
  kill -0 "${{PIDS[0]}}" 2>/dev/null || {{ echo "router exited:"; tail -n 30 "$RUN_DIR/router.log"; exit 1; }}
  sleep 0.1
done
if [[ ! -s $RUN_DIR/router.port ]]; then
  echo "router did not start within 60 s"; tail -n 30 "$RUN_DIR/router.log"; exit 1
fi
export PDBOX_ROUTER_URL="http://${{NODES[0]}}:$(<"$RUN_DIR/router.port")"
echo "$PDBOX_ROUTER_URL" > "$RUN_DIR/router.url"
echo "router: $PDBOX_ROUTER_URL (prefill: $PREFILL_NODES, decode: $DECODE_NODES)"

{_srun_line(prefill, "PREFILL_NODES", prefill_argv, python)}
PIDS+=($!)
{_srun_line(decode, "DECODE_NODES", decode_argv, python)}
PIDS+=($!)

# the first of router / prefill / decode to end ends the appliance
stop() {{ kill "${{PIDS[@]}}" 2>/dev/null || true; wait || true; }}
trap 'stop; exit 143' TERM INT
set +e
wait -n "${{PIDS[@]}}"
code=$?
echo "a component exited with code $code; stopping the others"
stop
exit "$code"
"""
