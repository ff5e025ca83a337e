"""The token mask: llguidance's bits unpack to the right tokens, and both samplers obey it (CPU tensors)."""

from __future__ import annotations

import pytest
import torch

from appliance.engine.device_sampler import DeviceSampler
from appliance.engine.request import Request, SamplingParams
from appliance.engine.sampler import Sampler
from appliance.engine.token_mask import TokenMask

VOCAB = 70  # not a multiple of 32: the last word is partly past the vocabulary


def bitmask(allowed_rows: list[list[int]], words: int = 3) -> torch.Tensor:
    m = torch.zeros(len(allowed_rows), words, dtype=torch.int64)
    for r, allowed in enumerate(allowed_rows):
        for t in allowed:
            m[r, t // 32] |= 1 << (t % 32)
    return torch.where(m >= 2**31, m - 2**32, m).to(torch.int32)  # bit 31 is the sign bit of int32


def req(**kw) -> Request:
    return Request(prompt_ids=[1], params=SamplingParams(**kw))


def test_bits_unpack_to_the_allowed_tokens() -> None:
    allowed = [[0, 31, 32, 63, 64, 69], [5]]
    ok = TokenMask((0, 1), bitmask(allowed)).allowed(VOCAB)
    assert ok.shape == (2, VOCAB)
    assert [torch.nonzero(r).flatten().tolist() for r in ok] == allowed


def test_a_row_allowing_nothing_allows_everything() -> None:
    ok = TokenMask((0,), bitmask([[]])).allowed(VOCAB)
    assert bool(ok.all())


def test_tokens_past_the_mask_are_never_allowed() -> None:
    ok = TokenMask((0,), bitmask([[3]], words=1)).allowed(VOCAB)  # 32 bits for a 70-token vocabulary
    assert torch.nonzero(ok[0]).flatten().tolist() == [3]


def test_apply_masks_only_the_constrained_rows_and_copies() -> None:
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    out = TokenMask((1,), bitmask([[7, 40]])).apply(logits)
    assert torch.equal(logits, before), "apply must not write into the runner's logits"
    assert torch.equal(out[0], before[0]) and torch.equal(out[2], before[2])
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [7, 40]


def test_host_sampler_obeys_the_mask_greedy_and_random_logprobs_raw() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB)
    logits[:, 0] = 50.0  # what an unconstrained row picks
    reqs = [req(temperature=0, logprobs=1), req(temperature=1.0, seed=3), req(temperature=0)]
    mask = TokenMask((0, 1), bitmask([[9, 10], [11, 12]]))
    for _ in range(5):
        tokens, lps = Sampler(0).sample(logits, reqs, mask)
        assert tokens[0] == int(logits[0, [9, 10]].argmax()) + 9
        assert tokens[1] in (11, 12)
        assert tokens[2] == 0
    assert lps[0]["top"][0][0] == 0  # logprobs are the model's, before the mask


def test_device_sampler_obeys_the_mask_on_cpu_tensors() -> None:
    logits = torch.randn(4, VOCAB)
    logits[:, 0] = 50.0
    reqs = [req(temperature=0), req(temperature=0.7, top_p=0.9), req(temperature=0), req(temperature=1.0, seed=1)]
    mask = TokenMask((0, 1, 3), bitmask([[33], [34, 35], [69]]))
    tokens, _ = DeviceSampler(0).sample(logits, reqs, mask)
    assert tokens[0] == 33 and tokens[1] in (34, 35) and tokens[2] == 0 and tokens[3] == 69
    full = TokenMask((0, 1, 2, 3), bitmask([[1], [2], [3], [4]]))  # every row constrained
    assert DeviceSampler(0).sample(logits, reqs, full)[0] == [1, 2, 3, 4]


@pytest.mark.gpu
def test_device_sampler_obeys_the_mask_on_cuda() -> None:
    logits = torch.randn(3, VOCAB, device="cuda", dtype=torch.bfloat16)
    logits[:, 0] = 50.0
    reqs = [req(temperature=0), req(temperature=0.9, seed=2), req(temperature=0, logprobs=1)]
    tokens, lps = Sampler(0).sample(logits, reqs, TokenMask((0, 1), bitmask([[40], [41, 42]])))
    assert tokens[0] == 40 and tokens[1] in (41, 42) and tokens[2] == 0 and lps[2]["token_id"] == 0
