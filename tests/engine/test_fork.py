"""n > 1 in the engine: one prefill of the prompt, the samples share its full pages, sample i draws with
seed + i (the same tokens as a lone request with that seed), nothing leaks (finish, abort, inject)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from appliance.config import EngineConfig
from appliance.engine.engine import Engine
from appliance.engine.request import SamplingParams

PROMPT = [10, 20, 30, 40, 50, 60, 70, 80, 90, 11]  # 10 tokens: two full pages of 4, a partial one
P = SamplingParams(max_tokens=6, temperature=1.0, seed=41, ignore_eos=True, n=3)


@pytest.fixture(scope="module")
def engine(tiny_model) -> Engine:
    return Engine(str(tiny_model), EngineConfig(dtype="float32", page_size=4, num_pages=128))


def idle(engine: Engine) -> None:
    assert not engine.has_unfinished() and not engine.requests
    engine.cache.reset()
    assert engine.pool.num_free == engine.pool.num_pages, "KV pages leaked"


def run_group(engine: Engine, prompt: list[int], params: SamplingParams) -> dict[str, list[int]]:
    req = engine.add_request(prompt, params, request_id="g")
    outs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            key = o.group or o.request_id
            assert key == "g"
            outs.setdefault(f"{key}:{o.index}", []).extend(o.new_token_ids)
    assert req.is_finished
    return outs


def alone(engine: Engine, seed: int) -> list[int]:
    r = engine.add_request(PROMPT, replace(P, n=1, seed=seed))
    engine.run_until_done([r])
    return r.output_ids


def test_samples_share_one_prefill_and_draw_with_seed_plus_i(engine) -> None:
    idle(engine)
    before = engine.stats_prefill_tokens
    outs = run_group(engine, PROMPT, P)
    prefilled = engine.stats_prefill_tokens - before
    # the prompt once, then each other sample only its partial last page (10 - 8 = 2 tokens)
    assert prefilled == len(PROMPT) + 2 * 2, prefilled
    assert sorted(outs) == ["g:0", "g:1", "g:2"] and all(len(v) == 6 for v in outs.values())
    idle(engine)
    assert [outs[f"g:{i}"] for i in range(3)] == [alone(engine, 41 + i) for i in range(3)]
    assert len({tuple(v) for v in outs.values()}) > 1
    idle(engine)


def test_aborting_the_request_aborts_its_samples(engine) -> None:
    idle(engine)
    engine.add_request(PROMPT, replace(P, max_tokens=50), request_id="a")
    for _ in range(3):
        engine.step()
    assert {"a~1", "a~2"} <= set(engine.requests)
    assert engine.abort("a")
    assert not engine.requests and not engine.has_unfinished()
    idle(engine)


def test_samples_abort_before_admission_release_their_hold(engine) -> None:
    idle(engine)
    engine.add_request(PROMPT, replace(P, n=4), request_id="b")
    engine.step()  # prefill + fork: the samples wait, holding the prompt path
    assert {"b~1", "b~2", "b~3"} <= set(engine.requests)
    engine.abort("b")
    idle(engine)


def test_an_injected_request_forks_on_the_decode_side(engine) -> None:
    idle(engine)
    pages = engine.reserve_pages(len(PROMPT))
    assert pages is not None
    # KV content does not matter for the page accounting checked here
    out = engine.inject(PROMPT, replace(P, n=2), pages, 5, None, "d")
    assert out.index == 0 and "d~1" in engine.requests
    while engine.has_unfinished():
        engine.step()
    idle(engine)


def test_with_the_prefix_cache_off_samples_prefill_again(tiny_model) -> None:
    eng = Engine(str(tiny_model), EngineConfig(dtype="float32", page_size=4, num_pages=64,
                                               enable_prefix_cache=False))
    outs = run_group(eng, PROMPT, replace(P, n=2))
    assert sorted(outs) == ["g:0", "g:1"]
    idle(eng)


def test_the_offline_api_returns_n_completions_per_prompt(tiny_model) -> None:
    from appliance.llm import LLM

    with LLM(str(tiny_model), EngineConfig(dtype="float32", page_size=4, num_pages=64)) as llm:
        outs = llm.generate([PROMPT, PROMPT[:5]], replace(P, n=2, max_tokens=3))
        assert len(outs) == 4 and all(len(o.token_ids) == 3 for o in outs)
        assert outs[0].prompt_ids == PROMPT and outs[2].prompt_ids == PROMPT[:5]
        assert not llm.engine.requests


def test_every_sample_keeps_the_constraint(engine) -> None:
    import re

    from appliance.engine.constraint import Constraint

    idle(engine)
    pattern = "[a-m]{3}-[n-z]{3}"
    req = engine.add_request(PROMPT, replace(P, n=3, max_tokens=20, constraint=Constraint.regex(pattern)),
                             request_id="c")
    kids = []
    while engine.has_unfinished():
        engine.step()
        kids += [r for k, r in engine.requests.items() if r.group == "c" and r not in kids]
    assert len(kids) == 2 and all(r.matcher is not None for r in kids)
    for r in (req, *kids):
        assert re.fullmatch(pattern, r.text) and r.finish_reason == "stop", r.text
    idle(engine)
