"""Constrained decoding in the engine (the tiny random model, byte tokens): answers match their grammar,
end with ``stop`` when it is complete, leave unconstrained neighbours unchanged, and a matcher
rebuilt from the tokens so far (decode after prefill, a moved decode) is in the same state."""

from __future__ import annotations

import json
import re

import pytest

from appliance.config import EngineConfig
from appliance.engine.constraint import Constraint
from appliance.engine.engine import Engine
from appliance.engine.request import SamplingParams

PROMPT = [10, 20, 30, 40, 50, 60, 70]
SCHEMA = {"type": "object", "properties": {"k": {"type": "string", "maxLength": 4}, "n": {"type": "boolean"}},
          "required": ["k", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(tiny_model) -> Engine:
    return Engine(str(tiny_model), EngineConfig(dtype="float32", page_size=4, num_pages=256))


def run(engine: Engine, params: SamplingParams, prompt: list[int] = PROMPT):
    req = engine.add_request(prompt, params)
    engine.run_until_done([req])
    return req


def test_regex_answer_matches_and_stops_when_complete(engine) -> None:
    req = run(engine, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                     constraint=Constraint.regex("[a-c]{5}")))
    assert re.fullmatch("[a-c]{5}", req.text), req.text
    assert req.finish_reason == "stop" and len(req.output_ids) == 5  # one byte token per character


def test_json_schema_answer_parses_and_fits_the_schema(engine) -> None:
    for params in (SamplingParams(max_tokens=64, temperature=0, constraint=Constraint.json_schema(SCHEMA)),
                   SamplingParams(max_tokens=64, temperature=1.0, seed=4, constraint=Constraint.json_schema(SCHEMA))):
        req = run(engine, params)
        assert req.finish_reason == "stop", req.text
        obj = json.loads(req.text)
        assert set(obj) == {"k", "n"} and len(obj["k"]) <= 4 and isinstance(obj["n"], bool)
        assert req.text.startswith('{"k": "'), req.text  # compact, Python's separators


def test_unconstrained_neighbours_are_unchanged(engine) -> None:
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = run(engine, plain).output_ids
    reqs = [engine.add_request(PROMPT, plain),
            engine.add_request(PROMPT, SamplingParams(max_tokens=12, temperature=0,
                                                      constraint=Constraint.regex("[0-9]{3,12}"))),
            engine.add_request([5, 6, 7], SamplingParams(max_tokens=12, temperature=0.9, seed=2,
                                                         constraint=Constraint.json_schema(SCHEMA)))]
    engine.run_until_done(reqs)
    assert reqs[0].output_ids == alone
    assert re.fullmatch("[0-9]{3,12}", reqs[1].text), reqs[1].text


def test_a_rebuilt_matcher_continues_where_the_first_left_off(engine) -> None:
    c = Constraint.json_schema(SCHEMA)
    full = run(engine, SamplingParams(max_tokens=64, temperature=0, constraint=c)).output_ids
    assert engine.grammars.matcher(c) is not engine.grammars.matcher(c)  # a fresh copy per request
    for k in (1, len(full) // 2, len(full) - 1):
        m = engine.grammars.matcher(c, replay=full[:k])
        mask = engine.grammars.mask([m])
        assert bool(mask.allowed(engine.model_config.vocab_size)[0, full[k]])
    with pytest.raises(ValueError, match="do not match"):
        engine.grammars.matcher(c, replay=[ord("x") + 3])  # a byte token that cannot start an object


def test_inject_replays_the_earlier_tokens(engine) -> None:
    """What the decode side does after a handoff or a move: the same continuation as on one engine."""
    c = Constraint.regex("[a-z]{4}-[0-9]{4}")
    params = SamplingParams(max_tokens=20, temperature=0, constraint=c)
    whole = run(engine, params)
    split = 5  # pages without KV: nothing steps here, only the matcher's state is compared
    pages = engine.reserve_pages(len(PROMPT) + split)
    assert pages is not None
    out = engine.inject(PROMPT, params, pages, whole.output_ids[split - 1], None, "inj-1",
                        earlier=whole.output_ids[:split - 1])
    req = engine.requests.get("inj-1")
    assert not out.finished and req is not None and req.matcher is not None
    m = engine.grammars.matcher(c, replay=whole.output_ids[:split])
    assert engine.grammars.mask([req.matcher]).bitmask.equal(engine.grammars.mask([m]).bitmask)
    engine.abort("inj-1")
