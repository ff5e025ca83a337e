"""Several async iterators read at once: each item as it comes, tagged with its iterator's index.

For a /v1/completions request that lists several prompts: each prompt's answer is its own request on
the engines, and their pieces reach the client interleaved. The first error ends the merge; however it
ends, every iterator's task is cancelled and every iterator closed (closing a request's events aborts
it on its engines).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


async def merged(its: list[AsyncIterator[T]]) -> AsyncGenerator[tuple[int, T], None]:
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

    async def pump(k: int, it: AsyncIterator[T]) -> None:
        try:
            async for item in it:
                await queue.put((k, item))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, who raises it
            await queue.put((k, exc))
        await queue.put((k, _END))

    tasks = [asyncio.ensure_future(pump(k, it)) for k, it in enumerate(its)]
    try:
        left = len(tasks)
        while left:
            k, item = await queue.get()
            if item is _END:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield k, item  # type: ignore[misc]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for it in its:
            close = getattr(it, "aclose", None)
            if close is not None:
                await close()
