"""The device sampler's semantics on CPU tensors (the engine runs it on CUDA logits only): its filters
equal the host sampler's, its draws follow the probabilities, seeds reproduce independently of the
batch, logprobs equal the host's, all in one host copy."""

from __future__ import annotations

import torch

from appliance.engine.device_sampler import DeviceSampler, filtered_probs, inverse_cdf
from appliance.engine.request import Request, SamplingParams
from appliance.engine.sampler import Sampler, filtered_row


def _req(params: SamplingParams, outputs: int = 0) -> Request:
    r = Request(prompt_ids=[1, 2, 3], params=params)
    r.output_ids = list(range(outputs))
    return r


def test_filters_equal_the_host_sampler() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    combos = [SamplingParams(temperature=0.7), SamplingParams(top_k=5), SamplingParams(top_p=0.6),
              SamplingParams(min_p=0.2), SamplingParams(temperature=1.3, top_k=10, top_p=0.8, min_p=0.05),
              SamplingParams(top_k=60)]
    params = torch.tensor([[p.temperature, p.top_k, p.top_p, p.min_p] for p in combos])
    got = filtered_probs(logits, params, True, True, True)
    for i, p in enumerate(combos):
        want = filtered_row(logits[i], p)
        assert torch.equal(got[i] > 0, want > 0), f"row {i}: kept tokens differ"
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)


def test_draws_follow_the_probabilities() -> None:
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    reqs = [_req(SamplingParams(temperature=1.0)) for _ in range(4000)]
    tokens, _ = DeviceSampler(seed=3).sample(logits.expand(4000, 4).contiguous(), reqs)
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.03, rtol=0)


def test_top_k_one_and_greedy_rows_are_argmax() -> None:
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    reqs = [_req(SamplingParams(temperature=0)), _req(SamplingParams(top_k=1, temperature=2.0)),
            _req(SamplingParams(temperature=5.0, top_p=0.99)), _req(SamplingParams(temperature=0)),
            _req(SamplingParams(temperature=1.0, top_k=1))]
    tokens, lps = DeviceSampler().sample(logits, reqs)
    want = logits.argmax(-1).tolist()
    assert [tokens[i] for i in (0, 1, 3, 4)] == [want[i] for i in (0, 1, 3, 4)]
    assert lps == [None] * 5


def test_seeds_reproduce_whatever_the_neighbours() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 300, generator=g)
    seeded = SamplingParams(temperature=1.0, seed=42)
    alone, _ = DeviceSampler(seed=0).sample(logits[1:2], [_req(seeded, 5)])
    noisy = [_req(SamplingParams(temperature=1.0)), _req(seeded, 5), _req(SamplingParams(temperature=0.5))]
    batch, _ = DeviceSampler(seed=9).sample(logits, noisy)
    assert batch[1] == alone[0]
    draws = {DeviceSampler().sample(logits[1:2], [_req(seeded, pos)])[0][0] for pos in range(20)}
    assert len(draws) > 1, "every position drew the same token: the position is not in the key"


def test_logprobs_equal_the_host_samplers() -> None:
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(4))
    reqs = [_req(SamplingParams(temperature=0, logprobs=3)), _req(SamplingParams(temperature=0)),
            _req(SamplingParams(temperature=0, logprobs=0))]
    got_t, got_lp = DeviceSampler().sample(logits, reqs)
    want_t, want_lp = Sampler().sample(logits, reqs)
    assert got_t == want_t
    assert got_lp[1] is None and got_lp[2]["top"] == []
    assert got_lp[0]["token_id"] == want_lp[0]["token_id"]
    assert abs(got_lp[0]["logprob"] - want_lp[0]["logprob"]) < 1e-6
    assert [t for t, _ in got_lp[0]["top"]] == [t for t, _ in want_lp[0]["top"]]
    assert all(abs(a - b) < 1e-6 for (_, a), (_, b) in zip(got_lp[0]["top"], want_lp[0]["top"]))


def test_seeded_draws_follow_the_probabilities() -> None:
    """Seeded rows draw from their (seed, position) hash: over many seeds the frequencies are the probabilities."""
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    reqs = [_req(SamplingParams(temperature=1.0, seed=s), 3) for s in range(4000)]
    tokens, _ = DeviceSampler().sample(logits.expand(4000, 4).contiguous(), reqs)
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.03, rtol=0)


def test_seeded_and_unseeded_rows_mix() -> None:
    """A batch of seeded, unseeded and greedy rows: each seeded row's token is the one it draws alone."""
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0.8), SamplingParams(temperature=0),
              SamplingParams(temperature=1.2, top_k=50, seed=2), SamplingParams(top_p=0.9), SamplingParams(seed=3)]
    reqs = [_req(p, 4) for p in params]
    batch, _ = DeviceSampler(seed=11).sample(logits, reqs)
    for i in (0, 3, 5):
        alone, _ = DeviceSampler(seed=0).sample(logits[i:i + 1], [reqs[i]])
        assert batch[i] == alone[0], f"row {i}"
    assert batch[2] == int(logits[2].argmax())


def test_inverse_cdf_edges_never_pick_a_zero_probability_token() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.0, 0.25, 0.25]])
    for u, want in ((1.0, [3, 2, 4]), (2.0 ** -24, [1, 2, 0]), (0.5, [1, 2, 1]), (0.5000001, [3, 2, 3])):
        got = inverse_cdf(probs, torch.full((3,), u)).tolist()
        assert got == want, f"u={u}: {got}"
    unnormalized = probs * 3  # a total other than one: the target scales with it
    assert inverse_cdf(unnormalized, torch.tensor([1.0, 1.0, 0.3])).tolist() == [3, 2, 1]
