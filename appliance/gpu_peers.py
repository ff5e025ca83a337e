"""Whether the GPUs that hand KV to each other can reach each other's memory, before a GPU transport is
chosen for them.

cuda_ipc across two GPUs maps the decode GPU's pool into the prefill process, and the page copy then
writes it over NVLink or PCIe; NVSHMEM on one node does the same through its symmetric heap. Both need
peer access between the two GPUs, which many PCIe machines and most VMs lack: there the first handoff
would fail to open the pool, or fault and take the prefill engine's CUDA context with it. The launcher
asks before it starts a worker (`peer_access`, in a child process, so the launcher holds no CUDA
context), then keeps the transport, falls back to tcp (a staging copy through the host) where the
transport was left to the probe, or refuses a transport the user named, naming the GPUs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence

from appliance.gpu_plan import GpuGroup, pushes_to

Pair = tuple[int, int]  # (the GPU that writes, the GPU whose pool it writes), as the user numbers them
PeerAccess = Callable[[Sequence[Pair]], Mapping[Pair, bool]]
NEEDS_PEERS = frozenset({"cuda_ipc", "nvshmem"})

_CHILD = """
import json, sys, torch
pairs = json.loads(sys.argv[1])
print(json.dumps([bool(torch.cuda.can_device_access_peer(a, b)) for a, b in pairs]))
"""


def handoff_pairs(mode: str, groups: Sequence[GpuGroup]) -> tuple[Pair, ...]:
    """Every (writer, pool) pair of distinct GPUs a handoff may use in ``mode`` (one GPU shared needs none)."""
    pairs = {(a, b) for src in groups for dst in groups if pushes_to(mode, src, dst)
             for a in src.gpus for b in dst.gpus if a != b}
    return tuple(sorted(pairs))


def peer_access(pairs: Sequence[Pair], timeout_s: float = 60.0) -> dict[Pair, bool]:
    """``torch.cuda.can_device_access_peer`` for each pair, asked in a child process with this process's
    ``CUDA_VISIBLE_DEVICES``. Raises RuntimeError (why) when the child cannot answer in ``timeout_s``."""
    if not pairs:
        return {}
    try:
        run = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([list(p) for p in pairs])],
                             capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"no answer in {timeout_s:g} s") from exc
    if run.returncode != 0:
        lines = (run.stderr or run.stdout).strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"the check exited {run.returncode}")
    answers = json.loads(run.stdout.strip().splitlines()[-1])
    return dict(zip(pairs, answers, strict=True))


def choose_transport(transport: str, named: bool, pairs: Sequence[Pair], ask: PeerAccess) -> tuple[str, str | None]:
    """The transport to run (and a line for the operator, or None) once the pairs' peer access is known.

    ``named``: the user chose ``transport`` (refused with a ValueError where a pair lacks peer access);
    otherwise the probe did, and such a pair makes it tcp. A check that cannot answer keeps the transport,
    with a warning."""
    if transport not in NEEDS_PEERS or not pairs:
        return transport, None
    try:
        access = ask(pairs)
    except RuntimeError as exc:
        return transport, f"warning: could not check peer access between GPUs for {transport} ({exc}); using it"
    blocked = [p for p in pairs if not access.get(p, False)]
    if not blocked:
        return transport, None
    which = ", ".join(f"GPU {a} -> GPU {b}" for a, b in blocked[:4]) + (" ..." if len(blocked) > 4 else "")
    if named:
        raise ValueError(f"--transport {transport} needs peer access between the GPUs that hand KV over, and "
                         f"{which} has none: use --transport tcp, or GPUs that can reach each other "
                         "(nvidia-smi topo -p2p r)")
    return "tcp", f"KV transport: tcp, not {transport}: no peer access for {which}"
