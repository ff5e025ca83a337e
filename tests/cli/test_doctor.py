"""`pdbox doctor` tells what this machine offers and why a backend was passed over."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys


def test_doctor_reports_transports_and_reasons() -> None:
    out = subprocess.run([sys.executable, "-m", "appliance.cli", "doctor", "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    names = [t["backend"] for t in rep["transports"]]
    assert names[:4] == ["nvshmem", "cuda_ipc", "shm", "tcp"]
    chosen = next(t for t in rep["transports"] if t["ok"])
    assert rep["transport"] == chosen["backend"]
    assert all(t["reason"] for t in rep["transports"])  # every verdict says why
    if not rep["devices"]["cuda"]:
        assert rep["transport"] == "shm" and rep["attention_backend"]["backend"] == "cpu"
        assert "pdl" not in rep["attention_backend"]  # a GPU-only line
    else:  # PDL on where the GPU is Hopper or later (and not switched off), else the reason
        from kernels._triton import pdl_enabled

        pdl = rep["attention_backend"]["pdl"]
        assert pdl["reason"] and pdl["ok"] == pdl_enabled()
    busy = rep["devices"]["cpu"]["busy"]  # each core's busy share over 0.3 s (JSON keys are strings)
    assert sorted(int(c) for c in busy) == rep["devices"]["cpu"]["cores"] and all(0 <= f <= 1 for f in busy.values())
    native = rep["attention_backend"]["native"]
    assert set(native) == {"attention", "pointwise", "quant_gemv", "pointwise_f32", "decode_f32", "extend_f32",
                           "decode_layer_f32", "decode_layer_bf16"}
    assert all(n["reason"] for n in native.values())
    flags = open("/proc/cpuinfo").read()
    if "avx512_bf16" in flags and shutil.which("cc"):  # a Zen 4 CI machine with gcc
        assert all(n["ok"] and n["path"].endswith(".so") for n in native.values())
    if " avx2 " in flags and " fma " in flags and shutil.which("cc"):  # any x86 CI machine since Zen 1
        for name in ("quant_gemv", "pointwise_f32", "decode_f32", "extend_f32", "decode_layer_f32"):
            assert native[name]["ok"] and native[name]["path"].endswith(".so")
