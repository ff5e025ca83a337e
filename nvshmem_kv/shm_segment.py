"""POSIX shared-memory segments (shm_open + mmap) with explicit ownership.

The owner creates and unlinks; an attacher only maps. Unlike `multiprocessing.shared_memory`
before Python 3.13, attaching never registers the segment with a resource tracker (which would
unlink the owner's memory when the attacher exits). The owner registers with the tracker so that
a crashed owner's segment is still unlinked.
"""

from __future__ import annotations

import mmap
import os
import re

import torch

from nvshmem_kv.errors import TransportError

try:
    import _posixshmem
except ImportError:  # pragma: no cover - non-POSIX platforms
    _posixshmem = None

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


def shm_supported() -> tuple[bool, str]:
    if _posixshmem is None:
        return False, "this Python has no POSIX shared memory (_posixshmem)"
    return True, "POSIX shared memory available"


class ShmSegment:
    """A mapped segment. ``tensor`` views it without copying."""

    def __init__(self, name: str, size: int, mm: mmap.mmap, owner: bool, tracked: bool) -> None:
        self.name = name
        self.size = size
        self._mm: mmap.mmap | None = mm
        self.owner = owner
        self._tracked = tracked

    @classmethod
    def create(cls, name: str, size: int, track: bool = True) -> ShmSegment:
        _check_name(name)
        try:
            fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        except OSError as exc:
            raise TransportError(f"cannot create shared memory {name!r}: {exc}") from exc
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except OSError as exc:
            os.close(fd)
            _posixshmem.shm_unlink("/" + name)
            raise TransportError(f"cannot size shared memory {name!r} to {size} B: {exc}") from exc
        os.close(fd)
        if track:
            from multiprocessing import resource_tracker

            resource_tracker.register("/" + name, "shared_memory")
        return cls(name, size, mm, owner=True, tracked=track)

    @classmethod
    def attach(cls, name: str, size: int) -> ShmSegment:
        _check_name(name)
        try:
            fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        except OSError as exc:
            raise TransportError(f"cannot open shared memory {name!r} (is the receiver on this host?): {exc}") \
                from exc
        try:
            actual = os.fstat(fd).st_size
            if actual < size:
                raise TransportError(f"shared memory {name!r} has {actual} B, the pool needs {size} B")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, size, mm, owner=False, tracked=False)

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...], offset: int = 0) -> torch.Tensor:
        if self._mm is None:
            raise TransportError(f"shared memory {self.name!r} is closed")
        count = 1
        for s in shape:
            count *= s
        return torch.frombuffer(self._mm, dtype=dtype, count=count, offset=offset).view(shape)

    def close(self) -> None:
        """Unmap (if no tensor still views it) and, for the owner, unlink the name."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass        # a tensor still views the memory; it is unmapped when that tensor dies
        if self.owner:
            self.owner = False
            try:
                _posixshmem.shm_unlink("/" + self.name)
            except FileNotFoundError:
                pass
            if self._tracked:
                from multiprocessing import resource_tracker

                resource_tracker.unregister("/" + self.name, "shared_memory")


def _check_name(name: str) -> None:
    if _posixshmem is None:
        raise TransportError(shm_supported()[1])
    if not _NAME.match(name):
        raise TransportError(f"invalid shared memory name {name!r}")
