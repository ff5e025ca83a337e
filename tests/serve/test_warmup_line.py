"""`pdbox up` prints how long each engine's start-up warm-up took (CUDA graph capture and kernel compiles,
read from the workers' /load), and prints nothing about it when no engine ran one (CPU)."""

from __future__ import annotations

import asyncio

import msgspec
from aiohttp import web

from appliance.launcher import Launcher, UpConfig
from appliance.serve.load_report import LoadReport, warmup_summary


def test_the_line_names_each_engine_that_warmed_up() -> None:
    reports = [LoadReport(name="prefill-0", warmup_s=12.34), LoadReport(name="decode-0", warmup_s=3.0)]
    assert warmup_summary(reports) == "warm-up (CUDA graphs, kernel compiles): prefill-0 12.3 s, decode-0 3.0 s"
    assert warmup_summary([LoadReport(name="unified-0"), LoadReport(name="unified-1")]) == ""


async def _line_from_workers(tmp_path, warmups: dict[str, float]) -> str:
    launcher = Launcher(UpConfig(mode="unified", cpus="0", port=8000, log_dir=str(tmp_path)))
    runners = []
    try:
        for spec, warm in zip(launcher.specs, warmups.values(), strict=True):
            app = web.Application()
            body = msgspec.json.encode(LoadReport(name=spec.name, warmup_s=warm))

            async def load(_request: web.Request, body: bytes = body) -> web.Response:
                return web.Response(body=body, content_type="application/json")

            app.router.add_get("/load", load)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", spec.port).start()
            runners.append(runner)
        return await launcher.warmup_line()
    finally:
        for r in runners:
            await r.cleanup()


def test_the_launcher_reads_it_from_the_workers(tmp_path) -> None:
    assert asyncio.run(_line_from_workers(tmp_path, {"unified-0": 7.25})) == \
        "warm-up (CUDA graphs, kernel compiles): unified-0 7.2 s"
    assert asyncio.run(_line_from_workers(tmp_path, {"unified-0": 0.0})) == ""
