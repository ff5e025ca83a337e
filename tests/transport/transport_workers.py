"""Code that runs in the spawned processes of the transport tests, plus the data helpers both sides
use. Specs travel as plain dicts; handles as JSON, like in the appliance.

Messages on the pipe, child -> parent: ("uid", bytes) (nvshmem PE 0), ("handle", json) (decode),
("mid" | "done" | "error", value); parent -> child: ("handles", [json, ...]) when the spec has
none yet, then "close".
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import torch

import nvshmem_kv as nk

_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
GPU_BACKENDS = ("cuda_ipc", "nvshmem")


def global_kv(desc: nk.PoolDescriptor, seed: int) -> torch.Tensor:
    """Random bit patterns (NaNs included) for ALL heads: (2, L, P, page, H_total, D)."""
    shape = (2, desc.num_layers, desc.num_pages, desc.page_size, desc.total_kv_heads, desc.head_dim)
    bits = _BITS[desc.torch_dtype()]
    g = torch.Generator().manual_seed(seed)
    info = torch.iinfo(bits)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=bits).view(desc.torch_dtype())


def local_kv(desc: nk.PoolDescriptor, seed: int) -> torch.Tensor:
    h0, h1 = desc.head_range
    return global_kv(desc, seed)[..., h0:h1, :].contiguous()


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view for bitwise comparison (NaN-safe), on the CPU."""
    return t.detach().cpu().contiguous().view(_BITS[t.dtype])


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(bits(t).numpy().tobytes()).hexdigest()


def _nvshmem_env() -> None:
    """Single-node NVSHMEM: bootstrap over loopback, no IB probing."""
    os.environ.setdefault("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "lo")
    os.environ.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")


def _create(spec: dict[str, Any]) -> nk.KVTransport:
    backend = spec["backend"]
    device = spec.get("device") if backend in GPU_BACKENDS else None
    return nk.create(backend, device=device, run_id=spec.get("run_id", "test"), **spec.get("opts", {}))


def run_prefill(spec: dict[str, Any], conn: Any) -> None:
    """One prefill rank: connect to every handle, write the rooms layer by layer, signal.

    spec keys: backend, local (descriptor fields), seed, handles (JSON strings; absent: sent on the
    pipe after start-up), rooms (list of {room, src, dst}), device, opts (backend options),
    warm (optional: `warm` the transport first, as the handoff does), die_after_layers (optional: stop
    mid-room and wait to be killed). Answers ("done", {"slices": per peer, "kernel_writes", "writes"}).
    """
    local = nk.PoolDescriptor(**spec["local"])
    device = spec.get("device", "cpu")
    if spec["backend"] == "nvshmem" and "uid" not in spec.get("opts", {}):
        from nvshmem_kv.backends.nvshmem import make_unique_id

        _nvshmem_env()
        uid = make_unique_id()            # PE 0 makes the id: it embeds this process's bootstrap socket
        spec = {**spec, "opts": {**spec.get("opts", {}), "uid": uid}}
        conn.send(("uid", uid))
    t: nk.KVTransport | None = None
    try:
        t = _create(spec)
        kv = local_kv(local, spec["seed"]).to(device)
        if spec["backend"] == "nvshmem":  # collective allocation: the source pool is symmetric too
            pool = t.allocate_pool(local, device)
            pool.copy_(kv)
            kv = pool
        if spec.get("warm"):
            t.warm(kv, local)
        handles = spec.get("handles")
        if handles is None:
            kind, handles = conn.recv()
        peers = [t.connect(nk.PoolHandle.from_json(h), local, timeout_s=30.0) for h in handles]
        die_after = spec.get("die_after_layers")
        for layer in range(local.num_layers):
            if die_after is not None and layer == die_after:
                for p in peers:
                    t.flush(p, timeout_s=10.0)
                conn.send(("mid", None))
                time.sleep(120)          # the test kills us here
            for r in spec["rooms"]:
                for p in peers:
                    t.write(p, r["room"], layer, kv, r["src"], r["dst"])
        for r in spec["rooms"]:
            for p in peers:
                if not p.slices:         # not a writer for this destination (see writers_for)
                    continue
                hs = p.slices[0]
                sent = kv[:, :, r["src"]][..., hs.src_start:hs.src_start + hs.count, :]
                payload = {"rank": local.tp_rank, "room": r["room"], "sha": digest(sent)}
                t.signal(p, r["room"], json.dumps(payload).encode())
        for p in peers:
            t.flush(p, timeout_s=30.0)
        st = t.stats()
        conn.send(("done", {"slices": [len(p.slices) for p in peers], "kernel_writes": st.kernel_writes,
                            "writes": st.writes}))
        if conn.poll(60.0):
            conn.recv()
    except Exception as exc:  # report instead of dying silently
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        if t is not None:
            t.close()


def run_decode(spec: dict[str, Any], conn: Any) -> None:
    """One decode rank in a child process (GPU tests): allocate through the transport, publish the
    handle, expect the rooms, report per room (done, reason, digest of its destination pages)."""
    if spec["backend"] == "nvshmem":
        _nvshmem_env()
    desc = nk.PoolDescriptor(**spec["local"])
    t: nk.KVTransport | None = None
    try:
        t = _create(spec)
        pool = t.allocate_pool(desc, spec.get("device", "cpu"))
        for r in spec["rooms"]:
            t.expect(r["room"], r.get("signals", 1), deadline_s=60.0)
        conn.send(("handle", t.register_pool(pool, desc).to_json().decode()))
        out = {}
        for r in spec["rooms"]:
            st = t.wait(r["room"], timeout_s=60.0)
            out[r["room"]] = (st.done, st.reason, digest(pool[:, :, r["dst"]]), [p.decode() for p in st.payloads])
        conn.send(("done", out))
        if conn.poll(60.0):
            conn.recv()
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        if t is not None:
            t.close()
