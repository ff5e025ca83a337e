"""The GPU check's install step keeps the machine's own packages, except those the check needs newer
(`scripts/wheel_status.py`, called by `scripts/gpu-check.sh`'s install step)."""

from __future__ import annotations

import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "wheel_status.py"), *args], capture_output=True,
                          text=True, timeout=60)


def test_present_older_and_missing() -> None:
    have = metadata.version("pytest-timeout")
    assert status("pytest-timeout", have, "1").stdout.strip() == "present"
    assert status("pytest-timeout", "999.0", "1").stdout.strip() == "older"  # carried: the check installs its own
    assert status("pytest-timeout", "999.0", "0").stdout.strip() == "present"  # not carried: the machine's stays
    assert status("pdbox-no-such-distribution", "1.0", "1").stdout.strip() == "missing"


def test_versions_compare_by_their_numbers() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from wheel_status import release
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert release("2.4.0") == (2, 4, 0) and release("2.10") > release("2.9") and release("1.2rc1") == (1, 2)
    assert release("2.3") < release("2.3.0") < release("2.4.0")


def test_bad_arguments_are_a_usage_error() -> None:
    bad = status("pytest-timeout", "1.0")
    assert bad.returncode == 64 and "usage" in bad.stderr
