"""The command lines Slurm mode launches: one worker rank, and the router. `pdbox slurm up
--worker-cmd/--router-cmd` (or $PDBOX_SLURM_WORKER_CMD / $PDBOX_SLURM_ROUTER_CMD) override them with a
template.

Every worker also gets, in its environment (see `slurm.task` and `slurm.jobs.pool_env`):
PDBOX_ROLE, PDBOX_ROUTER_URL, PDBOX_CLUSTER_TOKEN, PDBOX_RANK, PDBOX_LOCAL_RANK, PDBOX_WORLD_SIZE,
PDBOX_TP, PDBOX_NODE, PDBOX_JOB_ID, PDBOX_RESTART, PDBOX_POOL and Slurm's CUDA_VISIBLE_DEVICES, and its
argv may name them (`$PDBOX_NODE`: `slurm.task.expand_argv` fills them in inside the task). A worker
binds port 0, serves GET /health, registers `slurm.messages.WorkerInfo` with `slurm.register.register`
once it can serve, and on SIGTERM or SIGUSR2 deregisters and exits.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

from appliance.engine_flags import EngineFlags, engine_argv
from slurm.jobs import Role

WORKER_CMD_ENV = "PDBOX_SLURM_WORKER_CMD"
ROUTER_CMD_ENV = "PDBOX_SLURM_ROUTER_CMD"


def worker_argv(
    role: Role,
    model: str,
    router_url: str,
    *,
    cpu: bool = False,
    engine: EngineFlags | None = None,
    gpus: int = 1,
    python: str = sys.executable,
    extra: Sequence[str] = (),
) -> list[str]:
    """argv of one worker rank (`appliance.serve.worker`): one whole engine per Slurm task.

    It serves HTTP on a free port of every interface, advertises itself (HTTP and KV transport) under
    its Slurm node name, moves KV over tcp (across nodes), and registers with `router_url`. `model` ""
    is the embedded default model. On the CPU (`cpu`) nothing is pinned; on GPUs the engine runs TP
    over the `gpus` devices Slurm gives the task. `engine`: the engine flags (`appliance.engine_flags`;
    default: their defaults).
    """
    argv = [python, "-m", "appliance.serve.worker", "--role", role,
            "--name", f"{role}-$PDBOX_JOB_ID.$PDBOX_RANK", "--run-id", "pdbox-$PDBOX_JOB_ID",
            "--host", "0.0.0.0", "--port", "0", "--register", router_url,
            "--transport", "tcp", "--advertise-host", "$PDBOX_NODE", "--transport-host", "0.0.0.0",
            *engine_argv(engine or EngineFlags())]
    if model:
        argv += ["--model", model]
    if cpu:
        argv += ["--device", "cpu"]
    else:
        argv += ["--device", "cuda", "--tp", str(gpus)]
    return [*argv, *extra]


def router_argv(
    host: str,
    port: int,
    port_file: str,
    *,
    model: str = "",
    served_model_name: str = "",
    page_size: int | None = None,
    python: str = sys.executable,
) -> list[str]:
    """argv of the router (`appliance.serve.router_main`): it binds host:port (0: any free port),
    writes the bound port to `port_file` once it serves, takes the cluster token from
    $PDBOX_CLUSTER_TOKEN and routes to the workers that register with it. `page_size`: the workers' KV
    page size (cache-aware routing; None: the router's default)."""
    argv = [python, "-m", "appliance.serve.router_main", "--mode", "disagg", "--host", host, "--port", str(port),
            "--port-file", port_file]
    if model:
        argv += ["--model", model]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if page_size is not None:
        argv += ["--page-size", str(page_size)]
    return argv


def from_template(template: str, **fields: str) -> list[str]:
    """Split a command template and fill its {placeholders}, e.g.
    "{python} my_worker.py --role {role} --router {router}"."""
    try:
        return [part.format(**fields) for part in shlex.split(template)]
    except KeyError as e:
        raise ValueError(f"unknown placeholder {e} in command {template!r}; known: {sorted(fields)}") from e
