"""Penalties in the engine: a greedy answer under presence and frequency penalties takes, at every step,
the argmax of the model's own logprobs minus the penalties of the answer so far (checked against the
raw top-20 logprobs the same run reports); a bias forces its token from the first step on."""

from __future__ import annotations

from dataclasses import replace

from appliance.config import EngineConfig
from appliance.engine.request import SamplingParams
from appliance.llm import LLM
from tests.engine.penalised import checked_penalised_steps

PROMPT = [5, 9, 13, 2, 7, 7, 30]
PRESENCE, FREQUENCY = 1.0, 0.5


def test_greedy_under_penalties_is_the_argmax_of_the_penalised_logprobs(tiny_model) -> None:
    cfg = EngineConfig(dtype="float32", page_size=4, num_pages=256, threads=1)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=20,
                            presence_penalty=PRESENCE, frequency_penalty=FREQUENCY)
    with LLM(str(tiny_model), cfg) as llm:
        plain = llm.generate([PROMPT], replace(params, presence_penalty=0.0, frequency_penalty=0.0))[0]
        got = llm.generate([PROMPT], params)[0]
        forced = llm.generate([PROMPT], replace(params, logit_bias=((123, 100.0),)))[0]
    assert len(set(plain.token_ids)) < len(plain.token_ids), "the plain answer repeats: the penalties have work"
    assert got.token_ids != plain.token_ids
    assert checked_penalised_steps(got.token_ids, got.logprobs, PRESENCE, FREQUENCY) >= len(got.token_ids) - 2
    assert forced.token_ids == [123] * 24  # from the first token on, the penalties notwithstanding


def test_min_tokens_holds_the_stop_token_off_until_the_answer_is_long_enough(tiny_model) -> None:
    cfg = EngineConfig(dtype="float32", page_size=4, num_pages=256, threads=1)
    with LLM(str(tiny_model), cfg) as llm:
        plain = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].token_ids
        stop = plain[1]  # the second greedy token, made a stop token
        early = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                      stop_token_ids=(stop,)))[0]
        held = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                     stop_token_ids=(stop,), min_tokens=5))[0]
    assert early.token_ids == plain[:2] and early.finish_reason == "stop"
    assert len(held.token_ids) >= 5 and stop not in held.token_ids[:4]
    assert held.token_ids[0] == plain[0] and held.token_ids[1] != stop  # banned, not just ignored
