"""The paged, batched engine equals a naive full-recompute forward, token for token (greedy)."""

from __future__ import annotations

import pytest

from appliance.config import EngineConfig
from appliance.engine.engine import Engine
from appliance.engine.request import SamplingParams
from tests.engine.reference import NaiveLlama


def run(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    engine.run_until_done(reqs)
    return [r.output_ids for r in reqs]


def assert_no_leak(engine: Engine) -> None:
    engine.cache.reset()
    assert engine.pool.num_free == engine.pool.num_pages, "KV pages leaked"


def tiny_prompts(n: int = 8) -> list[list[int]]:
    system = [5 + (i * 7) % 250 for i in range(21)]  # a shared "system prompt" of 21 tokens
    return [system + [3 + (j * 13 + i) % 250 for j in range(1 + 5 * i)] for i in range(n)]


@pytest.mark.parametrize("page_size,num_pages", [(4, 400), (4, 36), (8, 12)])
def test_tiny_engine_equals_naive_reference(tiny_model, page_size: int, num_pages: int) -> None:
    """Chunked prefill (16-token budget), prefix hits, and a pool small enough to force preemption."""
    prompts = tiny_prompts()
    ref = NaiveLlama(str(tiny_model))
    expected = [ref.greedy(p, 12) for p in prompts]
    cfg = EngineConfig(dtype="float32", page_size=page_size, num_pages=num_pages, max_prefill_tokens=16)
    engine = Engine(str(tiny_model), cfg)
    warm = run(engine, prompts[:1], 12)  # leaves the shared prefix in the radix cache
    assert warm[0] == expected[0]
    assert run(engine, prompts, 12) == expected
    assert engine.cache.hit_tokens > 0, "the shared system prompt never hit the prefix cache"
    if num_pages < 100:
        assert engine.scheduler.num_preemptions > 0, "the small pool was meant to force preemption"
    assert_no_leak(engine)


def test_qwen2_bias_and_tied_embeddings(tmp_path) -> None:
    from appliance.model.tiny import write_tiny_model

    folder = write_tiny_model(tmp_path / "qwen", arch="Qwen2ForCausalLM", tie_embeddings=True, kv_heads=1)
    prompts = tiny_prompts(3)
    ref = NaiveLlama(str(folder))
    engine = Engine(str(folder), EngineConfig(dtype="float32", page_size=4, num_pages=200, max_prefill_tokens=16))
    assert run(engine, prompts, 6) == [ref.greedy(p, 6) for p in prompts]
    assert_no_leak(engine)


@pytest.mark.slow
def test_smollm2_engine_equals_naive_reference(smollm_path) -> None:
    engine = Engine(str(smollm_path), EngineConfig(dtype="float32", page_size=16, num_pages=20,
                                                   max_prefill_tokens=16, threads=2))
    tok = engine.tokenizer
    questions = ["What is the capital of France?", "Name a color.", "Say hi.", "What is 2+2?",
                 "Write a haiku about the sea.", "Who wrote Hamlet?", "List three fruits.", "Why is the sky blue?"]
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    ref = NaiveLlama(str(smollm_path))
    expected = [ref.greedy(p, 8) for p in prompts]
    run(engine, prompts[:1], 8)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    while not any(len(r.output_ids) >= 3 for r in reqs):
        engine.step()
    # Force a preemption mid-decode: the victim is recomputed from its prompt plus its 3+ tokens.
    victim = next(r for r in reqs if len(r.output_ids) >= 3)
    engine.scheduler.preempt(victim)
    engine.run_until_done(reqs)
    assert [r.output_ids for r in reqs] == expected
    assert victim.num_preemptions == 1
    assert engine.cache.hit_tokens > 0
    assert_no_leak(engine)
