"""The prepared device check, on CPU: `scripts/gpu-check.sh --dry-run` lists every step and every pinned
wheel, and fails when one is missing; the wheel list and the `gpu` extra name CUDA 13 packages."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("env", "install", "pytest-gpu", "serve-cuda_ipc", "serve-nvshmem", "bench-kernels", "transfer-cuda_ipc",
         "transfer-nvshmem", "ttft-8k", "serve-cross-gpu", "serve-tp2-nccl")


def _pins() -> list[tuple[str, str]]:
    lines = (ROOT / "scripts" / "gpu-wheels.txt").read_text().splitlines()
    pins = [ln.split("#")[0].strip() for ln in lines]
    return [tuple(p.split("==")) for p in pins if p]  # type: ignore[misc]


def _dry_run(wheels: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "GPU_WHEELS_DIR": str(wheels),
                                                      "GPU_SITE_DIR": str(wheels / "site")})


def test_dry_run_lists_every_step_and_fails_on_missing_wheels(tmp_path: Path) -> None:
    r = _dry_run(tmp_path)
    assert r.returncode == 3, r.stderr
    for step in STEPS:
        assert re.search(rf"^  {re.escape(step)}\s", r.stdout, re.M), step
    for name, version in _pins():
        assert re.search(rf"MISSING\s+{re.escape(name)}=={re.escape(version)}\s", r.stdout), name
    assert f"{len(_pins())} wheels, {len(_pins())} missing" in r.stdout


def test_dry_run_passes_when_every_wheel_is_there(tmp_path: Path) -> None:
    for name, version in _pins():   # wheel file names spell names with underscores
        (tmp_path / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"")
    r = _dry_run(tmp_path)
    assert r.returncode == 0, r.stdout
    assert "0 missing" in r.stdout and "MISSING" not in r.stdout
    assert len(re.findall(r"^  ok ", r.stdout, re.M)) == len(_pins())


def test_gpu_tests_are_selected_by_file_never_all_of_tests_nor_smollm(tmp_path: Path) -> None:
    line = next(ln for ln in _dry_run(tmp_path).stdout.splitlines() if ln.lstrip().startswith("pytest-gpu"))
    targets = [w for w in line.split() if w.startswith("tests")]
    assert targets and all(t.startswith("tests/") and ".py" in t for t in targets)
    assert all((ROOT / t.split("::")[0]).is_file() for t in targets)
    assert "not slow" in line and "smollm" not in line.lower()


def test_the_script_uses_the_machines_python_and_no_registry() -> None:
    text = (ROOT / "scripts" / "gpu-check.sh").read_text()
    assert 'PY="${PYTHON:-python3}"' in text
    assert "--no-index" in text and ".venv" not in text and "venv" not in text.replace("no venv", "")


def test_wheels_and_gpu_extra_name_cuda13_packages() -> None:
    names = {n for n, _ in _pins()}
    assert {"nvshmem4py-cu13", "cuda-core", "cuda-pathfinder", "pytest", "openai", "msgspec", "aiohttp"} <= names
    assert not names & {"torch", "triton", "nvidia-nvshmem-cu13", "cuda-bindings"}  # the GPU machine has them
    assert all(v and v[0].isdigit() for _, v in _pins())
    extra = re.search(r"^gpu = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M)
    assert extra is not None
    gpu = re.findall(r'"([^"]+)"', extra.group(1))
    assert "nvshmem4py-cu13" in gpu and any(d.startswith("cuda-bindings") for d in gpu)
    assert not any("cu12" in d or d.startswith("cuda-python") for d in gpu)
    assert "wheels/" in (ROOT / ".gitignore").read_text().split()
