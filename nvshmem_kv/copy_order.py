"""The stream-ordering contract between an engine's compute stream and a transport's copy stream.

GPU backends copy KV pages on their own stream so the copies overlap the rest of the forward pass.
Two orderings make that safe:

1. **copy after compute** (`before_copy`): the copy stream waits for the compute stream before it
   reads a layer's pages, so it reads what that layer's ``store_kv`` wrote;
2. **reuse after copy** (`fence`): before any later compute may write into pages, the compute stream
   waits for an event recorded after every copy issued so far. Pages freed after the first token go
   back to the pool at once and the next step's ``store_kv`` may overwrite them; the fence makes that
   write wait (on the GPU, without blocking the host) until the copies have read them.
3. **hand-out after copy** (`wait`): a writer no stream of ours orders (another engine's one-sided
   copies into pages this engine reserves for it) may get freed pages only once the host has seen every
   copy issued so far finish.

Streams are duck-typed (``wait_stream``, ``record_event``, ``wait_event``: torch.cuda.Stream's API), so
the contract is tested on CPU with streams that log what they were asked to do.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol


class StreamLike(Protocol):
    def wait_stream(self, stream: Any) -> None: ...

    def record_event(self, event: Any = None) -> Any: ...

    def wait_event(self, event: Any) -> None: ...


class CopyOrder:
    """Orders one transport's copy stream against the compute stream. ``drain`` is enqueued on the copy
    stream before a fence's event (nvshmem: ``quiet_on_stream``, so non-blocking puts have read their
    source before the event completes)."""

    def __init__(self, copy_stream: StreamLike, drain: Callable[[], None] | None = None) -> None:
        self.copy_stream = copy_stream
        self._drain = drain
        self._unfenced = False          # copies issued since the last fence
        self._unwaited = False          # copies issued since the last wait

    def before_copy(self, compute: StreamLike) -> None:
        """Call before enqueuing copies that read pages compute has just written."""
        self.copy_stream.wait_stream(compute)

    def after_copy(self) -> None:
        """Call after enqueuing copies: the next `fence` and `wait` must cover them."""
        self._unfenced = self._unwaited = True

    def fence(self, compute: StreamLike) -> bool:
        """Make ``compute`` wait for every copy issued so far. True when there was one to wait for."""
        if not self._unfenced:
            return False
        if self._drain is not None:
            self._drain()
        compute.wait_event(self.copy_stream.record_event())
        self._unfenced = False
        return True

    def wait(self, timeout_s: float, poll_s: float = 50e-6) -> bool:
        """Block the host until every copy issued so far has finished (an event on the copy stream,
        polled: a stream sync has no deadline). True when there was one to wait for; raises
        `TimeoutError` after ``timeout_s``."""
        if not self._unwaited:
            return False
        if self._drain is not None:
            self._drain()
        event = self.copy_stream.record_event()
        end = time.monotonic() + timeout_s
        while not event.query():
            if time.monotonic() >= end:
                raise TimeoutError(f"the KV copies did not finish within {timeout_s:.1f} s")
            time.sleep(poll_s)
        self._unwaited = False
        return True
