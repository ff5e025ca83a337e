"""The offline API: ``LLM(model).generate(prompts, SamplingParams)``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from appliance.config import EngineConfig
from appliance.engine.engine import Engine
from appliance.engine.request import Request, SamplingParams


@dataclass(frozen=True)
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    cached_len: int
    logprobs: list[dict[str, Any]]
    prompt_logprobs: list[dict[str, Any]] | None = None  # params.prompt_logprobs: entry j scores prompt token j + 1
    error: str | None = None  # finish_reason "error": why (the other prompts' completions are unaffected)


class LLM:
    """Generate completions in-process. ``model=None`` is the embedded SmolLM2-135M-Instruct."""

    def __init__(self, model: str | None = None, config: EngineConfig | None = None, **overrides: Any) -> None:
        cfg = config or EngineConfig()
        if overrides:
            cfg = replace(cfg, **overrides)
        self.engine = Engine(model, cfg)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | None = None) -> list[Completion]:
        """Raw prompts (no chat template); strings are tokenized, id lists are used as they are. With
        ``params.n > 1``, ``n`` completions per prompt, prompt after prompt (sample ``i``: seed + i)."""
        params = params or SamplingParams()
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = [self.tokenizer.encode_prompt(p) if isinstance(p, str) else list(p) for p in prompts]
        reqs = [self.engine.add_request(p, params) for p in ids]
        samples: dict[str, Request] = {}  # the forked samples (n > 1), seen when they are queued
        try:
            while any(not r.is_finished for r in reqs) or any(not s.is_finished for s in samples.values()):
                self.engine.step()
                samples.update((k, r) for k, r in self.engine.requests.items() if r.group is not None)
        except BaseException:
            for r in reqs:
                self.engine.abort(r.request_id)
            raise
        out = []
        for r in reqs:
            for i in range(params.n):
                # a request that failed before its samples were forked stands for all of them
                s = r if i == 0 else samples.get(f"{r.request_id}~{i}", r)
                scored = list(r.prompt_logprobs) if params.prompt_logprobs is not None else None
                out.append(Completion(s.prompt_ids, list(s.output_ids), s.text, s.finish_reason, s.cached_len,
                                      list(s.output_logprobs), scored, s.error))
        return out

    def chat(self, messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
             params: SamplingParams | None = None) -> list[Completion]:
        """Apply the model's chat template, then :meth:`generate`."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.tokenizer.encode_chat(c) for c in convs], params)  # type: ignore[arg-type]

    def close(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
