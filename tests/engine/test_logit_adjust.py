"""Penalties and logit bias (`appliance.engine.logit_adjust`): each row's logits as vLLM adjusts them,
through both samplers; raw logprobs untouched."""

from __future__ import annotations

import pytest
import torch

from appliance.engine.device_sampler import DeviceSampler
from appliance.engine.logit_adjust import adjust
from appliance.engine.request import Request, SamplingParams
from appliance.engine.sampler import Sampler

VOCAB = 16


def req(prompt: list[int], output: list[int], **params) -> Request:
    r = Request(prompt_ids=prompt, params=SamplingParams(temperature=0, **params))
    r.output_ids = list(output)
    return r


def test_a_batch_without_adjustments_is_returned_as_it_is() -> None:
    logits = torch.randn(2, VOCAB)
    assert adjust(logits, [req([1], [2]), req([3], [])]) is logits


def test_each_adjustment_hits_only_its_row_and_its_tokens() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB) * 3
    reqs = [req([1, 2], [5, 5, 7], presence_penalty=0.5, frequency_penalty=0.25),
            req([1, 2], [5, 5, 7]),
            req([1, 2], [3], repetition_penalty=2.0),
            req([9], [], logit_bias=((4, 100.0), (6, -100.0)))]
    out = adjust(logits, reqs)
    want = logits.clone()
    want[0, 5] -= 0.5 + 2 * 0.25
    want[0, 7] -= 0.5 + 0.25
    for t in (1, 2, 3):  # the prompt's tokens and the answer's
        x = logits[2, t]
        want[2, t] = x / 2.0 if x > 0 else x * 2.0
    want[3, 4] += 100.0
    want[3, 6] -= 100.0
    assert torch.equal(out, want)
    assert torch.equal(logits, logits.clone())  # the input is left as it was (the raw logprobs read it)


def test_bias_then_repetition_then_penalties_as_vllm_orders_them() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 3] = 1.0
    r = req([3], [3], logit_bias=((3, 3.0),), repetition_penalty=2.0, presence_penalty=0.5)
    assert adjust(logits, [r])[0, 3].item() == pytest.approx((1.0 + 3.0) / 2.0 - 0.5)


def test_a_token_outside_the_logits_is_named() -> None:
    with pytest.raises(ValueError, match="token id 40 of logit_bias is outside the 16-token vocabulary"):
        adjust(torch.zeros(1, VOCAB), [req([1], [], logit_bias=((40, 1.0),))])


@pytest.mark.parametrize("sampler", [Sampler(), DeviceSampler()], ids=["host", "device-on-cpu"])
def test_both_samplers_draw_from_the_adjusted_logits_and_report_raw_logprobs(sampler) -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB)
    top = int(logits[0].argmax())
    reqs = [req([1], [], logit_bias=((top, -100.0),), logprobs=2),       # the raw argmax banned
            req([1], [], logit_bias=((11, 100.0),), logprobs=0),         # token 11 all but forced
            Request(prompt_ids=[1], params=SamplingParams(temperature=1.0, seed=3, logit_bias=((6, 100.0),)))]
    tokens, lps = sampler.sample(logits, reqs)
    raw = torch.log_softmax(logits, dim=-1)
    second = int(logits[0].topk(2).indices[1])
    assert tokens == [second, 11, 6]
    assert lps[0]["logprob"] == pytest.approx(raw[0, second].item(), abs=1e-5)
    assert [t for t, _ in lps[0]["top"]] == raw[0].topk(2).indices.tolist()  # the raw top, the banned one first
    assert lps[1]["logprob"] == pytest.approx(raw[1, 11].item(), abs=1e-5)


@pytest.mark.parametrize(("params", "message"), [
    (dict(presence_penalty=2.5), "presence_penalty must be in \\[-2, 2\\]"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be in \\[0.01, 10\\]"),
    (dict(repetition_penalty=1e-100), "repetition_penalty must be in \\[0.01, 10\\]"),
    (dict(logit_bias=((1, 101.0),)), "logit_bias entries"),
    (dict(logit_bias=((-1, 1.0),)), "logit_bias entries"),
    (dict(logit_bias=(1, 2)), "logit_bias entries"),
    (dict(logit_bias=tuple((i, 1.0) for i in range(1025))), "at most 1024"),
])
def test_bad_values_are_named(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**params)


def test_a_dict_of_biases_is_taken_as_pairs() -> None:
    p = SamplingParams(logit_bias={3: 1, 5: -2.5})
    assert p.logit_bias == ((3, 1.0), (5, -2.5)) and p.adjusts_logits
    assert not SamplingParams().adjusts_logits


def test_many_rows_with_every_adjustment_match_a_row_by_row_reference() -> None:
    torch.manual_seed(2)
    vocab = 64
    logits = torch.randn(6, vocab) * 4
    reqs = [req([int(t) for t in torch.randint(0, vocab, (9,))], [int(t) for t in torch.randint(0, vocab, (20,))],
                presence_penalty=0.3 * i - 0.5, frequency_penalty=0.1 * i, repetition_penalty=1.0 + 0.2 * (i % 3),
                logit_bias=((i, 2.0),)) for i in range(5)] + [req([1], [2])]
    want = logits.clone()
    for i, r in enumerate(reqs[:5]):
        p = r.params
        want[i, i] += 2.0
        for t in set(r.prompt_ids) | set(r.output_ids):
            x = want[i, t]
            want[i, t] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for t in set(r.output_ids):
            want[i, t] -= p.presence_penalty + p.frequency_penalty * r.output_ids.count(t)
    assert torch.allclose(adjust(logits, reqs), want, atol=1e-5)


def test_early_stops_are_banned_only_while_the_answer_is_short() -> None:
    logits = torch.zeros(2, VOCAB)
    short, done = req([1], [4], min_tokens=3), req([1], [4, 5, 6], min_tokens=3)
    for r in (short, done):
        r.early_stops = (2, 9)
    out = adjust(logits, [short, done])
    assert out[0, 2] == out[0, 9] == float("-inf") and torch.isfinite(out[0, :2]).all()
    assert torch.equal(out[1], logits[1])  # three tokens in: EOS and the stop tokens are allowed again
