"""A decode engine takes handed-over requests in as their KV lands (``Engine.inject``), past
``max_running``: at most ``max_running`` of them decode in a step (on a GPU the largest captured graph;
a larger batch ran eagerly and compiled while serving), and they take turns, so none stalls."""

from __future__ import annotations

from appliance.config import EngineConfig
from appliance.engine.engine import Engine
from appliance.engine.request import SamplingParams


def test_injected_requests_past_max_running_take_turns() -> None:
    engine = Engine("random:tiny", EngineConfig(device="cpu", dtype="float32", max_running=2, num_pages=64,
                                                page_size=16))
    params = SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)
    reqs = []
    for i in range(5):
        ids = [5 + i, 6, 7]
        engine.inject(ids, params, engine.reserve_pages(len(ids)), 9, None, f"r{i}")
        reqs.append(engine.requests[f"r{i}"])
    batches: list[list[str]] = []
    schedule = engine.scheduler.schedule

    def recorded():  # type: ignore[no-untyped-def]
        sb = schedule()
        if sb is not None:
            batches.append([r.request_id for r in sb.requests])
        return sb

    engine.scheduler.schedule = recorded  # type: ignore[method-assign]
    for _ in range(100):
        if not engine.has_unfinished():
            break
        engine.step()
    assert all(len(r.output_ids) == 7 and r.finish_reason == "length" for r in reqs)
    assert batches and max(len(b) for b in batches) == 2
    # turns: after every step, no request has decoded two steps more than another still running
    done: dict[str, int] = {r.request_id: 0 for r in reqs}
    for b in batches:
        for rid in b:
            done[rid] += 1
        live = [n for n in done.values() if n < 6]  # 6 decode steps each: the first token came with the KV
        assert not live or max(live) - min(live) <= 1, (done, batches)
    assert len(batches) == 15  # 5 x 6 decodes, 2 a step
    assert engine.pool.num_free == engine.pool.num_pages  # no page leaks


def test_a_step_never_outgrows_the_largest_graph() -> None:
    """With CUDA graphs the engine lowers ``max_decode`` to the largest captured bucket (here by hand: no
    GPU): five requests within ``max_running`` decode three at a time, and answer as they would together."""
    def run(max_decode: int) -> tuple[list[list[int]], int]:
        engine = Engine("random:tiny", EngineConfig(device="cpu", dtype="float32", max_running=8, num_pages=64,
                                                    page_size=16))
        engine.scheduler.max_decode = max_decode
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        reqs = [engine.add_request([5 + i, 6, 7], params) for i in range(5)]
        schedule, decodes = engine.scheduler.schedule, []

        def recorded():  # type: ignore[no-untyped-def]
            sb = schedule()
            if sb is not None and sb.decode_only:
                decodes.append(len(sb.requests))
            return sb

        engine.scheduler.schedule = recorded  # type: ignore[method-assign]
        while engine.has_unfinished():
            engine.step()
        return [r.output_ids for r in reqs], max(decodes)

    together, widest = run(8)
    turns, narrow = run(3)
    assert widest == 5 and narrow == 3 and turns == together
