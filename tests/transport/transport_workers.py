"""Code that runs in the spawned prefill (sender) processes of the transport tests, plus the data
helpers both sides use. Specs travel as plain dicts; handles as JSON, like in the appliance."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import torch

import nvshmem_kv as nk

_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


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
    """Integer view for bitwise comparison (NaN-safe)."""
    return t.contiguous().view(_BITS[t.dtype])


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(bits(t).numpy().tobytes()).hexdigest()


def run_prefill(spec: dict[str, Any], conn: Any) -> None:
    """One prefill rank: connect to every handle, write the rooms layer by layer, signal.

    spec keys: backend, local (descriptor fields), seed, handles (JSON strings), rooms (list of
    {room, src, dst}), die_after_layers (optional: stop mid-room and wait to be killed).
    """
    local = nk.PoolDescriptor(**spec["local"])
    kv = local_kv(local, spec["seed"])
    t = nk.create(spec["backend"], run_id=spec.get("run_id", "test"))
    try:
        peers = [t.connect(nk.PoolHandle.from_json(h), local, timeout_s=10.0) for h in spec["handles"]]
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
            t.flush(p, timeout_s=20.0)
        conn.send(("done", [len(p.slices) for p in peers]))
        if conn.poll(30.0):
            conn.recv()
    except Exception as exc:  # report instead of dying silently
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        t.close()
