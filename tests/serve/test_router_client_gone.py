"""The router closes a request's token stream on every way a streaming client can vanish.

Regression: a client killed while the router waited for the socket to drain surfaced as
BrokenPipeError (not ConnectionResetError); the router's handler ended but left the request's
generator suspended, so decode kept generating for a client that was gone until the answer's end.
Here a real aiohttp server runs `ResponseWriter.stream` over an endless token source; clients vanish in
three ways; each time the source's ``finally`` (where the real router aborts the engines) must
run within seconds, and the router must count the request as ``client_gone``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from appliance.model.loader import load_tokenizer
from appliance.serve import openai_api as oai
from appliance.serve.protocol import Sampling, Tokens
from appliance.serve.relay import Relayed
from appliance.serve.router import Router
from appliance.serve.router_config import RouterConfig


async def _vanish_and_time(how: str, tok, vocab: int, prompts: int) -> tuple[float, str]:
    router = Router(RouterConfig(client_stall_s=2.0), tok, vocab)
    closed = [asyncio.Event() for _ in range(prompts)]
    word = tok.encode(" hello")[-1]

    async def endless(k: int) -> AsyncIterator[Relayed]:
        try:
            while True:
                yield Tokens(token_ids=[word] * 64, logprobs=[])
                await asyncio.sleep(0)
        finally:
            closed[k].set()

    async def handler(request: web.Request) -> web.StreamResponse:
        parsed = oai.ParsedRequest(endpoint="completions", model="m", prompt_ids=[1, 2, 3],
                                   sampling=Sampling(max_tokens=100000), stream=True, include_usage=False,
                                   want_logprobs=False)
        return await router.answers.stream(request, [(parsed, endless(k)) for k in range(prompts)], "cmpl-test")

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, socket.create_server(("127.0.0.1", 0))).start()
    port = runner.addresses[0][1]
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port))
    client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    await asyncio.get_running_loop().run_in_executor(None, client.recv, 1024)  # headers and a first chunk
    await asyncio.sleep(0.5)  # let the server fill the buffers and block on drain
    t0 = time.monotonic()
    if how == "killed":  # close with unread data: the kernel answers the next segment with RST
        client.close()
    elif how == "reset":  # SO_LINGER 0: an immediate RST
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()
    try:
        await asyncio.wait_for(asyncio.gather(*(c.wait() for c in closed)), 15)
        took = time.monotonic() - t0
    finally:
        if how == "stalled":
            client.close()
        await runner.cleanup()
    return took, router.metrics.reg.render()


@pytest.mark.parametrize("prompts", [1, 2])  # 2: a /v1/completions batch, each prompt's request closed
@pytest.mark.parametrize("how", ["killed", "reset", "stalled"])
def test_a_vanished_streaming_client_closes_its_request(how: str, prompts: int, smollm_path) -> None:
    tok, vocab, _ = load_tokenizer(smollm_path)
    took, metrics = asyncio.run(_vanish_and_time(how, tok, vocab, prompts))
    limit = 2.0 + 3.0 if how == "stalled" else 3.0  # a stalled client is dropped after client_stall_s
    assert took < limit, f"{how}: the request was closed only after {took:.1f} s"
    assert 'outcome="client_gone"' in metrics, metrics
