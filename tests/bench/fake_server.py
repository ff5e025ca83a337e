"""A tiny OpenAI-compatible streaming server for the bench tests (and a stand-in for `pdbox up`).

Its "tokens" are words: it streams `max_completion_tokens`/`max_tokens` chunks after a fixed delay, then
a `usage` chunk and `[DONE]`, as vLLM does. Chat streams open with a role-only chunk sent before the
"prefill" delay, which the client must not count as the first token. Run as a script it prints
`ready: http://HOST:PORT` and stops on SIGTERM, like `pdbox up`.
"""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import click
from aiohttp import web

MODEL_ID = "fake-model"
BODIES = web.AppKey("bodies", list)


def make_app(
    prefill_s: float = 0.004, token_s: float = 0.001, usage: bool = True, fail_marker: str = "FAIL-ME",
    adaptive: bool = False,
) -> web.Application:
    """The server. Every request body is appended to `app[BODIES]`; prompts containing
    `fail_marker` get HTTP 500; `usage=False` leaves out the final usage chunk. `adaptive` also
    serves `/workers` and `/metrics` as `pdbox up --mode auto` does: prompts of over 50 words count
    as handed over, the rest as local, every 4th request switches a role, every 2nd moves a decode and
    every 4th fails to."""
    app = web.Application()
    app[BODIES] = []
    placed: dict[str, int] = {}

    async def workers(request: web.Request) -> web.Response:
        n = len(request.app[BODIES])
        return web.json_response({"mode": "auto", "role_switches": n // 4, "last_decision": "local: idle",
                                  "decodes_moved": n // 2, "decode_moves_failed": n // 4,
                                  "workers": [{"name": "e0", "leaning": "prefill" if n // 4 % 2 == 0 else "decode"},
                                              {"name": "e1", "leaning": "decode"}]})

    async def metrics(request: web.Request) -> web.Response:
        lines = [f'pdbox_auto_decisions_total{{decision="{k.split(":")[0]}",reason="{k.split(":")[1]}",'
                 f'role="router",worker="router"}} {v}' for k, v in placed.items()]
        return web.Response(text="\n".join(lines) + "\n")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = await request.json()
        request.app[BODIES].append(body)
        chat = request.path.endswith("/chat/completions")
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        if fail_marker in prompt:
            return web.json_response({"error": {"message": "asked to fail"}}, status=500)
        n = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        key = "disagg:stall" if len(prompt.split()) > 50 else "local:idle"
        placed[key] = placed.get(key, 0) + 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(event: dict[str, Any]) -> None:
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())

        def choice(text: str, finish: str | None = None) -> dict[str, Any]:
            if chat:
                return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish}

        if chat:
            await send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        await resp.write(b": keep-alive comment\n\n")
        await asyncio.sleep(prefill_s)
        for i in range(n):
            await send({"choices": [choice(f" w{i}")]})
            await asyncio.sleep(token_s)
        await send({"choices": [choice("", "length")]})
        if usage:
            counts = {"prompt_tokens": len(prompt.split()), "completion_tokens": n}
            await send({"choices": [], "usage": {**counts, "total_tokens": counts["prompt_tokens"] + n}})
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_post("/v1/completions", completions)
    if adaptive:
        app.router.add_get("/workers", workers)
        app.router.add_get("/metrics", metrics)
    return app


async def _serve(host: str, port: int, mode: str) -> None:
    runner = web.AppRunner(make_app(token_s=0.001 if mode == "disagg" else 0.002, adaptive=mode == "auto"))
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"fake server mode={mode}", flush=True)
    print(f"ready: http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()
    print("stopped", flush=True)


@click.command()
@click.option("--host", default="127.0.0.1")
@click.option("--port", type=int, default=0)
@click.option("--mode", default="unified")
def main(host: str, port: int, mode: str) -> None:
    asyncio.run(_serve(host, port, mode))


if __name__ == "__main__":
    main()
