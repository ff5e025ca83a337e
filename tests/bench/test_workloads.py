"""Workload lengths, seeding, real-text prompts and the ShareGPT loader, with a stand-in tokenizer."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from bench.workloads import (
    WORKLOADS,
    Corpus,
    LengthRange,
    PromptBuilder,
    RequestSource,
    TextCodec,
    corpus_text,
    fit_to_length,
    get_workload,
    load_sharegpt,
    sample_lengths,
    synthesize,
    warmup_requests,
)

EXPECTED_RANGES = {
    "chat": ((64, 256), (100, 300)),
    "rag": ((1024, 2048), (16, 64)),
    "code": ((512, 1536), (64, 256)),
    "long": ((4096, 6144), (32, 128)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_RANGES))
def test_lengths_are_uniform_within_the_documented_ranges(name: str) -> None:
    (p_lo, p_hi), (a_lo, a_hi) = EXPECTED_RANGES[name]
    samples = sample_lengths(get_workload(name), 4000, seed=7)
    prompts = [s.prompt_len for s in samples]
    answers = [s.output_len for s in samples]
    assert p_lo <= min(prompts) and max(prompts) <= p_hi
    assert a_lo <= min(answers) and max(answers) <= a_hi
    # Uniform: the ends are reached (within 2% of the width) and the mean sits in the middle.
    assert min(prompts) - p_lo <= 0.02 * (p_hi - p_lo) and p_hi - max(prompts) <= 0.02 * (p_hi - p_lo)
    assert sum(prompts) / len(prompts) == pytest.approx((p_lo + p_hi) / 2, rel=0.03)
    assert sum(answers) / len(answers) == pytest.approx((a_lo + a_hi) / 2, rel=0.03)
    # Each quarter of the prompt range holds about a quarter of the requests.
    quarters = Counter(min(3, (p - p_lo) * 4 // (p_hi - p_lo + 1)) for p in prompts)
    assert all(850 <= quarters[q] <= 1150 for q in range(4)), quarters


def test_mixed_is_exactly_70_30_and_interleaved_by_the_seed() -> None:
    a = sample_lengths(get_workload("mixed"), 100, seed=1)
    b = sample_lengths(get_workload("mixed"), 100, seed=1)
    c = sample_lengths(get_workload("mixed"), 100, seed=2)
    assert Counter(s.kind for s in a) == {"chat": 70, "rag": 30}
    assert Counter(s.kind for s in c) == {"chat": 70, "rag": 30}
    assert a == b
    assert [s.kind for s in a] != [s.kind for s in c]
    assert [s.kind for s in a[:30]] != ["chat"] * 30  # interleaved, not blocked
    for s in a:
        (p_lo, p_hi), (a_lo, a_hi) = EXPECTED_RANGES[s.kind]
        assert p_lo <= s.prompt_len <= p_hi and a_lo <= s.output_len <= a_hi
    assert Counter(s.kind for s in sample_lengths(get_workload("mixed"), 7, seed=0)) == {"chat": 5, "rag": 2}


def test_unknown_workload_and_bad_ranges_are_rejected() -> None:
    with pytest.raises(ValueError, match="chat, rag, code, long, mixed"):
        get_workload("nope")
    with pytest.raises(ValueError):
        LengthRange(10, 5)
    with pytest.raises(ValueError):
        sample_lengths(WORKLOADS["chat"], 0, seed=0)


@pytest.mark.parametrize("name", ["chat", "code", "mixed"])
def test_prompts_hit_their_token_lengths(name: str, builder: PromptBuilder, codec: TextCodec) -> None:
    samples = sample_lengths(get_workload(name), 40, seed=3)
    requests = builder.build(samples, seed=3)
    for sample, request in zip(samples, requests):
        assert request.prompt_len == len(codec.encode(request.prompt))
        assert request.prompt_len == sample.prompt_len
        assert request.output_len == sample.output_len and request.kind == sample.kind


def test_long_prompts_wrap_around_the_corpus(builder: PromptBuilder, codec: TextCodec) -> None:
    requests = synthesize(get_workload("long"), 3, seed=5, builder=builder)
    for r in requests:
        assert 4096 <= r.prompt_len <= 6144
        assert r.prompt_len == len(codec.encode(r.prompt))


def test_prompts_are_corpus_text_after_a_unique_header(builder: PromptBuilder) -> None:
    text = corpus_text()
    requests = synthesize(get_workload("chat"), 30, seed=11, builder=builder)
    firsts = set()
    for i, r in enumerate(requests):
        header, body = r.prompt.split("\n", 1)
        assert header == f"Document 11-{i}."
        assert body in text + text, "a prompt body must be a window of the bundled corpus"
        firsts.add(r.prompt[:40])
    assert len(firsts) == len(requests)


def test_same_seed_same_prompts_other_seed_other_prompts(builder: PromptBuilder) -> None:
    a = synthesize(get_workload("mixed"), 20, seed=4, builder=builder)
    b = synthesize(get_workload("mixed"), 20, seed=4, builder=builder)
    c = synthesize(get_workload("mixed"), 20, seed=5, builder=builder)
    assert a == b
    assert not {r.prompt for r in a} & {r.prompt for r in c}


def test_shared_prefix_is_common_and_counted(codec: TextCodec, corpus: Corpus) -> None:
    builder = PromptBuilder(codec, corpus, shared_prefix_len=301)
    assert builder.prefix_len == 301
    assert builder.prefix.startswith("You are a careful assistant")
    samples = sample_lengths(get_workload("chat"), 10, seed=0)
    requests = builder.build(samples, seed=0)
    for sample, r in zip(samples, requests):
        assert r.prompt.startswith(builder.prefix)
        assert r.prompt_len == 301 + sample.prompt_len
        assert codec.encode(r.prompt)[:301] == codec.encode(builder.prefix)
    # With this stand-in the prefix's trailing blank line makes only odd lengths reachable here:
    # 300 is impossible, and the closest shorter prefix is taken.
    assert PromptBuilder(codec, corpus, shared_prefix_len=300).prefix_len == 299
    with pytest.raises(ValueError):
        PromptBuilder(codec, corpus, shared_prefix_len=-1)


def test_fit_to_length_corrects_for_seams_and_keeps_the_closest() -> None:
    encode = lambda s: list(s.replace("ab", "X"))  # "ab" merges into one token
    text, length = fit_to_length(lambda n: "ab" * n, 10, encode, guess=10)
    assert (text, length) == ("ab" * 10, 10)
    # Only even lengths are reachable from "aa"-pairs: 7 is impossible, the closer short one wins.
    text, length = fit_to_length(lambda n: "aa" * n, 7, lambda s: list(s), guess=1)
    assert length == 6 and text == "aaaaaa"


def test_corpus_is_ascii_prose_and_code_of_some_size() -> None:
    text = corpus_text()
    assert len(text) > 25_000
    assert text.isascii()
    assert "def " in text and "SELECT" in text and "river" in text


def _write_sharegpt(path: Path) -> Path:
    entries = [
        {
            "conversations": [
                {"from": "human", "value": f"question {i} " + "word " * (5 + i)},
                {"from": "gpt", "value": "answer " * (4 + i)},
            ]
        }
        for i in range(12)
    ]
    entries.append({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "too short"}]})
    entries.append({"conversations": [{"from": "human", "value": "only one turn here at all"}]})
    entries.append({"conversations": [{"from": "human", "value": "x " * 40}, {"from": "gpt", "value": "y " * 40}]})
    path.write_text(json.dumps(entries))
    return path


def test_sharegpt_loader_filters_and_measures_like_vllm(
    tmp_path: Path, builder: PromptBuilder, codec: TextCodec
) -> None:
    path = _write_sharegpt(tmp_path / "sg.json")
    requests = load_sharegpt(path, 12, seed=0, builder=builder, max_prompt_len=60, max_total_len=100)
    assert len(requests) == 12
    assert all(r.kind == "sharegpt" and r.prompt.startswith("question") for r in requests)  # x/y one too long
    for r in requests:
        i = int(r.prompt.split()[1])
        assert r.output_len == len(codec.encode("answer " * (4 + i)))
        assert r.prompt_len == len(codec.encode(r.prompt))
    again = load_sharegpt(path, 12, seed=0, builder=builder, max_prompt_len=60, max_total_len=100)
    other = load_sharegpt(path, 12, seed=1, builder=builder, max_prompt_len=60, max_total_len=100)
    assert requests == again and requests != other
    with pytest.raises(ValueError, match="only 12 usable"):
        load_sharegpt(path, 13, seed=0, builder=builder, max_prompt_len=60, max_total_len=100)


def test_request_source_picks_dataset_or_workload(tmp_path: Path, builder: PromptBuilder) -> None:
    path = _write_sharegpt(tmp_path / "sg.json")
    assert RequestSource("chat", 5).label == "chat"
    assert RequestSource("chat", 5, path).label == "sharegpt:sg.json"
    assert len(RequestSource("rag", 3).make(builder, 0)) == 3
    assert all(r.kind == "sharegpt" for r in RequestSource("chat", 3, path).make(builder, 0))
    with pytest.raises(ValueError):
        RequestSource("nope", 3)


def test_warmup_prompts_share_no_prefix_with_measured_ones(builder: PromptBuilder) -> None:
    warm = warmup_requests(builder, 2)
    measured = synthesize(get_workload("chat"), 10, seed=0, builder=builder)
    assert len(warm) == 2 and all(w.output_len == 8 for w in warm)
    assert not any(m.prompt.startswith(w.prompt.split("\n")[0]) for w in warm for m in measured)
