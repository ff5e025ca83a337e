"""Structured outputs: what a constraint costs. ``python -m bench.structured [--batch 16] [--steps 24]``.

Reports (medians; this machine has other work on it):

- compile: the llguidance tokenizer (once per engine), the router's check of a schema (once per
  distinct schema, cached after), a matcher's compilation (once per schema per engine) and the copy
  each request gets;
- per step at ``--batch`` rows, every row constrained: building the token mask, applying it to the
  logits and feeding the sampled tokens to the matchers, replayed over the matcher states real
  constrained answers pass through; set against the engine's decode step at the same batch,
  unconstrained and constrained (the same sampling otherwise: temperature 0.8, a seed per row).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from appliance.cli_support import HELP_OPTIONS, run_command

SCHEMA = {  # the nested shape the tests ask for through the openai client
    "$defs": {"Country": {"type": "object", "additionalProperties": False, "required": ["name", "continent"],
                          "properties": {"name": {"type": "string", "maxLength": 24},
                                         "continent": {"type": "string", "maxLength": 24}}}},
    "type": "object", "additionalProperties": False, "required": ["city", "country"],
    "properties": {"city": {"type": "string", "maxLength": 24}, "country": {"$ref": "#/$defs/Country"}},
}
QUESTIONS = ["What is the capital of France?", "What is the capital of Japan?", "What is the capital of Peru?",
             "What is the capital of Kenya?", "What is the capital of Italy?", "What is the capital of Canada?",
             "What is the capital of Egypt?", "What is the capital of India?"]


def median_ms(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def full_batch_steps(engine, reqs) -> list[float]:
    """Seconds of each decode step while all of ``reqs`` are running (prefilled first, untimed)."""
    while any(not r.output_ids for r in reqs):
        engine.step()
    times = []
    while all(not r.is_finished for r in reqs):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    while engine.has_unfinished():
        engine.step()
    engine.cache.reset()
    return times


@click.command(help=__doc__.split("\n\n")[0], context_settings=HELP_OPTIONS)
@click.option("--model", default=None, help="GGUF file or HF folder (default: the embedded SmolLM2)")
@click.option("--batch", type=int, default=16)
@click.option("--steps", type=int, default=24, help="decode steps per request (max_tokens)")
@click.option("--threads", type=int, default=1, help="torch threads (a pdbox CPU worker uses one per core)")
@click.option("--json", "json_path", default=None, help="also write the figures to this file")
def command(model: str | None, batch: int, steps: int, threads: int, json_path: str | None) -> dict[str, Any]:
    import llguidance

    from appliance.config import EngineConfig
    from appliance.engine.constraint import Constraint, _grammar, grammar_error
    from appliance.engine.engine import Engine
    from appliance.engine.grammar import GrammarCompiler
    from appliance.engine.request import SamplingParams

    engine = Engine(model, EngineConfig(threads=threads))
    vocab = engine.model_config.vocab_size
    spec = json.dumps(SCHEMA)
    out: dict[str, Any] = {"model": engine.model_name, "vocab": vocab, "batch": batch, "threads": threads}

    # -- compile ---------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    GrammarCompiler(engine.tokenizer, vocab, engine.eos_ids).ll_tokenizer  # noqa: B018
    out["ll_tokenizer_ms"] = 1e3 * (time.perf_counter() - t0)

    def check_uncached() -> None:
        _grammar.cache_clear()
        grammar_error.cache_clear()
        Constraint("json_schema", spec)

    out["router_check_ms"] = median_ms(check_uncached, 20)
    constraint = Constraint("json_schema", spec)
    ll = engine.grammars.ll_tokenizer
    grammar = constraint.grammar()
    out["matcher_compile_ms"] = median_ms(lambda: llguidance.LLMatcher(ll, grammar, log_level=0), 20)
    engine.grammars.matcher(constraint)
    out["matcher_copy_ms"] = median_ms(lambda: engine.grammars.matcher(constraint), 200)

    # -- the decode step at the batch, unconstrained and constrained -----------------------------------
    prompts = [engine.tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] +
                                              " Answer in JSON."}]) for i in range(batch)]
    def params(i: int, c: Constraint | None) -> SamplingParams:  # the same sampling, with and without
        return SamplingParams(max_tokens=steps, temperature=0.8, seed=i, ignore_eos=True, constraint=c)

    plain = full_batch_steps(engine, [engine.add_request(p, params(i, None)) for i, p in enumerate(prompts)])
    held = [engine.add_request(p, params(i, constraint)) for i, p in enumerate(prompts)]
    constrained = full_batch_steps(engine, held)
    out["decode_step_ms"] = 1e3 * statistics.median(plain)
    out["decode_step_constrained_ms"] = 1e3 * statistics.median(constrained)
    out["steps_timed"] = [len(plain), len(constrained)]

    # -- the mask alone, over the states those answers went through ------------------------------------
    import torch

    answers = [r.output_ids for r in held]
    depth = min(len(a) for a in answers)
    logits = torch.randn(batch, vocab)
    build, apply, feed = [], [], []
    for _ in range(3):
        matchers = [engine.grammars.matcher(constraint) for _ in answers]
        for k in range(depth):
            t0 = time.perf_counter()
            mask = engine.grammars.mask(matchers)
            t1 = time.perf_counter()
            mask.apply(logits)
            t2 = time.perf_counter()
            for m, a in zip(matchers, answers):
                m.consume_token(a[k])
            t3 = time.perf_counter()
            build.append(t1 - t0)
            apply.append(t2 - t1)
            feed.append(t3 - t2)
    out["mask_build_ms"] = 1e3 * statistics.median(build)
    out["mask_apply_ms"] = 1e3 * statistics.median(apply)
    out["consume_ms"] = 1e3 * statistics.median(feed)
    total = out["mask_build_ms"] + out["mask_apply_ms"] + out["consume_ms"]
    out["mask_total_ms"] = total
    out["mask_share_of_decode_step"] = total / out["decode_step_ms"]
    out["answers_valid_json"] = sum(_is_json(engine.tokenizer.decode(a)) for a in answers)
    engine.shutdown()

    print(f"model {out['model']}  vocab {vocab}  batch {batch}  torch threads {threads}")
    print(f"compile: llguidance tokenizer {out['ll_tokenizer_ms']:.0f} ms (once per engine); router schema check "
          f"{out['router_check_ms']:.2f} ms; matcher compile {out['matcher_compile_ms']:.2f} ms (once per schema); "
          f"per-request copy {out['matcher_copy_ms']:.3f} ms")
    print(f"per step, {batch} constrained rows: mask build {out['mask_build_ms']:.2f} ms + apply "
          f"{out['mask_apply_ms']:.2f} ms + consume {out['consume_ms']:.2f} ms = {total:.2f} ms")
    print(f"decode step at batch {batch}: {out['decode_step_ms']:.1f} ms unconstrained, "
          f"{out['decode_step_constrained_ms']:.1f} ms constrained ({len(plain)}/{len(constrained)} steps timed)")
    print(f"masking = {100 * out['mask_share_of_decode_step']:.1f}% of the decode step (target <= 10%); "
          f"{out['answers_valid_json']}/{batch} answers complete JSON within {steps} tokens")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)
    return out


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.structured ARGS``; returns the exit status (2: a bad option)."""
    return run_command(command, argv, "python -m bench.structured")


if __name__ == "__main__":
    sys.exit(main())
