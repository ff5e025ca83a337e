"""Logits of pdbox's whole engine (paged KV, chunked prefill, prefix cache) beside transformers' forward.

pdbox runs a prompt, then a second prompt that shares its first pages (a prefix-cache hit), each for a
prefill and ``DECODE_STEPS`` greedy decode steps; transformers runs the same tokens through its own KV
cache (prefill, then one token at a time), and the two logit sequences are compared step by step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

DECODE_STEPS = 8
# Relative to the largest reference logit: fp32 on both sides, different summation orders.
REL_TOL = 1e-4


@dataclass
class Run:
    """One request: its prompt, pdbox's greedy tokens and the logits each was sampled from."""

    prompt: list[int]
    tokens: list[int]
    logits: torch.Tensor  # (1 + DECODE_STEPS, vocab)
    cached_len: int


def prompts(vocab: int, length: int = 13, shared: int = 9, seed: int = 0) -> list[list[int]]:
    """Two prompts of ``length`` tokens sharing their first ``shared`` (a prefix hit on 4-token pages)."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(3, vocab, (length,), generator=g).tolist()
    second = first[:shared] + torch.randint(3, vocab, (length - shared,), generator=g).tolist()
    return [first, second]


def pdbox_runs(folder: Path, prompt_ids: list[list[int]], backend: str = "cpu", tp_size: int = 1) -> list[Run]:
    """Each prompt through pdbox's Engine in turn (fp32, 4-token pages, 8-token prefill chunks)."""
    from appliance.config import EngineConfig
    from appliance.engine.engine import Engine
    from appliance.engine.request import SamplingParams

    cfg = EngineConfig(dtype="float32", page_size=4, num_pages=64, max_prefill_tokens=8,
                       attention_backend=backend, tp_size=tp_size)
    engine = Engine(str(folder), cfg)
    rows: list[torch.Tensor] = []
    forward = engine.runner.forward

    def spy(*args, **kwargs):  # keep every sampled row's logits
        out = forward(*args, **kwargs)
        rows.extend(out.clone())
        return out

    engine.runner.forward = spy
    params = SamplingParams(max_tokens=1 + DECODE_STEPS, temperature=0, ignore_eos=True)
    runs = []
    try:
        for ids in prompt_ids:
            rows.clear()
            req = engine.add_request(ids, params)
            engine.run_until_done([req])
            runs.append(Run(ids, list(req.output_ids), torch.stack(rows), req.cached_len))
    finally:
        engine.shutdown()
    return runs


@torch.inference_mode()
def hf_logits(model: torch.nn.Module, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """transformers' logits for the prompt's last position, then for each of ``tokens[:-1]`` fed in turn."""
    out = model(torch.tensor([prompt]), use_cache=True)
    rows, past = [out.logits[0, -1]], out.past_key_values
    for t in tokens[:-1]:
        out = model(torch.tensor([[t]]), past_key_values=past, use_cache=True)
        rows.append(out.logits[0, -1])
        past = out.past_key_values
    return torch.stack(rows).float()


def compare(folder: Path, model: torch.nn.Module, vocab: int, backend: str = "cpu", tp_size: int = 1) -> float:
    """Run both and check them: greedy tokens equal, logits within ``REL_TOL``, the second prompt a
    prefix-cache hit. Returns the largest relative difference seen."""
    runs = pdbox_runs(folder, prompts(vocab), backend, tp_size)
    assert runs[1].cached_len > 0, "the second prompt should reuse the first one's cached pages"
    worst = 0.0
    for run in runs:
        ref = hf_logits(model, run.prompt, run.tokens)
        assert run.logits.shape == ref.shape
        rel = float((run.logits - ref).abs().max() / ref.abs().max().clamp(min=1.0))
        worst = max(worst, rel)
        assert rel < REL_TOL, f"logits differ from transformers by {rel:.2e} (relative) > {REL_TOL}"
        assert run.tokens == ref.argmax(-1).tolist(), "greedy tokens differ from transformers'"
    return worst
