"""The command lines Slurm mode launches: one worker rank, and the router. These are the hooks the
appliance fills in; `pdbox slurm up --worker-cmd/--router-cmd` (or $PDBOX_SLURM_WORKER_CMD /
$PDBOX_SLURM_ROUTER_CMD) override them with a template.

Every worker also gets, in its environment (see `slurm.task` and `slurm.jobs.pool_env`):
PDBOX_ROLE, PDBOX_ROUTER_URL, PDBOX_CLUSTER_TOKEN, PDBOX_RANK, PDBOX_LOCAL_RANK, PDBOX_WORLD_SIZE,
PDBOX_TP, PDBOX_NODE, PDBOX_JOB_ID, PDBOX_RESTART, PDBOX_POOL and Slurm's CUDA_VISIBLE_DEVICES. A worker
binds port 0, serves GET /health, registers `slurm.messages.WorkerInfo` with `slurm.register.register`
once it can serve, and on SIGTERM or SIGUSR2 deregisters and exits.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

from slurm.jobs import Role

WORKER_CMD_ENV = "PDBOX_SLURM_WORKER_CMD"
ROUTER_CMD_ENV = "PDBOX_SLURM_ROUTER_CMD"


def worker_argv(
    role: Role, model: str, router_url: str, *, python: str = sys.executable, extra: Sequence[str] = ()
) -> list[str]:
    """argv of one worker rank of `role` serving `model`.

    TODO(appliance): point this at the real worker entry point once it exists; the placeholder below
    names the module the appliance's serve package is expected to provide.
    """
    return [python, "-m", "appliance.serve.worker", "--role", role, "--model", model,
            "--router", router_url, *extra]


def router_argv(host: str, port: int, port_file: str, *, python: str = sys.executable) -> list[str]:
    """argv of the router: it binds host:port (0: any free port), writes the bound port to `port_file`
    once it serves, and takes the cluster token from $PDBOX_CLUSTER_TOKEN.

    Until the appliance's router mounts `slurm.registry.make_registry_app`, this is the registry alone.
    """
    return [python, "-m", "slurm.registry", "--host", host, "--port", str(port), "--port-file", port_file]


def from_template(template: str, **fields: str) -> list[str]:
    """Split a command template and fill its {placeholders}, e.g.
    "{python} my_worker.py --role {role} --router {router}"."""
    try:
        return [part.format(**fields) for part in shlex.split(template)]
    except KeyError as e:
        raise ValueError(f"unknown placeholder {e} in command {template!r}; known: {sorted(fields)}") from e
