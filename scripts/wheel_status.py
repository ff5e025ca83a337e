"""Does this python have a pinned distribution, at least at its pin? For scripts/gpu-check.sh's install step.

    python3 scripts/wheel_status.py NAME VERSION CARRIED   # prints present, older or missing

``present``: installed at VERSION or newer, or at any version when no wheel was carried (CARRIED 0: the
machine's own stays). ``older``: installed below VERSION with the wheel carried: the check installs it
into its own site, which comes first on PYTHONPATH (e.g. the check's `--session-timeout` needs
pytest-timeout 2.3). ``missing``: not installed. Standard library only: it runs before any install.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys


def release(version: str) -> tuple[int, ...]:
    """The leading numbers of a version: ``"2.4.0"`` -> (2, 4, 0); ``"1.2rc1"`` -> (1, 2)."""
    head = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(x) for x in head.group(0).split(".")) if head else ()


def status(name: str, pin: str, carried: bool) -> str:
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"
    return "older" if carried and release(have) < release(pin) else "present"


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[2] not in ("0", "1"):
        print("usage: wheel_status.py NAME VERSION CARRIED(0|1)", file=sys.stderr)
        return 64
    print(status(argv[0], argv[1], argv[2] == "1"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
