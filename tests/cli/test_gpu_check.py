"""The prepared device check, on CPU: `scripts/gpu-check.sh --dry-run` lists every step and every pinned
wheel, and fails when one is missing; the wheel list and the `gpu` extra name CUDA 13 packages."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("env", "install", "pdl-smoke", "pytest-gpu", "pytest-transport", "pytest-engine", "serve-cuda_ipc",
         "serve-nvshmem", "bench-kernels", "transfer-cuda_ipc", "transfer-nvshmem", "ttft-8k", "serve-cross-gpu",
         "serve-tp2-nccl")


def _pins(image: bool | None = None) -> list[tuple[str, str]]:
    """(name, version) of every pin; ``image``: only those marked ``# image`` (True) or only the others."""
    lines = (ROOT / "scripts" / "gpu-wheels.txt").read_text().splitlines()
    pins = [(ln.split("#")[0].strip(), "# image" in ln) for ln in lines]
    return [tuple(p.split("==")) for p, marked in pins if p and image in (None, marked)]  # type: ignore[misc]


def _dry_run(wheels: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "GPU_WHEELS_DIR": str(wheels),
                                                      "GPU_SITE_DIR": str(wheels / "site")})


def test_dry_run_lists_every_step_and_fails_on_missing_wheels(tmp_path: Path) -> None:
    r = _dry_run(tmp_path)
    assert r.returncode == 3, r.stderr
    for step in STEPS:
        assert re.search(rf"^  {re.escape(step)}\s", r.stdout, re.M), step
    for name, version in _pins(image=False):
        assert re.search(rf"MISSING\s+{re.escape(name)}=={re.escape(version)}\s", r.stdout), name
    for name, version in _pins(image=True):  # the machines' image has these: not carried, no error
        assert re.search(rf"image\s+{re.escape(name)}=={re.escape(version)}\s", r.stdout), name
    assert f"{len(_pins())} wheels, {len(_pins(image=False))} missing" in r.stdout


def test_dry_run_passes_without_the_image_wheels(tmp_path: Path) -> None:
    """The largest wheels (numpy, cuda-core, tokenizers) are in the machines' image: the rest must fit the
    64 MiB a device run carries with the work tree."""
    assert {"numpy", "cuda-core"} <= {n for n, _ in _pins(image=True)}
    for name, version in _pins(image=False):
        (tmp_path / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"")
    r = _dry_run(tmp_path)
    assert r.returncode == 0, r.stdout
    assert "0 missing" in r.stdout and "MISSING" not in r.stdout
    fetch = (ROOT / "scripts" / "fetch-gpu-wheels.sh").read_text()
    assert 'grep -v -- "# image"' in fetch and "manylinux_2_31_x86_64" in fetch  # llguidance's wheel tag


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


def test_every_project_dependency_is_pinned() -> None:
    """The GPU machine installs pdbox's dependencies only from this list (no registry there): a dependency
    added to pyproject but not pinned here fails every engine step at import (llguidance did)."""
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    assert block is not None
    deps = re.findall(r'^\s*"([A-Za-z0-9_.-]+)', block.group(1), re.M)
    assert "numpy" in deps and "llguidance" in deps

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    pinned = {norm(n) for n, _ in _pins()}
    assert not [d for d in deps if norm(d) not in pinned]


def test_gpu_pack_brings_a_check_back_as_one_archive(tmp_path: Path) -> None:
    """The device tool returns at most 8 files from $OUT: a check that writes 12 comes back as one archive
    and its summary, with the check's exit status."""
    import tarfile

    out, work = tmp_path / "out", tmp_path / "work"
    check = "for i in $(seq 12); do echo $i > $OUT/step-$i.log; done; echo all ok > $OUT/summary.txt; exit 5"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-pack.sh"), "check", "--", "bash", "-c", check],
                       capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "OUT": str(out), "GPU_PACK_WORK": str(work)})
    assert r.returncode == 5, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["check-progress.txt", "check-summary.txt", "check.tgz"]
    assert (out / "check-progress.txt").read_text() == ""  # no step of gpu-steps.sh ran
    assert (out / "check-summary.txt").read_text() == "all ok\n"
    with tarfile.open(out / "check.tgz") as tar:
        names = tar.getnames()
    assert len([n for n in names if n.startswith("check/step-")]) == 12 and "check/summary.txt" in names
    bad = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-pack.sh"), "a/b", "--", "true"], capture_output=True,
                         text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "OUT": str(out)})
    assert bad.returncode == 64 and "NAME must be" in bad.stderr


def test_a_check_killed_outright_still_says_how_far_it_got(tmp_path: Path) -> None:
    """SIGKILL leaves gpu-pack no EXIT trap to pack with: each step's row went to $OUT as the step ended, and
    the archive was packed again after each step."""
    import tarfile

    out, work = tmp_path / "out", tmp_path / "work"
    check = ("SUMMARY=(); FAILED=0; OUT_DIR=$OUT; BUDGET_S=60; START_S=$(date +%s); source scripts/gpu-steps.sh; "
             "run_step first 20 true; run_step second 20 false; kill -KILL $PPID $$")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-pack.sh"), "lease", "--", "bash", "-c", check],
                       cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "OUT": str(out), "GPU_PACK_WORK": str(work)})
    assert r.returncode == -9, r.stderr
    rows = (out / "lease-progress.txt").read_text().splitlines()
    assert [ln.split()[:2] for ln in rows] == [["first", "PASS"], ["second", "FAIL"]]
    with tarfile.open(out / "lease.tgz") as tar:
        assert {"lease/first.log", "lease/second.log"} <= set(tar.getnames())
    assert not list(out.glob(".*part"))  # each pack written aside, then renamed


def _steps(script: str, tmp_path: Path, budget: int = 60) -> subprocess.CompletedProcess[str]:
    """``script`` after sourcing scripts/gpu-steps.sh, then the summary rows and FAILED, one a line."""
    prelude = (f"set -u -o pipefail; OUT_DIR={tmp_path}; BUDGET_S={budget}; START_S=$(date +%s); SUMMARY=(); "
               "FAILED=0; STEPS_FILTER=${STEPS_FILTER:-}; source scripts/gpu-steps.sh; ")
    epilogue = '; printf "row %s\\n" "${SUMMARY[@]}"; echo "failed $FAILED"'
    return subprocess.run(["bash", "-c", prelude + script + epilogue], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "STEPS_FILTER": ""})


def _rows(r: subprocess.CompletedProcess[str]) -> dict[str, list[str]]:
    return {ln.split()[1]: ln.split()[2:] for ln in r.stdout.splitlines() if ln.startswith("row ")}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_step_passes_fails_or_times_out_and_a_spent_budget_fails_nothing(tmp_path: Path) -> None:
    r = _steps("run_step ok 20 true; run_step late 200 true; run_step bad 20 false; run_step slow 2 sleep 30",
               tmp_path)
    rows = _rows(r)
    assert rows["ok"][0] == "PASS" and rows["bad"][0] == "FAIL" and rows["slow"][0] == "TIMEOUT", r.stdout
    assert rows["late"][0] == "SKIP" and "under half its 200s" in " ".join(rows["late"]), r.stdout
    assert "failed 1" in r.stdout
    r = _steps("run_step missed 20 bash -c 'exit 3'", tmp_path)  # it ran; a target was missed
    assert _rows(r)["missed"][0] == "MISS" and "failed 1" in r.stdout, r.stdout
    r = _steps("run_step oom 20 bash -c 'kill -KILL $$'", tmp_path)  # killed long before its limit: not a timeout
    assert _rows(r)["oom"][0] == "KILLED" and "failed 1" in r.stdout, r.stdout
    r = _steps("run_step ok 20 true; run_step late 200 false", tmp_path)  # the skip alone fails nothing
    assert _rows(r)["late"][0] == "SKIP" and "failed 0" in r.stdout, r.stdout
    r = _steps("run_step bad 20 false; echo last $LAST_STATUS; run_step late 200 true; echo last $LAST_STATUS",
               tmp_path)  # what gpu-check reads after pdl-smoke
    assert [ln for ln in r.stdout.splitlines() if ln.startswith("last ")] == ["last FAIL", "last SKIP"], r.stdout
    r = _steps("STEPS_FILTER=b,c; run_step a 20 false; run_step b 20 true; run_step env 20 true", tmp_path)
    rows = _rows(r)
    assert rows["a"][0] == "SKIP" and rows["b"][0] == "PASS" and rows["env"][0] == "PASS", r.stdout
    assert "failed 0" in r.stdout
    r = _steps("STEPS_FILTER=b; ALWAYS_STEPS=env,pdl-smoke; run_step pdl-smoke 20 true; run_step env 20 true; "
               "run_step a 20 true", tmp_path)  # gpu-check's smoke step runs on every rerun
    rows = _rows(r)
    assert rows["pdl-smoke"][0] == "PASS" and rows["env"][0] == "PASS" and rows["a"][0] == "SKIP", r.stdout


def test_a_pytest_step_stopped_by_its_session_deadline_is_cut_not_failed(tmp_path: Path) -> None:
    """pytest-timeout exits 1 at its --session-timeout even when every test it started passed, and starts no
    more: that row is a CUT (the tests that ran counted), which fails nothing; a failed test stays a FAIL."""
    tests = tmp_path / "test_slow.py"
    tests.write_text("import time\n\n\ndef test_a():\n    time.sleep(1.2)\n\n\n"
                     "def test_b():\n    time.sleep(1.2)\n\n\ndef test_c():\n    assert {}\n")
    py = f"{sys.executable} -m pytest -p no:cacheprovider -q --timeout 20 --session-timeout 1"
    a, b, c = (f"{tests}::test_{n}" for n in "abc")
    r = _steps(f"run_step cut 20 {py} {a} {b}; run_step bad 20 {py} {c} {a} {b}", tmp_path)
    rows = _rows(r)
    assert rows["cut"][0] == "CUT" and "1 passed" in " ".join(rows["cut"]), r.stdout
    assert rows["bad"][0] == "FAIL" and "failed 1" in r.stdout, r.stdout
    r = _steps(f"run_step cut 20 {py} {a} {b}", tmp_path)
    assert _rows(r)["cut"][0] == "CUT" and "failed 0" in r.stdout, r.stdout


def test_steps_started_together_run_at_once_and_report_in_order(tmp_path: Path) -> None:
    """Two correctness steps share the GPU (STEP_BG=1): they run at the same time, each under its own limit,
    and `wait_steps` adds their rows in the order they started; a failure among them still fails the check."""
    r = _steps("t0=$(date +%s); STEP_BG=1 run_step slow 20 sleep 3; STEP_BG=1 run_step hung 1 sleep 30; "
               "STEP_BG=1 run_step bad 20 bash -c 'sleep 3; false'; wait_steps; echo took $(( $(date +%s) - t0 )); "
               "run_step after 20 true", tmp_path)
    rows = [ln.split()[1:3] for ln in r.stdout.splitlines() if ln.startswith("row ")]
    assert rows == [["slow", "PASS"], ["hung", "TIMEOUT"], ["bad", "FAIL"], ["after", "PASS"]], r.stdout + r.stderr
    took = int(next(ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("took ")))
    assert took < 6, r.stdout  # at once: about the longest (3 s), not the sum (7 s)
    assert "failed 1" in r.stdout and not list(tmp_path.glob("*.row"))


def test_what_a_step_leaves_running_is_stopped_after_it(tmp_path: Path) -> None:
    """A check killed by its timeout cannot stop the `pdbox up` it started in a session of its own (it
    would hold the GPU through the steps after it): the runner stops whatever carries the step's marker."""
    pids = tmp_path / "pids"
    r = _steps(f"run_step quick 20 bash -c 'setsid sleep 300 & echo $! >> {pids}'; "
               f"run_step hung 3 bash -c 'setsid sleep 300 & echo $! >> {pids}; sleep 60'", tmp_path)
    rows = _rows(r)
    assert rows["quick"][0] == "PASS" and rows["hung"][0] == "TIMEOUT", r.stdout + r.stderr
    left = [int(p) for p in pids.read_text().split()]
    assert len(left) == 2 and not [p for p in left if _alive(p)]
    for name in ("quick", "hung"):
        assert "stopped 1 process(es) it left running" in (tmp_path / f"{name}.log").read_text()


def test_the_lease_runs_both_checks_in_one_call(tmp_path: Path) -> None:
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-lease.sh"), "--dry-run"], capture_output=True, text=True,
                       timeout=60, env={"PATH": "/usr/bin:/bin", "GPU_WHEELS_DIR": str(tmp_path),
                                        "GPU_LEASE_BUDGET_S": "500", "GPU_LEASE_ENGINE_S": "150"})
    assert r.returncode == 3, r.stdout  # no wheel in tmp_path: gpu-check's dry run says so
    assert "gpu-check.sh with 350s" in r.stdout and "budget=350s" in r.stdout
    assert "gpu-engine-check.sh with what is left (>= 150s)" in r.stdout
    # the engine's tests run in gpu-check beside the others: the engine check its benches
    assert "steps bench-8b,bench-1b,bench-8b-nopdl,bench-1b-nopdl (its tests run in gpu-check" in r.stdout
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-lease.sh")], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "GPU_LEASE_BUDGET_S": "100", "OUT": str(tmp_path / "o")})
    assert r.returncode == 64 and "too little" in r.stderr
    readme = (ROOT / "docs" / "bench" / "gpu" / "README.md").read_text()
    assert "bash scripts/gpu-pack.sh lease -- bash scripts/gpu-lease.sh" in readme
