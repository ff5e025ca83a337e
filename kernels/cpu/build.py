"""Building pdbox's C kernels (the ``*.c`` files beside this one, with the ``*.h`` they share) with the
machine's C compiler on first use, and loading them with ctypes.

A library is cached under ``$PDBOX_CACHE_DIR`` (else ``$XDG_CACHE_HOME/pdbox``, else
``~/.cache/pdbox``), named by a hash of its source, flags and compiler, so an edit or another
compiler builds anew and every later process (each worker, each test) only loads it. Builds write a
temporary file and rename it into place, so workers starting together never load half a file.

Nothing here raises for a machine that cannot build or run a kernel: :func:`load` returns a
:class:`Native` whose ``lib`` is ``None`` and whose ``reason`` says why, and callers keep their torch
path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
BUILD_TIMEOUT_S = 120.0
# AVX-512 with the BF16 dot product (VDPBF16PS): Zen 4 and later, Intel Cooper Lake / Sapphire Rapids and later
AVX512_BF16_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")
AVX512_BF16_CFLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma")
# AVX2 with FMA: every x86 server since Zen 1 / Haswell
AVX2_FLAGS = ("avx2", "fma")
AVX2_CFLAGS = ("-mavx2", "-mfma")
# NOTE: no FMA contraction: the kernels say where they fuse (the rotary matches torch's separate ops)
CFLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-std=gnu11", "-ffp-contract=off")


@cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this machine's CPU (empty where /proc/cpuinfo is unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


@dataclass(frozen=True)
class Native:
    """A loaded kernel library, or why there is none."""

    lib: ctypes.CDLL | None
    path: Path | None
    reason: str

    def required(self, what: str) -> ctypes.CDLL:
        """The library, or ``RuntimeError`` naming ``what`` is unavailable and why."""
        if self.lib is None:
            raise RuntimeError(f"{what}: not available here ({self.reason})")
        return self.lib


def cache_dir() -> Path:
    if os.environ.get("PDBOX_CACHE_DIR"):
        return Path(os.environ["PDBOX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pdbox"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC") or "cc")


@cache
def _compiler_id(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return cc
    return f"{cc} {out.stdout.splitlines()[0] if out.stdout else ''}"


@cache
def load(name: str, needs: tuple[str, ...] = AVX512_BF16_FLAGS, cflags: tuple[str, ...] = AVX512_BF16_CFLAGS) -> Native:
    """``SOURCE_DIR/name.c`` built (or found built) and loaded; ``needs`` are the CPU flags it runs on."""
    missing = [f for f in needs if f not in cpu_flags()]
    if missing:
        return Native(None, None, f"this CPU lacks {', '.join(missing)}")
    cc = _compiler()
    if cc is None:
        return Native(None, None, f"no C compiler ({os.environ.get('CC') or 'cc'}) on PATH")
    source = SOURCE_DIR / f"{name}.c"
    flags = (*CFLAGS, *cflags)
    headers = b"".join(h.read_bytes() for h in sorted(SOURCE_DIR.glob("*.h")))
    digest = hashlib.sha256(source.read_bytes() + headers + " ".join(flags).encode() + _compiler_id(cc).encode())
    target = cache_dir() / f"{name}-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            try:
                done = subprocess.run([cc, *flags, "-o", tmp, str(source)], capture_output=True, text=True,
                                      timeout=BUILD_TIMEOUT_S)
                if done.returncode != 0:
                    return Native(None, None, f"{cc} failed on {source.name}: {done.stderr.strip()[-500:]}")
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return Native(None, None, f"could not build {source.name} into {target.parent}: {exc}")
    try:
        return Native(ctypes.CDLL(str(target)), target, f"built with {_compiler_id(cc)}")
    except OSError as exc:
        return Native(None, target, f"could not load {target}: {exc}")
