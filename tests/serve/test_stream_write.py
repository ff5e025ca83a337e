"""A streaming peer that keeps its socket open but stops reading is dropped after the stall deadline.

Real sockets: an aiohttp server streams 64 KiB chunks through `write_within` to a raw client with a
small receive buffer that never reads. The kernel buffers fill, the write's drain waits, and the
deadline must turn that wait into `PeerStalled` (a ConnectionResetError, so callers abort the request).
"""

from __future__ import annotations

import asyncio
import socket
import time

from aiohttp import web

from appliance.serve.stream_write import PeerStalled, write_within

STALL_S = 0.5
CHUNK = b"x" * 65536


async def _serve(handler) -> tuple[web.AppRunner, int]:
    """``handler`` on GET /stream of a real server on a free port."""
    app = web.Application()
    app.router.add_get("/stream", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, socket.create_server(("127.0.0.1", 0))).start()
    return runner, runner.addresses[0][1]


async def _serve_and_stall() -> tuple[BaseException | None, int, float]:
    box: dict = {"sent": 0}
    done = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            while True:
                t = time.monotonic()
                await write_within(resp, CHUNK, STALL_S)
                box["sent"] += len(CHUNK)
                box["last_write_s"] = time.monotonic() - t
        except BaseException as exc:  # recorded for the test
            box["error"] = exc
            box["stalled_at"] = time.monotonic()
            done.set()
            raise

    runner, port = await _serve(handler)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port))
    client.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read a byte
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(done.wait(), 30)
    finally:
        client.close()
        await runner.cleanup()
    return box.get("error"), box["sent"], box["stalled_at"] - t0


def test_a_peer_that_stops_reading_is_dropped_after_the_deadline() -> None:
    error, sent, after_s = asyncio.run(_serve_and_stall())
    assert isinstance(error, PeerStalled), repr(error)
    assert isinstance(error, ConnectionResetError)  # the callers' client-gone path handles it
    assert f"{STALL_S:g} s" in str(error)
    assert sent > 0  # it did stream until the buffers filled
    assert after_s < 20, f"dropped only after {after_s:.1f} s"


def test_a_reading_peer_is_never_dropped() -> None:
    async def run() -> int:
        async def handler(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse()
            await resp.prepare(request)
            for _ in range(64):
                await write_within(resp, CHUNK, STALL_S)
            await resp.write_eof()
            return resp

        runner, port = await _serve(handler)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        await runner.cleanup()
        return len(body)

    assert asyncio.run(run()) > 64 * len(CHUNK)  # headers + chunked framing + every chunk
