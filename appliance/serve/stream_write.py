"""Writing a streamed HTTP response with a deadline.

``resp.write`` waits for the socket to drain. A peer that keeps its connection open but stops
reading (a stalled client, a wedged router) would hold that wait, and with it the request's KV
pages, forever. `write_within` bounds it: a peer that accepts no bytes for ``stall_s`` is treated
as gone, exactly like one that reset the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from aiohttp import web


class PeerStalled(ConnectionResetError):
    """The peer accepted no bytes within the deadline; handled like a reset connection."""


async def write_within(resp: web.StreamResponse, data: bytes, stall_s: float) -> None:
    """Write ``data``; raise `PeerStalled` when the peer takes none of it within ``stall_s``."""
    await _bounded(resp.write(data), stall_s)


async def eof_within(resp: web.StreamResponse, stall_s: float) -> None:
    """``write_eof`` under the same deadline."""
    await _bounded(resp.write_eof(), stall_s)


async def _bounded(aw: Awaitable[None], stall_s: float) -> None:
    try:
        async with asyncio.timeout(stall_s):
            await aw
    except TimeoutError:
        raise PeerStalled(f"the peer accepted no bytes for {stall_s:g} s") from None
