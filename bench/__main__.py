"""`python -m bench …`, the same commands as `pdbox bench …`."""

from __future__ import annotations

from bench.cli import main

if __name__ == "__main__":
    main()
