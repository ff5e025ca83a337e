"""The one error shape of the internal API (worker to router): ``{"error": {"message": "..."}}``.

A worker answers every refusal in this shape (its handlers through :func:`error_response`, anything
aiohttp raises through :func:`error_middleware`); the router reads it with :func:`error_message`.
The router's registry (``slurm/registry.py``, which workers call) answers and is read the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

MAX_MESSAGE = 500  # characters of a body that is not this shape (a proxy's page, a dead socket's text)


class ErrorDetail(msgspec.Struct, frozen=True):
    message: str


class ErrorBody(msgspec.Struct, frozen=True):
    error: ErrorDetail


def error_response(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=msgspec.json.encode(ErrorBody(ErrorDetail(message))),
                        content_type="application/json")


@web.middleware
async def error_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """aiohttp's own refusals (``web.HTTPBadRequest(text=...)``, 404, 405, 413) in the one shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, (exc.text or exc.reason).strip())


def error_message(body: bytes | str) -> str:
    """The message of an internal error body; a body of another shape is returned as text, cut short."""
    try:
        return msgspec.json.decode(body, type=ErrorBody).error.message
    except msgspec.MsgspecError:
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        return text.strip()[:MAX_MESSAGE]
