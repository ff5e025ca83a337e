"""Shared plumbing for the Triton kernels: lazy JIT, tile-config choice, input validation.

Kernels are plain Python functions wrapped in :class:`LazyKernel`. The ``triton.jit`` object is built
on the first launch, not at import, so whether a kernel runs compiled or under the interpreter
(``TRITON_INTERPRET=1``) depends on the environment at first use, never on import order. On a real
GPU a kernel with ``configs`` is autotuned; under the interpreter (which has no driver to time with)
it launches with its fixed ``interpret`` config instead. ``PDBOX_TRITON_AUTOTUNE=0`` skips tuning on
a GPU too and launches each kernel's first config (quick test runs, CUDA-graph capture without a
warm-up).

Programmatic dependent launch (PDL, Hopper and later): a kernel built with ``pdl=True`` takes a
``USE_GDC`` constexpr and opens with ``if USE_GDC: gdc_wait(); gdc_launch_dependents()``. Launched
with ``launch_pdl``, the GPU may then start it while the kernel before it in the stream finishes (its
launch latency and ramp hidden behind the other's tail, a few microseconds per kernel boundary, of
which a decode step has ~10 per layer), and it waits at ``gdc_wait`` for that kernel's memory before
touching anything. Every such kernel waits before its first load or store, so the stream's order still
holds, transitively, and across kernels launched without PDL (cuBLAS, torch's). On by default where
the GPU and this Triton support it; ``PDBOX_TRITON_PDL=0`` turns it off.

Triton itself is optional: the torch references (the CPU path) import without it, and a Triton
wrapper called without it raises a clear error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

try:  # grid dependency control: Triton 3.3 and later
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:  # pragma: no cover - an older or absent triton: kernels launch without PDL
    gdc_wait = gdc_launch_dependents = None  # type: ignore[assignment]
    HAS_GDC = False

__all__ = [
    "AUTOTUNE_ENV",
    "HAS_TRITON",
    "LazyKernel",
    "PDL_ENV",
    "autotune_enabled",
    "check",
    "check_device",
    "check_float_dtype",
    "check_index_tensor",
    "check_last_dim_contiguous",
    "config",
    "gdc_launch_dependents",
    "gdc_wait",
    "interpreter_enabled",
    "next_pow2",
    "num_sms",
    "pdl_enabled",
    "pdl_refusal",
    "pdl_status",
    "tl",
    "tl_dtype",
    "triton",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
AUTOTUNE_ENV = "PDBOX_TRITON_AUTOTUNE"
PDL_ENV = "PDBOX_TRITON_PDL"


def interpreter_enabled() -> bool:
    """Whether Triton kernels run under the CPU interpreter (``TRITON_INTERPRET`` is true)."""
    if HAS_TRITON:
        return bool(triton.knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def autotune_enabled() -> bool:
    """Autotune on a GPU unless ``PDBOX_TRITON_AUTOTUNE`` is 0/false/no/off."""
    return os.environ.get(AUTOTUNE_ENV, "1").lower() not in ("0", "false", "no", "off")


def pdl_refusal(capability: tuple[int, int] | None, env: str | None, has_gdc: bool, interpreted: bool) -> str | None:
    """Why kernels launch without PDL, or None when they launch with it: that needs a GPU of compute
    capability 9.0 or later, a Triton with grid dependency control, not the interpreter, and
    ``PDBOX_TRITON_PDL`` (``env``) not 0/false/no/off."""
    if (env or "1").lower() in ("0", "false", "no", "off"):
        return f"{PDL_ENV}={env}"
    if interpreted:
        return "the Triton interpreter"
    if not has_gdc:
        return "this Triton has no grid dependency control (3.3+)"
    if capability is None:
        return "no CUDA device"
    if capability < (9, 0):
        return f"compute capability {capability[0]}.{capability[1]} (PDL needs 9.0, Hopper)"
    return None


def pdl_status() -> str | None:
    """:func:`pdl_refusal` for the current CUDA device."""
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    return pdl_refusal(capability, os.environ.get(PDL_ENV), HAS_GDC and HAS_TRITON, interpreter_enabled())


def pdl_enabled() -> bool:
    """Whether this process's PDL kernels launch with programmatic dependent launch."""
    return pdl_status() is None


def next_pow2(n: int) -> int:
    """Smallest power of two ``>= max(n, 1)``."""
    return 1 << max(int(n) - 1, 0).bit_length()


class LazyKernel:
    """A Triton kernel whose ``triton.jit`` (and ``triton.autotune``) object is built on first launch.

    ``configs``/``key`` are the GPU autotuning space, whose first config is also the fixed GPU
    config when autotuning is off; ``interpret`` is the fixed meta-parameter dict used under the
    interpreter. Launch as ``kernel[grid](*args, **kw)``; a callable ``grid`` receives the
    meta-parameters (tuned or fixed) like with plain Triton. ``pdl``: the kernel has a ``USE_GDC``
    constexpr (the module's note) and launches with PDL where :func:`pdl_enabled`. ``do_not_specialize``:
    integer arguments whose value must not pick a new compile (Triton's own specializes on 1 and on
    multiples of 16).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        configs: Sequence[Any] = (),
        key: Sequence[str] = (),
        interpret: dict[str, Any] | None = None,
        pdl: bool = False,
        do_not_specialize: Sequence[str] = (),
    ) -> None:
        self.fn = fn
        self.pdl = pdl
        self.do_not_specialize = tuple(do_not_specialize)
        self.uses_pdl = False
        self.configs = list(configs)
        self.key = list(key)
        self.interpret = dict(interpret or {})
        self._compiled: Any = None
        self._fixed: dict[str, Any] = {}
        self._tuned = False
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    def _build(self) -> None:
        if not HAS_TRITON:
            raise RuntimeError(f"{self.__name__}: triton is not installed; use the torch reference instead")
        jitted = triton.jit(self.fn, do_not_specialize=self.do_not_specialize or None)
        configs = [c for c in self.configs if c is not None]
        self._compiled = jitted
        if interpreter_enabled():
            self._fixed = dict(self.interpret)
        elif configs and autotune_enabled():
            self._compiled = triton.autotune(configs=configs, key=self.key)(jitted)
            self._fixed = {}
            self._tuned = True
        elif configs:
            first = configs[0]
            self._fixed = {**first.kwargs, "num_warps": first.num_warps, "num_stages": first.num_stages}
        else:
            self._fixed = {}
        if self.pdl:
            self.uses_pdl = pdl_enabled()
            self._fixed["USE_GDC"] = self.uses_pdl
            if self.uses_pdl:
                self._fixed["launch_pdl"] = True  # a compile option: the launcher sets the PDL attribute

    @property
    def autotuned(self) -> bool:
        """True once built with ``triton.autotune`` (a real GPU and a tuning space)."""
        if self._compiled is None:
            self._build()
        return self._tuned

    def tuned_configs(self) -> dict[str, str]:
        """The autotuner's choice per key (``{}`` when untuned, or before the first launch)."""
        cache = getattr(self._compiled, "cache", None) if self._tuned else None
        return {str(k): str(c) for k, c in (cache or {}).items()}

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        if self._compiled is None:
            self._build()

        def launch(*args: Any, **kwargs: Any) -> Any:
            meta = {**self._fixed, **kwargs}
            return self._compiled[grid](*args, **meta)

        return launch


def config(num_warps: int = 4, num_stages: int = 2, **meta: Any) -> Any:
    """A ``triton.Config`` (or ``None`` when triton is absent, so module-level config lists still import)."""
    if not HAS_TRITON:
        return None
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def check(cond: bool, msg: str) -> None:
    """Raise ``ValueError(msg)`` unless ``cond``: wrappers validate with errors, never asserts."""
    if not cond:
        raise ValueError(msg)


def check_device(op: str, **tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; CUDA unless the interpreter is on (then CPU works too)."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        check(dev == first, f"{op}: {name} is on {dev} but {next(iter(devices))} is on {first}")
    if not HAS_TRITON:
        raise ValueError(f"{op}: triton is not installed; use the torch reference on this machine")
    if first.type != "cuda" and not interpreter_enabled():
        raise ValueError(
            f"{op}: Triton kernels need CUDA tensors, got {first}; set TRITON_INTERPRET=1 before importing "
            "kernels to run them on CPU tensors, or use the torch reference"
        )
    return first


def check_float_dtype(op: str, name: str, t: torch.Tensor, allowed: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    """``t.dtype`` is one of ``allowed``."""
    check(t.dtype in allowed, f"{op}: {name} must be one of {[str(d) for d in allowed]}, got {t.dtype}")


def check_last_dim_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    """The innermost dim has unit stride (other strides are passed to the kernel)."""
    check(t.shape[-1] <= 1 or t.stride(-1) == 1, f"{op}: {name} needs a unit-stride last dim, got {t.stride()}")


def check_index_tensor(op: str, name: str, t: torch.Tensor, ndim: int) -> None:
    """An int32/int64 index tensor of rank ``ndim``."""
    check(t.dim() == ndim, f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    check(t.dtype in (torch.int32, torch.int64), f"{op}: {name} must be int32 or int64, got {t.dtype}")


def tl_dtype(dtype: torch.dtype) -> Any:
    """The ``tl`` dtype for a torch dtype (only the ones the kernels use)."""
    return {
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float32: tl.float32,
        torch.int8: tl.int8,
        torch.int16: tl.int16,
        torch.int32: tl.int32,
        torch.int64: tl.int64,
    }[dtype]


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 for CPU / the interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
