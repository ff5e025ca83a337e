"""The KV pool's tensor (`appliance/engine/kv_cache.py::zeroed_kv`): zeros, in memory that costs nothing
until its pages are written, kept alive by any view of it."""

from __future__ import annotations

import gc
import os

import torch

from appliance.engine.kv_cache import PagePool, zeroed_kv

CPU = torch.device("cpu")


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_cpu_pool_is_zeros_that_take_memory_only_when_written() -> None:
    shape = (2, 4, 2048, 16, 2, 64)  # 256 MiB of fp32
    before = resident_bytes()
    kv = zeroed_kv(shape, torch.float32, CPU)
    assert resident_bytes() - before < 16 << 20  # not touched: not resident
    assert kv.shape == shape and kv.dtype == torch.float32 and kv.is_contiguous()
    assert not kv[0, 0, :64].any() and not kv[1, 3, -64:].any()
    pool = PagePool(kv)
    page = pool.alloc(1)[0]
    kv[:, :, page] = 1.5
    assert float(kv[:, :, page].sum()) == 1.5 * 2 * 4 * 16 * 2 * 64
    assert resident_bytes() - before < 64 << 20  # one page a layer written: still far from the pool's size


def test_views_keep_the_pool_alive_and_other_dtypes() -> None:
    kv = zeroed_kv((2, 1, 4, 16, 1, 8), torch.bfloat16, CPU)
    layer = kv[1, 0]
    del kv
    gc.collect()
    layer.fill_(2.0)
    assert layer.dtype == torch.bfloat16 and float(layer.float().sum()) == 2.0 * 4 * 16 * 8
    assert zeroed_kv((2, 1, 0, 16, 1, 8), torch.float32, CPU).numel() == 0


def test_a_forked_child_writes_its_own_copy() -> None:
    """The pool is private memory, as torch.zeros' is: what a forked process writes stays in that process."""
    kv = zeroed_kv((2, 1, 4, 16, 1, 8), torch.float32, CPU)
    pid = os.fork()
    if pid == 0:  # the child: write, and exit without running the parent's cleanup
        kv.fill_(7.0)
        os._exit(0 if float(kv.sum()) == 7.0 * kv.numel() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not kv.any()
