"""fake: every call succeeds and signals complete rooms, but no page bytes move.

For scheduler tests and warm-up: the room protocol (expect / signal / poll, deadlines, dead
peers) is the real one, over the real control channel, in one process or several.
"""

from __future__ import annotations

import torch

from nvshmem_kv.pages import PageRun
from nvshmem_kv.transport import ChannelPeer, ChannelTransport


def available(device: str | torch.device = "cpu") -> tuple[bool, str]:
    return True, "moves no data (tests only)"


class FakeTransport(ChannelTransport):
    name = "fake"

    def _write_runs(self, peer: ChannelPeer, room: str, layer: int, src_kv: torch.Tensor,
                    runs: list[PageRun]) -> int:
        return 0
