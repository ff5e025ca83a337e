"""A worker's configuration (`WorkerConfig`) and the command line the launcher writes for it.

`python -m appliance.serve.worker ARGS` reads ARGS with :func:`worker_config`; the cluster token comes
from ``$PDBOX_CLUSTER_TOKEN``, never from the command line.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import click

from appliance.config import EngineConfig
from appliance.engine.core_share import CoreShare
from appliance.engine_flags import EngineFlags, engine_config, engine_options

DESCRIPTION = "A worker process: one engine (with its TP ranks) behind an HTTP server, in one role."
ROLES = ("unified", "prefill", "decode", "auto")  # auto: prefill, decode and hand over (adaptive mode)
TOKEN_ENV = "PDBOX_CLUSTER_TOKEN"


@dataclass(frozen=True)
class WorkerConfig:
    role: str
    name: str
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    engine: EngineConfig = field(default_factory=EngineConfig)
    transport: str = "shm"
    run_id: str = "pdbox"
    cpus: tuple[int, ...] = ()
    devices: str = ""
    token: str = ""
    advertise_host: str = ""
    transport_host: str = "127.0.0.1"
    router_stall_s: float = 120.0  # a router that reads none of a stream for this long is gone
    cores: CoreShare | None = None  # a CPU engine's partner, whose cores it borrows while the partner idles

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.role in ("decode", "auto") and self.engine.tp_size > 1:
            raise ValueError("a decode worker runs with tp 1 (prefill may use any TP size)")
        if self.cores is not None and (self.engine.tp_size > 1 or not self.engine.device.startswith("cpu")
                                       or tuple(self.cpus) != self.cores.home):
            raise ValueError("core sharing is for a TP-1 CPU engine pinned with --cpus to its home cores")


def parse_cpus(text: str) -> tuple[int, ...]:
    from appliance.topology import parse_ids

    return tuple(parse_ids(text)) if text else ()


@click.command("pdbox-worker", help=DESCRIPTION, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--role", required=True, type=click.Choice(ROLES))
@click.option("--name", default="", help="[default: ROLE-PID]")
@click.option("--model", default=None, help="GGUF file or Hugging Face folder (default: the embedded model)")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=0, show_default=True)
@click.option("--tp", type=int, default=1, show_default=True, help="tensor-parallel ranks of the engine")
@click.option("--cpus", default="", help="core set to pin to, e.g. 0 or 0-3")
@click.option("--devices", default="", help="GPU ids (CUDA_VISIBLE_DEVICES is set by the launcher)")
@click.option("--device", default="cpu", show_default=True)
@engine_options()
@click.option("--transport", default="shm", show_default=True)
@click.option("--run-id", default="pdbox", show_default=True)
@click.option("--register", default="", help="router URL to register with (Slurm mode)")
@click.option("--advertise-host", default="", help="host name peers use to reach this worker (multi-node)")
@click.option("--transport-host", default="127.0.0.1", show_default=True,
              help="bind address of the KV transport listener")
@click.option("--core-board", default="", help="core sharing: the board file (pdbox up writes it in the run folder)")
@click.option("--core-slot", type=int, default=-1, help="core sharing: this engine's byte on the board")
@click.option("--partner-slot", type=int, default=-1, help="core sharing: the partner engine's byte")
@click.option("--partner-cpus", default="", help="core sharing: the partner's cores, borrowed while it idles")
def worker_command(engine: EngineFlags, role: str, name: str, model: str | None, host: str, port: int, tp: int,
                   cpus: str, devices: str, device: str, transport: str, run_id: str, register: str,
                   advertise_host: str, transport_host: str, core_board: str, core_slot: int, partner_slot: int,
                   partner_cpus: str) -> tuple[WorkerConfig, str]:
    pinned = parse_cpus(cpus)
    cores = None
    if core_board or partner_cpus:
        cores = CoreShare(board=core_board, slot=core_slot, partner=partner_slot, home=pinned,
                          lent=parse_cpus(partner_cpus))
    threads = max(1, len(pinned) // max(1, tp)) if pinned else 0
    cfg = WorkerConfig(role=role, name=name or f"{role}-{os.getpid()}", model=model, host=host, port=port,
                       engine=engine_config(engine, role, device=device, tp_size=tp, threads=threads),
                       transport=transport, run_id=run_id, cpus=pinned, devices=devices,
                       token=os.environ.get(TOKEN_ENV, ""), advertise_host=advertise_host,
                       transport_host=transport_host, cores=cores)
    return cfg, register


def worker_config(argv: list[str] | None = None) -> tuple[WorkerConfig, str]:
    """The worker's config from its command line (as the launcher writes it), and the router URL to
    register with (Slurm mode; '' otherwise). ``--help`` and usage errors exit, as a command line does."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        with worker_command.make_context("pdbox-worker", args) as ctx:
            return worker_command.invoke(ctx)
    except click.exceptions.Exit as e:
        raise SystemExit(e.exit_code) from None
    except click.ClickException as e:
        e.show()
        raise SystemExit(e.exit_code) from None
