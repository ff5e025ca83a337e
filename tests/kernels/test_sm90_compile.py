"""Every Triton kernel of the GPU engine compiles for Hopper (sm_90), from its wrapper's real launch at
the engine's bf16 shapes, with no GPU (`tests/kernels/sm90.py`): what the interpreter cannot say before a
machine is lent. Attention runs on tensor cores; copies and pointwise kernels move 16-byte vectors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _why_not() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        return "this triton has no CUDA backend to compile with"
    return None


pytestmark = [pytest.mark.skipif(_why_not() is not None, reason=str(_why_not())), pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def report() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tests.kernels.sm90"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=540)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_to_one_sm90_entry(report: dict) -> None:
    kernels = {case: [k["kernel"] for k in launches] for case, launches in report.items()}
    assert kernels == {
        "decode_attention": ["_decode_partial_kernel", "_decode_reduce_kernel"],  # 4 splits: partials, then merge
        "decode_attention_graph": ["_decode_partial_kernel", "_decode_reduce_kernel"],
        "decode_attention_unsplit": ["_decode_partial_kernel"],  # one split: no merge
        "decode_attention_fp32": ["_decode_partial_kernel", "_decode_reduce_kernel"],
        "extend_attention_fp32": ["_extend_kernel"],
        "extend_attention": ["_extend_kernel"],
        "fused_add_rmsnorm": ["_rmsnorm_kernel"],
        "rmsnorm": ["_rmsnorm_kernel"],
        "rotary_store_kv": ["_rotary_kernel"],
        "rotary": ["_rotary_kernel"],
        "store_kv": ["_store_kv_kernel"],
        "silu_and_mul": ["_silu_and_mul_kernel"],
        "copy_pages": ["_copy_pages_kernel"],
        "copy_pages_runs": ["_copy_pages_kernel"],  # runs of pages consecutive at both ends: one span each
        "copy_pages_slice": ["_copy_pages_kernel"],  # a TP-2 prefill rank's heads: a slice of each page row
        "gemv": ["_gemv_kernel"] * 3,  # bf16 at one row (M a constant, as Triton compiles a 1) and sixteen, fp32
        "gemv_lm_head": ["_gemv_kernel"] * 2,  # fp32 rows, bf16 weight: one row (a constant) and sixteen
        "gemv_silu_mul": ["_gemv_kernel"] * 2,  # the down projection reading the gate/up rows: 4 rows, then 1
        "rmsnorm_gemv": ["_gemv_kernel"] * 3,  # RMSNorm folded in: after a residual add, alone, with a bias
        "gemv_wide": ["_gemv_kernel"] * 7,  # 32 and 64 rows: bf16, fp32, the LM head, SiLU, RMSNorm (two forms)
    }
    assert all(k["entries"] == 1 for launches in report.values() for k in launches)
    # every autotuning config too: a GPU's warm-up compiles them all
    assert all(k["compiled"] == k["configs"] >= 1 for launches in report.values() for k in launches)
    assert report["copy_pages"][0]["configs"] == report["copy_pages_runs"][0]["configs"] == 9
    assert report["decode_attention"][0]["configs"] == 4


def test_every_config_fits_the_shared_memory_of_an_sm(report: dict) -> None:
    """A Hopper SM gives one program at most 227 KB of shared memory; Triton refuses a launch that asks for
    more (OutOfResources), which for the untuned first config would fail every step that runs the kernel."""
    sm90_max = 227 * 1024
    over = [(case, k["kernel"], i, shared) for case, launches in report.items() for k in launches
            for i, shared in enumerate(k["shared"]) if shared > sm90_max]
    assert not over, over
    # the pipelined kernels do stage through shared memory: the figure is the compile's, not a default 0
    assert all(k["shared"][0] > 0 for k in report["gemv_wide"] + report["extend_attention"])


def test_no_config_spills_registers(report: dict) -> None:
    """ptxas -v for sm_90a: no thread of any config of any kernel the engine launches spills to local memory
    (a spilling untuned first config would slow every untuned run; a spilling tuning config wastes the
    autotuner's time). The exception is fp32 weights in the GEMV, which only tests launch: the engine
    keeps fp32 layers on cuBLAS (`appliance.engine.linear_choice.weight_groups`)."""
    fp32_weights = {("gemv", 2), ("gemv_wide", 2)}
    spilled = [(case, i, k["kernel"], k["spill"]) for case, launches in report.items()
               for i, k in enumerate(launches) if (case, i) not in fp32_weights and any(k["spill"])]
    assert not spilled, spilled
    assert all(0 < r <= 255 for launches in report.values() for k in launches for r in k["regs"])
    # the folded GEMVs run configs of their own, without the 512-wide K tiles that spilled them
    assert report["rmsnorm_gemv"][0]["configs"] == report["gemv_silu_mul"][0]["configs"] == 5


def test_attention_runs_on_tensor_cores_and_reads_kv_in_16_byte_vectors(report: dict) -> None:
    partial, extend = report["decode_attention"][0], report["extend_attention"][0]
    assert partial["mma"] and extend["mma"]
    assert "v4.b32" in partial["ld"] and "v4.b32" in extend["ld"]
    graph = report["decode_attention_graph"][0]  # column-major int64 table, 16 splits: K/V reads unchanged
    unsplit = report["decode_attention_unsplit"][0]  # the batch-256 bucket's, writing bf16 straight out
    assert graph["mma"] and "v4.b32" in graph["ld"] and unsplit["mma"] and "v4.b32" in unsplit["ld"]
    # fp32 (the tiny test model's): exact fp32 products, so no tensor cores, but the same pipelined K/V loads
    assert not report["decode_attention_fp32"][0]["mma"] and report["decode_attention_fp32"][0]["async"] == [16]
    one, sixteen, fp32 = report["gemv"]
    # the weight streams through shared memory in 16-byte asynchronous copies, pipelined
    assert one["mma"] and sixteen["mma"] and one["async"] == sixteen["async"] == fp32["async"] == [16]
    for fused in report["gemv_silu_mul"] + report["gemv_lm_head"]:  # the LM head casts its fp32 rows to bf16
        assert fused["mma"] and fused["async"] == [16]
    for wide in report["gemv_wide"]:  # 32 or 64 rows: the same stream, outputs stored 16 bytes at a time
        assert wide["async"][-1] == 16 and "v4.b32" in wide["st"]
    assert all(k["mma"] for i, k in enumerate(report["gemv_wide"]) if i != 2)  # fp32 weights: exact products
    added, alone, biased = report["rmsnorm_gemv"]
    assert added["mma"] and alone["mma"] and biased["mma"]
    # the weight and the rows in 16-byte copies; the norm weight's fp32 K tile (256 over 128 threads) in 8
    assert added["async"] == alone["async"] == biased["async"] == [8, 16]
    assert "v4.b32" in added["st"]  # program 0's summed residual rows, 16 bytes a store


def test_page_copy_and_pointwise_kernels_move_16_byte_vectors(report: dict) -> None:
    for copy in (report["copy_pages"][0], report["copy_pages_runs"][0], report["copy_pages_slice"][0]):
        assert "v2.b64" in copy["ld"] and copy["st"] == ["v2.b64"]  # a destination made from an integer stored 8 bytes
    for case in ("fused_add_rmsnorm", "rmsnorm", "rotary_store_kv", "store_kv", "silu_and_mul"):
        k = report[case][0]
        assert "v4.b32" in k["ld"] and "v4.b32" in k["st"], case


def test_decode_kernels_wait_for_the_kernel_before_and_release_the_next(report: dict) -> None:
    """PDL (kernels/_triton.py): every kernel of a decode step opens with griddepcontrol.wait (so the
    stream's order holds) and launch_dependents; the page copy (on its own stream) and prefill's kernels
    launch plainly."""
    pdl = {"_decode_partial_kernel", "_decode_reduce_kernel", "_rmsnorm_kernel", "_rotary_kernel",
           "_silu_and_mul_kernel", "_gemv_kernel"}
    for case, launches in report.items():
        for k in launches:
            want = ["wait", "launch_dependents"] if k["kernel"] in pdl else []
            assert k["gdc"] == want, (case, k["kernel"], k["gdc"])
            # nothing reads or writes global memory before the wait (in any config): it would race the kernel
            # before, which PDL lets run on
            assert k["before_wait"] == 0, (case, k["kernel"], k["before_wait"])


def test_the_order_check_sees_an_access_before_the_wait() -> None:
    from tests.kernels.sm90 import memory_before_wait

    head = ".visible .entry k(\n.param .u64 p\n)\n{\nld.param.u64 %rd1, [p];\n"
    assert memory_before_wait(head + "ld.global.b32 %r1, [%rd1];\ngriddepcontrol.wait;\n") == 1
    assert memory_before_wait(head + "griddepcontrol.wait;\nld.global.b32 %r1, [%rd1];\n") == 0
    assert memory_before_wait(head + "st.global.b32 [%rd1], %r1;\n") == 0  # no wait: not a PDL kernel
