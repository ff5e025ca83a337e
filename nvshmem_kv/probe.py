"""Pick the best backend this machine supports, recording why the others were passed over."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nvshmem_kv.errors import BackendUnavailable
from nvshmem_kv.registry import availability

PROBE_ORDER: tuple[str, ...] = ("nvshmem", "cuda_ipc", "shm", "tcp")


@dataclass(frozen=True)
class ProbeEntry:
    backend: str
    ok: bool
    reason: str


@dataclass(frozen=True)
class ProbeResult:
    """``backend`` is the first usable one in `PROBE_ORDER`; ``entries`` hold every verdict."""

    backend: str
    device: str
    entries: tuple[ProbeEntry, ...]

    def summary(self) -> str:
        lines = [f"KV transport: {self.backend} (device {self.device})"]
        for e in self.entries:
            lines.append(f"  {'ok  ' if e.ok else 'skip'} {e.backend:9s} {e.reason}")
        return "\n".join(lines)


def probe(device: str | torch.device = "cpu", *, same_host: bool = True, collective: bool = False,
          order: tuple[str, ...] = PROBE_ORDER) -> ProbeResult:
    """Try backends in ``order`` for a pool on ``device``.

    ``same_host``: both engines run on this host (False rules out shm and cuda_ipc).
    ``collective``: the launcher bootstraps every prefill and decode rank into one NVSHMEM job
    (nvshmem needs it; it is never initialized here).
    """
    entries: list[ProbeEntry] = []
    for name in order:
        if not same_host and name in ("shm", "cuda_ipc"):
            entries.append(ProbeEntry(name, False, "the peer is on another host"))
            continue
        try:
            ok, why = availability(name)(device)
        except Exception as exc:  # a broken optional install must not break start-up
            ok, why = False, f"availability check failed: {type(exc).__name__}: {exc}"
        if ok and name == "nvshmem" and not collective:
            ok, why = False, why + "; but no collective NVSHMEM start-up was arranged (collective=False)"
        entries.append(ProbeEntry(name, ok, why))
    chosen = next((e.backend for e in entries if e.ok), None)
    if chosen is None:
        raise BackendUnavailable("no KV transport backend works here:\n" + "\n".join(
            f"  {e.backend}: {e.reason}" for e in entries))
    return ProbeResult(chosen, str(device), tuple(entries))
