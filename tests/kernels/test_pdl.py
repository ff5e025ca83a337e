"""Programmatic dependent launch (kernels/_triton.py): when kernels launch with it, and that the
interpreter and GPUs before Hopper get the plain launch (the PTX side: test_sm90_compile.py)."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels._triton import PDL_ENV, LazyKernel, interpreter_enabled, pdl_enabled, pdl_refusal


def test_only_hopper_or_later_with_gdc_and_not_switched_off() -> None:
    assert pdl_refusal((9, 0), None, True, False) is None
    assert pdl_refusal((10, 0), "1", True, False) is None
    assert pdl_refusal((8, 9), None, True, False) == "compute capability 8.9 (PDL needs 9.0, Hopper)"  # Ada
    assert pdl_refusal(None, None, True, False) == "no CUDA device"
    assert "grid dependency control" in pdl_refusal((9, 0), None, False, False)  # an older Triton
    assert pdl_refusal((9, 0), None, True, True) == "the Triton interpreter"
    for off in ("0", "false", "No", "OFF"):
        assert pdl_refusal((9, 0), off, True, False) == f"PDBOX_TRITON_PDL={off}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter's launch")
def test_interpreted_kernels_launch_without_the_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernels.activation import _silu_and_mul_kernel

    monkeypatch.delenv(PDL_ENV, raising=False)
    assert interpreter_enabled() and not pdl_enabled()
    k = LazyKernel(_silu_and_mul_kernel, interpret={"BLOCK": 64}, pdl=True)
    k._build()
    assert k._fixed == {"BLOCK": 64, "USE_GDC": False} and not k.uses_pdl  # no launch_pdl option either
    plain = LazyKernel(_silu_and_mul_kernel, interpret={"BLOCK": 64})
    plain._build()
    assert plain._fixed == {"BLOCK": 64}
    x = torch.randn(3, 8)
    torch.testing.assert_close(kernels.silu_and_mul(x), kernels.silu_and_mul_ref(x))
