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

import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click
from aiohttp import web

from appliance.config import EngineConfig
from appliance.engine_flags import config_options
from appliance.serve.policies import WorkerHandle
from appliance.serve.router import Router
from appliance.serve.router_config import PREFILL_POLICIES, RouterConfig
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


def make_router(token: str, *, model: str | None, served_model_name: str, **settings: Any) -> Router:
    """The router for ``model``'s tokenizer; ``settings``: its `RouterConfig` fields from the command line."""
    from appliance.model.loader import load_generation_defaults, load_tokenizer

    tok, vocab, name = load_tokenizer(model)
    cfg = RouterConfig(served_model_name=served_model_name or name, cluster_token=token,
                       generation=load_generation_defaults(model), **settings)
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


# Slurm mode binds every interface, on any free port (written to --port-file), unlike `pdbox up`'s router
SLURM_DEFAULTS = {"host": "0.0.0.0", "port": 0}


@click.command(help=__doc__.splitlines()[0], context_settings={"default_map": SLURM_DEFAULTS})
@click.option("--mode", default=RouterConfig.mode, show_default=True, type=click.Choice(["disagg", "unified"]))
@click.option("--model", default=None, help="GGUF file or Hugging Face folder (default: the embedded model).")
@config_options(RouterConfig, ("served_model_name", "host", "port"))
@click.option("--port-file", type=click.Path(path_type=Path), default=None,
              help="Write the bound port here once serving (--port 0: any free port).")
@config_options(RouterConfig, ("prefill_policy", "decode_policy"))
@click.option("--unified-policy", default=RouterConfig.unified_policy, show_default=True,
              type=click.Choice(PREFILL_POLICIES), help="How the router picks a unified engine.")
@config_options(EngineConfig, ("page_size",))
@config_options(RouterConfig, ("lease_s", "max_inflight"))
def main(port_file: Path | None, **kw: Any) -> None:
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise click.UsageError(f"${TOKEN_ENV} is not set: the workers register with this cluster token")
    if not 0 <= kw["port"] < 65536:
        raise click.BadParameter(f"must be in 0..65535, got {kw['port']}", param_hint="--port")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        router = make_router(token, **kw)
    except (ValueError, OSError) as exc:
        click.echo(f"router: {exc}", err=True)
        sys.exit(2)
    asyncio.run(serve(router, token, kw["host"], kw["port"], port_file))


if __name__ == "__main__":
    main(prog_name="python -m appliance.serve.router_main")
