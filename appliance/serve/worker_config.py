"""A worker's configuration (`WorkerConfig`) and the command line the launcher writes for it.

`python -m appliance.serve.worker ARGS` reads ARGS with :func:`worker_config`; the cluster token comes
from ``$PDBOX_CLUSTER_TOKEN``, never from the command line.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from appliance.config import DEFAULT_KV_CACHE_MB, EngineConfig

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

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.role in ("decode", "auto") and self.engine.tp_size > 1:
            raise ValueError("a decode worker runs with tp 1 (prefill may use any TP size)")


def parse_cpus(text: str) -> tuple[int, ...]:
    from appliance.topology import parse_ids

    return tuple(parse_ids(text)) if text else ()


def worker_config(argv: list[str] | None = None) -> tuple[WorkerConfig, str]:
    """The worker's config from its command line (as the launcher writes it), and the router URL to
    register with (Slurm mode; '' otherwise)."""
    p = argparse.ArgumentParser(prog="pdbox-worker", description=DESCRIPTION)
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--name", default="")
    p.add_argument("--model", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--cpus", default="", help="core set to pin to, e.g. 0 or 0-3")
    p.add_argument("--devices", default="", help="GPU ids (CUDA_VISIBLE_DEVICES is set by the launcher)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--kv-cache-mb", type=int, default=DEFAULT_KV_CACHE_MB)
    p.add_argument("--max-prefill-tokens", type=int, default=0, help="chunked-prefill budget (0: by device)")
    p.add_argument("--max-running", type=int, default=64)
    p.add_argument("--prefill-order", default="auto", choices=["auto", "fifo", "slack"],
                   help="prefill queue order (auto: slack on prefill and auto workers, fifo elsewhere)")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--no-cuda-graphs", action="store_true", help="GPU: decode eagerly, without CUDA graphs")
    p.add_argument("--transport", default="shm")
    p.add_argument("--run-id", default="pdbox")
    p.add_argument("--register", default="", help="router URL to register with (Slurm mode)")
    p.add_argument("--advertise-host", default="", help="host name peers use to reach this worker (multi-node)")
    p.add_argument("--transport-host", default="127.0.0.1", help="bind address of the KV transport listener")
    args = p.parse_args(argv)
    cpus = parse_cpus(args.cpus)
    threads = len(cpus) // max(1, args.tp) if cpus else 0
    engine = EngineConfig(dtype=args.dtype, device=args.device, page_size=args.page_size,
                          kv_cache_mb=args.kv_cache_mb, max_prefill_tokens=args.max_prefill_tokens,
                          max_running=args.max_running, attention_backend=args.attention_backend,
                          tp_size=args.tp, threads=max(1, threads) if cpus else 0,
                          cuda_graphs=not args.no_cuda_graphs,
                          prefill_order=("slack" if args.role in ("prefill", "auto") else "fifo")
                          if args.prefill_order == "auto" else args.prefill_order)
    cfg = WorkerConfig(role=args.role, name=args.name or f"{args.role}-{os.getpid()}", model=args.model,
                       host=args.host, port=args.port, engine=engine, transport=args.transport, run_id=args.run_id,
                       cpus=cpus, devices=args.devices, token=os.environ.get(TOKEN_ENV, ""),
                       advertise_host=args.advertise_host, transport_host=args.transport_host)
    return cfg, args.register
