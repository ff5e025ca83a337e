"""Small CUDA helpers shared by the GPU backends. Import only where CUDA is expected."""

from __future__ import annotations

import ctypes
import importlib.util
from typing import Any

import torch

from nvshmem_kv.errors import BackendUnavailable, TransportError


def cuda_reason(device: str | torch.device) -> str | None:
    """Why a GPU backend cannot serve ``device`` here, or None."""
    dev = torch.device(device)
    problems = []
    if dev.type != "cuda":
        problems.append(f"the pool device is {dev.type}, not cuda")
    if not torch.cuda.is_available():
        problems.append("torch.cuda.is_available() is False (no GPU/driver, or a CPU build of torch)")
    return "; ".join(problems) or None


def cuda_device(device: str | torch.device | None) -> torch.device:
    """``device`` with an explicit index (the current device when none is given)."""
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        raise TransportError(f"expected a CUDA device, got {dev}")
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def have_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def runtime() -> Any:
    """``cuda.bindings.runtime`` (from cuda-bindings, the ``[gpu]`` extra)."""
    try:
        from cuda.bindings import runtime as rt
    except ImportError as exc:
        raise BackendUnavailable(f"cuda-bindings is not installed (pip install 'pdbox[gpu]'): {exc}") from exc
    return rt


def check(result: tuple[Any, ...], what: str) -> Any:
    """Unpack a cuda-bindings ``(err, value...)`` tuple, raising on error."""
    err, *values = result
    if int(err) != 0:
        raise TransportError(f"{what} failed: {err!r}")
    return values[0] if len(values) == 1 else tuple(values)


class _CudaArray:
    """Just enough ``__cuda_array_interface__`` for torch.as_tensor to alias raw device memory."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None}


def tensor_at(ptr: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over ``nbytes`` of device memory at ``ptr`` (no copy; the caller keeps it mapped).
    torch infers the owning device from the pointer (UVA)."""
    return torch.as_tensor(_CudaArray(ptr, nbytes)).view(dtype).view(shape)


def allocation_base(ptr: int) -> tuple[int, int]:
    """(base, size) of the CUDA allocation that contains ``ptr`` (cuMemGetAddressRange)."""
    from cuda.bindings import driver

    base, size = check(driver.cuMemGetAddressRange(driver.CUdeviceptr(ptr)), "cuMemGetAddressRange")
    return int(base), int(size)


def ipc_handle_bytes(handle: Any) -> bytes:
    """The 64 raw bytes of a cudaIpcMemHandle_t (cuda-bindings >= 13.4 has no ``.reserved``)."""
    return ctypes.string_at(handle.getPtr(), 64)


def ipc_handle_from_bytes(rt: Any, raw: bytes) -> Any:
    if len(raw) != 64:
        raise TransportError(f"a CUDA IPC handle is 64 bytes, got {len(raw)}")
    handle = rt.cudaIpcMemHandle_t()
    ctypes.memmove(handle.getPtr(), raw, 64)
    return handle
