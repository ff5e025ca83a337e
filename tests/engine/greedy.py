"""The whole engine's greedy tokens on one backend, for backend-equality tests."""

from __future__ import annotations


def tiny_greedy(model: str, backend: str, num_prompts: int, max_tokens: int) -> list[list[int]]:
    """Greedy tokens of the whole engine on one backend: chunked prefill (8-token budget), a shared
    9-token prefix (a prefix hit), batched decode."""
    from appliance.config import EngineConfig
    from appliance.engine.engine import Engine
    from appliance.engine.request import SamplingParams

    system = [5 + (i * 7) % 250 for i in range(9)]
    prompts = [system + [3 + (j * 13 + i) % 250 for j in range(1 + 4 * i)] for i in range(num_prompts)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    cfg = EngineConfig(dtype="float32", page_size=4, num_pages=64, max_prefill_tokens=8, attention_backend=backend)
    engine = Engine(model, cfg)
    assert engine.runner.backend.name == backend
    reqs = [engine.add_request(p, params) for p in prompts]
    engine.run_until_done(reqs)
    engine.shutdown()
    return [r.output_ids for r in reqs]
