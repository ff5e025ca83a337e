"""Test helpers for engine faults: NaN logits injected for one request, and the check that an engine is idle
with every KV page back in its pool."""

from __future__ import annotations

from collections.abc import Callable

from appliance.engine.engine import Engine


def assert_idle(engine: Engine) -> None:
    """No request left, nothing scheduled, and (with the prefix cache emptied) every page free."""
    assert not engine.requests and not engine.has_unfinished()
    engine.cache.reset()
    assert engine.pool.num_free == engine.pool.num_pages, "KV pages leaked"


def poison(engine: Engine, victim: str, after: int, index: int | None = None) -> Callable[[], None]:
    """Make the model's logits NaN for ``victim``'s row (sample ``index`` only, if given) once it has
    ``after`` tokens; returns the undo."""
    real = engine.runner.step

    def step(sb, hook, extra, scoring):
        logits = real(sb, hook, extra, scoring).clone()
        rows = [r for r, s in zip(sb.requests, sb.sample) if s]
        for j, r in enumerate(rows):
            if ((r.group or r.request_id) == victim and len(r.output_ids) >= after
                    and (index is None or r.index == index)):
                logits[j] = float("nan")
        return logits

    engine.runner.step = step
    return lambda: setattr(engine.runner, "step", real)
