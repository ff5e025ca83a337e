"""The chaos tier: bad input, fuzzing, injected faults, overload and security against real `pdbox up`
processes. Two appliances serve the whole tier (each start loads the model twice, ~20 s), so tests
leave them as they found them: idle pools, healthy workers.

The tier's figures (inputs tried, 5xx seen, faults survived, slowest failure) are printed at the end
of the run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.chaos.chaos_util import API_KEY, Appliance, appliance

FIGURES: dict[str, float] = {}


def record(name: str, value: float, how: str = "add") -> None:
    """Add to (or keep the max of) one of the tier's figures."""
    if how == "max":
        FIGURES[name] = max(FIGURES.get(name, 0.0), value)
    else:
        FIGURES[name] = FIGURES.get(name, 0.0) + value


def pytest_terminal_summary(terminalreporter) -> None:
    if FIGURES:
        terminalreporter.write_sep("-", "chaos figures")
        for k in sorted(FIGURES):
            terminalreporter.write_line(f"{k}: {FIGURES[k]:g}")


@pytest.fixture(scope="package")  # stopped once the tier is done, not at the end of `make test`
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    """Disaggregated over shm, an API key (from PDBOX_API_KEY), at most 4 requests in flight."""
    with appliance("--max-inflight", "4", key=API_KEY, log_dir=tmp_path_factory.mktemp("guarded-logs")) as app:
        yield app
