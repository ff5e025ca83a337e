"""The internal API's one error shape: what a worker answers, what the router reads."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from aiohttp import web

from appliance.serve.internal_error import error_message, error_middleware, error_response


async def _answers(path: str) -> tuple[int, bytes]:
    async def refused(request: web.Request) -> web.Response:
        raise web.HTTPConflict(text="this worker's role is prefill")

    async def busy(request: web.Request) -> web.Response:
        return error_response(503, "no free KV pages for this prompt")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/refused", refused)
    app.router.add_post("/busy", busy)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, socket.create_server(("127.0.0.1", 0))).start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{port}{path}") as resp:
            return resp.status, await resp.read()
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("path", "status", "message"), [
    ("/refused", 409, "this worker's role is prefill"),  # raised by a handler
    ("/busy", 503, "no free KV pages for this prompt"),  # answered by a handler
    ("/nowhere", 404, "404: Not Found"),  # aiohttp's own
])
def test_every_refusal_has_the_one_shape(path: str, status: int, message: str) -> None:
    got, body = asyncio.run(_answers(path))
    assert got == status and error_message(body) == message
    assert body.startswith(b'{"error":{"message":')


def test_a_body_of_another_shape_reads_as_its_text() -> None:
    assert error_message(b"  502 Bad Gateway\n") == "502 Bad Gateway"
    assert error_message('{"error": "an older worker"}') == '{"error": "an older worker"}'
    assert len(error_message(b"x" * 2000)) == 500
