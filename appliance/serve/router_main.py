"""The router as a process of its own, for Slurm mode: workers are not started here, they register.

    PDBOX_CLUSTER_TOKEN=... python -m appliance.serve.router_main --mode disagg [--model PATH]
        [--host 0.0.0.0] [--port 0] [--port-file F] [--served-model-name N]

It serves the OpenAI API of `appliance.serve.router.Router` (started with no workers) and, on the same
port, the worker registry of `slurm.registry` at /internal (register, deregister, workers, events;
cluster token required). `RegistrySync` keeps the router's `WorkerPool` equal to the registry's healthy
engine heads, so a worker that deregisters (preemption, requeue, `pdbox slurm down`) or fails its
health checks gets no new requests at once; its in-flight requests fail with a clean error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import time
from pathlib import Path

from aiohttp import web

from appliance.serve.policies import WorkerHandle
from appliance.serve.router import Router
from appliance.serve.router_config import RouterConfig
from appliance.serve.worker_pool import WorkerPool
from slurm.messages import WorkerInfo
from slurm.registry import TOKEN_ENV, Registry, make_registry_app

log = logging.getLogger("pdbox.router")


def engine_head(info: WorkerInfo) -> bool:
    """One registration per engine reaches the router: the first of its `tp` Slurm ranks."""
    return info.rank % max(1, info.tp) == 0


def handle_name(info: WorkerInfo) -> str:
    """A name that survives a requeue (same job, same rank), e.g. "decode-42.0"."""
    return f"{info.role}-{info.job_id}.{info.rank}" if info.job_id else f"{info.role}@{info.url}"


class RegistrySync:
    """Mirrors the registry's healthy engine heads into the router's `WorkerPool` (one `WorkerHandle` each).

    A rank that comes back under the same (role, job, rank) at a new url, after a requeue, gets a new
    handle with `restarts` one higher; requests still holding the old handle finish or fail on it.
    """

    def __init__(self, pool: WorkerPool, registry: Registry) -> None:
        self.pool = pool
        self.registry = registry
        self._live: dict[str, tuple[WorkerInfo, WorkerHandle]] = {}
        self._urls: dict[str, str] = {}  # last url seen per registry key
        self._restarts: dict[str, int] = {}
        self._refreshes: set[asyncio.Task[None]] = set()
        registry.on_change(self.sync)

    def sync(self) -> None:
        want = {i.key: i for i in self.registry.workers() if engine_head(i)}
        for key, (info, handle) in list(self._live.items()):
            if key not in want or want[key].url != info.url:
                del self._live[key]
                self.pool.remove(handle.name)
                log.info("stopped routing to %s at %s", handle.name, info.url)
        for key, info in want.items():
            if key in self._live:
                continue
            if self._urls.get(key, info.url) != info.url:
                self._restarts[key] = self._restarts.get(key, 0) + 1
            self._urls[key] = info.url
            gpus = f"gpu:{info.devices}" if info.devices else "cpu"
            handle = WorkerHandle(name=handle_name(info), role=info.role, url=info.url.rstrip("/"), pid=info.pid,
                                  devices=f"{info.node}/{gpus}", healthy=True, last_seen=time.monotonic(),
                                  restarts=self._restarts.get(key, 0))
            self._live[key] = (info, handle)
            self.pool.add(handle)
            log.info("routing to %s at %s (node %s, restart %d)", handle.name, info.url, info.node, info.restart)
            self._refresh(handle)

    def _refresh(self, handle: WorkerHandle) -> None:
        """Read the new worker's /load now (TP size, transport), not a health interval later."""
        if self.pool.session is None:
            return
        task = asyncio.get_running_loop().create_task(self.pool.refresh(handle))
        self._refreshes.add(task)
        task.add_done_callback(self._refreshes.discard)


def build_app(router: Router, token: str, registry: Registry | None = None) -> web.Application:
    """The router's app with the registry mounted at /internal and kept in sync with the router."""
    registry = registry if registry is not None else Registry()
    app = router.app()
    app.add_subapp("/internal", make_registry_app(token, registry))
    RegistrySync(router.pool, registry)
    return app


def make_router(args: argparse.Namespace, token: str) -> Router:
    from appliance.model.loader import load_generation_defaults, load_tokenizer

    tok, vocab, name = load_tokenizer(args.model)
    cfg = RouterConfig(mode=args.mode, served_model_name=args.served_model_name or name, host=args.host,
                       port=args.port, cluster_token=token, prefill_policy=args.prefill_policy,
                       decode_policy=args.decode_policy, unified_policy=args.unified_policy,
                       page_size=args.page_size, lease_s=args.lease_s, max_inflight=args.max_inflight,
                       generation=load_generation_defaults(args.model))
    return Router(cfg, tok, vocab)


async def serve(router: Router, token: str, host: str, port: int, port_file: Path | None) -> None:
    runner = web.AppRunner(build_app(router, token), handler_cancellation=True, access_log=None,
                           shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    if port_file is not None:  # written last and atomically: its presence means "serving"
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(f"{bound}\n")
        tmp.replace(port_file)
    print(f"router ready: http://{host}:{bound} mode={router.cfg.mode} model={router.cfg.served_model_name}",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m appliance.serve.router_main", description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="disagg", choices=("disagg", "unified"))
    p.add_argument("--model", default=None, help="GGUF file or Hugging Face folder (default: the embedded model)")
    p.add_argument("--served-model-name", default="", help="model id clients send (default: the model's name)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=0, help="0: any free port (see --port-file)")
    p.add_argument("--port-file", type=Path, default=None, help="write the bound port here once serving")
    p.add_argument("--prefill-policy", default="cache_aware",
                   choices=("cache_aware", "least_load", "power_of_two", "round_robin"))
    p.add_argument("--decode-policy", default="least_load", choices=("least_load", "power_of_two", "round_robin"))
    p.add_argument("--unified-policy", default="cache_aware",
                   choices=("cache_aware", "least_load", "power_of_two", "round_robin"))
    p.add_argument("--page-size", type=int, default=16, help="the workers' KV page size (for cache-aware routing)")
    p.add_argument("--lease-s", type=float, default=5.0, help="base lease of reserved decode pages")
    p.add_argument("--max-inflight", type=int, default=256, help="requests in flight before 429")
    args = p.parse_args(argv)
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        p.error(f"${TOKEN_ENV} is not set: the workers register with this cluster token")
    if not 0 <= args.port < 65536:
        p.error(f"--port must be in 0..65535, got {args.port}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        router = make_router(args, token)
    except (ValueError, OSError) as exc:
        p.exit(2, f"router: {exc}\n")
    asyncio.run(serve(router, token, args.host, args.port, args.port_file))


if __name__ == "__main__":
    main()
