"""Prompt logprobs in the engine: each prompt token's logprob given the tokens before it equals what a
run of the same model over that prefix alone reports (top alternatives too); chunked prefill, a cached
prefix and n > 1 change nothing; a request recomputed after preemption scores only what it has not."""

from __future__ import annotations

import pytest

from appliance.config import EngineConfig
from appliance.engine.prompt_logprobs import MAX_SCORED_ROWS, positions, scorable_prefix
from appliance.engine.request import Request, SamplingParams
from appliance.llm import LLM

SEED = [5, 9, 13, 2, 7, 7, 30, 11]


def prompt_of(llm: LLM) -> list[int]:
    """SEED and the model's greedy continuation: half the prompt's tokens are its top choice."""
    c = llm.generate([SEED], SamplingParams(max_tokens=15, temperature=0, ignore_eos=True))[0]
    return SEED + c.token_ids


def reference(llm: LLM, prompt: list[int]) -> list[list[tuple[int, float]]]:
    """The top-20 (id, logprob) after each prefix ``prompt[:j]``, j >= 1, each prefix run on its own."""
    out = []
    for j in range(1, len(prompt)):
        c = llm.generate([prompt[:j]], SamplingParams(max_tokens=1, temperature=0, logprobs=20))[0]
        out.append(c.logprobs[0]["top"])
    return out


def check(got: list[dict], ref: list[list[tuple[int, float]]], prompt: list[int]) -> None:
    assert [e["token_id"] for e in got] == prompt[1:]
    inside = 0
    for e, top in zip(got, ref, strict=True):
        assert [t for t, _ in e["top"]] == [t for t, _ in top[:3]]
        assert [v for _, v in e["top"]] == pytest.approx([v for _, v in top[:3]], abs=1e-4)
        by_id = dict(top)
        if e["token_id"] in by_id:
            assert e["logprob"] == pytest.approx(by_id[e["token_id"]], abs=1e-4)
            inside += 1
        else:  # past the top 20: below its last
            assert e["logprob"] <= top[-1][1] + 1e-4
    assert inside >= len(got) // 2  # the greedy tail of the prompt is the model's own choice


def test_prompt_logprobs_match_token_by_token_scoring(tiny_model) -> None:
    cfg = EngineConfig(dtype="float32", page_size=4, num_pages=256, threads=1, max_prefill_tokens=8,
                       enable_prefix_cache=False)
    with LLM(str(tiny_model), cfg) as llm:
        prompt = prompt_of(llm)
        ref = reference(llm, prompt)
        params = SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=3)
        (c,) = llm.generate([prompt], params)  # three chunks of 8
        check(c.prompt_logprobs, ref, prompt)
        plain = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0))[0]
        assert c.token_ids == plain.token_ids and plain.prompt_logprobs is None
        two = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=1.0, seed=4, n=2, prompt_logprobs=3))
        check(two[0].prompt_logprobs, ref, prompt)  # the prompt is scored once, for the request


def test_a_cached_prefix_is_recomputed_for_scoring(tiny_model) -> None:
    cfg = EngineConfig(dtype="float32", page_size=4, num_pages=256, threads=1, max_prefill_tokens=8)
    with LLM(str(tiny_model), cfg) as llm:
        prompt = prompt_of(llm)
        ref = reference(llm, prompt)
        llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0))  # the prompt's pages cached
        (c,) = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3))
        assert c.cached_len == 0
        check(c.prompt_logprobs, ref, prompt)
        (again,) = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
        assert again.cached_len > 0  # plain requests still hit the cache


def test_bad_prompt_logprobs_are_named() -> None:
    with pytest.raises(ValueError, match="prompt_logprobs must be between 0 and 20"):
        SamplingParams(prompt_logprobs=21)


def test_a_recomputed_request_scores_only_what_it_has_not() -> None:
    req = Request(prompt_ids=list(range(10)), params=SamplingParams(prompt_logprobs=0))
    assert positions(req, 0, 4) == range(0, 4) and scorable_prefix(req) == 0  # no cached prefix
    req.prompt_logprobs = [{}] * 4  # positions 0..3 scored, then preempted
    assert scorable_prefix(req) == 4  # the cache may give back what was scored, no more
    assert positions(req, 0, 8) == range(4, 8) and positions(req, 8, 4) == range(8, 9)  # 9 predicts no prompt token
    req.prompt_logprobs = [{}] * 9
    assert scorable_prefix(req) is None and positions(req, 0, 10) == range(9, 9)
    plain = Request(prompt_ids=list(range(10)), params=SamplingParams())
    assert positions(plain, 0, 10) == range(0) and scorable_prefix(plain) is None


def test_a_scoring_prompt_prefills_in_chunks_of_at_most_512() -> None:
    cfg = EngineConfig(dtype="float32", page_size=16, num_pages=512, threads=1, max_prefill_tokens=2048)
    with LLM("random:small", cfg) as llm:  # a 4096-token context
        engine = llm.engine
        ids = [5 + i % 200 for i in range(1500)]
        scored = engine.add_request(ids, SamplingParams(max_tokens=1, prompt_logprobs=0))
        plain = engine.add_request(ids[:900], SamplingParams(max_tokens=1))
        sb = engine.scheduler.schedule()
        assert sb.requests == [scored, plain] and sb.extend_lens == [MAX_SCORED_ROWS, 900]
        engine.abort(scored.request_id)
        engine.abort(plain.request_id)
