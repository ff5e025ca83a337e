"""The Slurm-mode router (registry mounted, `RegistrySync`), the worker argv and `pdbox slurm` usage
checks: no Slurm and no model needed."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from aiohttp import web
from click.testing import CliRunner

from appliance.engine_flags import EngineFlags
from appliance.serve.registration import worker_info
from appliance.serve.router import Router
from appliance.serve.router_config import RouterConfig
from appliance.serve.router_main import build_app
from slurm.cli import slurm
from slurm.commands import router_argv, worker_argv
from slurm.messages import Deregister, WorkerInfo
from slurm.registry import TOKEN_ENV, Registry
from slurm.task import expand_argv
from tests.waiting import wait_until_async

TOKEN = "test-token"


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def _fake_worker(role: str) -> tuple[web.AppRunner, str]:
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def load(request: web.Request) -> web.Response:
        return web.json_response({"pid": 1, "tp": 1, "transport": "tcp", "handle": "", "max_model_len": 64})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/load", load)
    return await _serve(app)


def _info(role: str, url: str, rank: int = 0, tp: int = 1) -> WorkerInfo:
    return WorkerInfo(role=role, url=url, rank=rank, tp=tp, job_id="7", node="n1", pid=1)  # type: ignore[arg-type]




def test_router_follows_the_registry() -> None:
    async def main() -> None:
        router = Router(RouterConfig(cluster_token=TOKEN), tokenizer=None, vocab_size=0)
        registry = Registry(health_interval_s=0.2, drop_after_s=0.6)
        runner, _ = await _serve(build_app(router, TOKEN, registry))
        prefill, prefill_url = await _fake_worker("prefill")
        decode, decode_url = await _fake_worker("decode")
        decode2, decode2_url = await _fake_worker("decode")
        try:
            registry.register(_info("prefill", prefill_url))
            registry.register(_info("prefill", prefill_url + "/rank1", rank=1, tp=2))  # not an engine head
            registry.register(_info("decode", decode_url))
            await wait_until_async(lambda: len(router.pool.workers) == 2, 5.0,
                                   what="the router to route to both engine heads")
            assert sorted(router.pool.workers) == ["decode-7.0", "prefill-7.0"]
            await wait_until_async(lambda: router.pool.workers["decode-7.0"].load.max_model_len == 64, 5.0,
                                   what="the new worker's /load")  # refreshed at once
            assert all(w.healthy for w in router.pool.workers.values())

            registry.deregister(Deregister(url=decode_url))  # preemption: no new requests at once
            assert sorted(router.pool.workers) == ["prefill-7.0"]

            registry.register(_info("decode", decode2_url))  # the requeued rank, at a new url
            await wait_until_async(lambda: "decode-7.0" in router.pool.workers, 5.0, what="the requeued decode rank")
            w = router.pool.workers["decode-7.0"]
            assert (w.url, w.restarts) == (decode2_url, 1)

            await decode2.cleanup()  # a rank that dies without deregistering leaves on its first failed check
            await wait_until_async(lambda: "decode-7.0" not in router.pool.workers, 2.0,
                                   what="the router to drop the dead rank")
        finally:
            for r in (runner, prefill, decode, decode2):
                await r.cleanup()

    asyncio.run(main())


def test_worker_info_comes_from_the_task_environment() -> None:
    env = {"PDBOX_RANK": "1", "PDBOX_TP": "1", "PDBOX_JOB_ID": "42", "PDBOX_NODE": "n2", "PDBOX_RESTART": "2",
           "CUDA_VISIBLE_DEVICES": "3"}
    info = worker_info("decode", "http://n2:5", env)
    assert (info.key, info.node, info.restart, info.devices, info.tp) == ("decode/42/1", "n2", 2, "3", 1)


def test_worker_argv_serves_the_node_it_lands_on() -> None:
    argv = worker_argv("prefill", "", "http://vm:9", cpu=True, engine=EngineFlags(dtype="float32"), python="py")
    env = {"PDBOX_NODE": "n1", "PDBOX_JOB_ID": "5", "PDBOX_RANK": "0"}
    args = expand_argv(argv, env)
    text = " ".join(args)
    assert args[:3] == ["py", "-m", "appliance.serve.worker"] and "--model" not in args and "--cpus" not in args
    for part in ("--register http://vm:9", "--transport tcp", "--advertise-host n1", "--transport-host 0.0.0.0",
                 "--port 0", "--name prefill-5.0", "--device cpu", "--dtype float32"):
        assert part in text, part
    gpu = " ".join(worker_argv("prefill", "/m.gguf", "http://vm:9", gpus=4))
    assert "--device cuda --tp 4" in gpu and "--model /m.gguf" in gpu
    assert router_argv("0.0.0.0", 0, "/r/port", model="/m.gguf", python="py")[:3] == [
        "py", "-m", "appliance.serve.router_main"]


def test_expand_argv_only_touches_task_variables() -> None:
    env = {"PDBOX_NODE": "n1", "SLURM_PROCID": "3", "HOME": "/root"}
    assert expand_argv(["$PDBOX_NODE:${SLURM_PROCID}", "$HOME", "$PDBOX_UNSET", "${PDBOX_NODE"], env) == [
        "n1:3", "$HOME", "$PDBOX_UNSET", "${PDBOX_NODE"]


@pytest.mark.parametrize("args, message", [
    (["--cpu", "--gpus-per-node", "2"], "exclude each other"),
    ([], "--gpus-per-node N"),
    (["--cpu", "--tp", "2"], "--tp > 1"),
    (["--gpus-per-node", "2", "--tasks-per-node", "1"], "a decode engine runs on one GPU"),
])
def test_up_refuses_device_options_the_worker_cannot_run(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(slurm, ["up", "--run-root", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not list(tmp_path.iterdir()), "nothing may start before the options are checked"


def test_script_runs_the_real_worker_and_router(tmp_path: Path) -> None:
    result = CliRunner().invoke(slurm, ["script", "--cpu", "--run-root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert f"{sys.executable} -m appliance.serve.router_main --mode disagg" in text
    assert text.count("-m slurm.task -- ") == 2 and text.count("-m appliance.serve.worker --role") == 2
    assert "--register \"${PDBOX_ROUTER_URL}\"" in text and "--advertise-host '$PDBOX_NODE'" in text


def test_the_router_command_line_comes_from_router_config(monkeypatch) -> None:
    from appliance.config import EngineConfig
    from appliance.serve import router_main

    seen: dict = {}

    async def serve(router, token, host, port, port_file) -> None:
        seen.update(router=router, token=token, bound=(host, port, port_file))

    monkeypatch.setattr(router_main, "make_router", lambda token, **kw: kw)
    monkeypatch.setattr(router_main, "serve", serve)
    run = CliRunner().invoke
    assert run(router_main.main, [], env={TOKEN_ENV: None}).exit_code == 2  # no cluster token
    assert run(router_main.main, [], env={TOKEN_ENV: TOKEN}).exit_code == 0
    kw, cfg = seen["router"], RouterConfig()
    assert seen["bound"] == ("0.0.0.0", 0, None) and kw["page_size"] == EngineConfig.page_size
    for name in ("mode", "prefill_policy", "decode_policy", "unified_policy", "lease_s", "max_inflight"):
        assert kw[name] == getattr(cfg, name), name
    args = ["--page-size", "32", "--decode-policy", "round_robin", "--lease-s", "2.5", "--port-file", "/r/port"]
    assert run(router_main.main, args, env={TOKEN_ENV: TOKEN}).exit_code == 0
    assert (seen["router"]["page_size"], seen["router"]["decode_policy"], seen["router"]["lease_s"]) == (
        32, "round_robin", 2.5)
    assert seen["bound"] == ("0.0.0.0", 0, Path("/r/port"))
    assert run(router_main.main, ["--decode-policy", "cache_aware"], env={TOKEN_ENV: TOKEN}).exit_code == 2
