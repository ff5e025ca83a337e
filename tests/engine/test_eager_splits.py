"""An eager decode step on a GPU cuts each context by the step's longest context, read from its header on
every rank, not by its page table's width (a multiple of 16 pages: with 32-token pages even a one-page
context would split, and decode attention's unsplit compile would wait for a batch that fills the GPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from appliance.config import EngineConfig
from appliance.engine.forward_batch import HEADER_LEN, ForwardBatch
from appliance.engine.runner import ModelRunner
from kernels.decode_attention import num_splits_for

SMS = 132  # an H100's or H200's multiprocessors
PAGE = 32


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner("random:tiny", EngineConfig(device="cpu", dtype="float32", attention_backend="torch",
                                                   kv_cache_mb=4, max_model_len=1024, page_size=PAGE))


def _step(prefix: list[int], decode_only: bool = True) -> ForwardBatch:
    """A step of one token a request (decode) or a whole prompt (prefill), each row's table 16 pages wide."""
    extend = [1] * len(prefix) if decode_only else [p + 1 for p in prefix]
    starts = [0] * len(prefix) if not decode_only else prefix
    n = sum(extend)
    table = [[1] * 16 for _ in prefix]
    values = ForwardBatch.flat_values([3] * n, list(range(n)), list(range(n)), table, starts, extend, [], decode_only)
    return ForwardBatch.from_flat(torch.tensor(values), values[:HEADER_LEN])


def test_an_eager_gpu_decode_step_splits_by_its_longest_context(runner: ModelRunner,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    kv_heads = runner.model.shard.num_kv_heads
    seen: list[int | None] = []
    backend = SimpleNamespace(decode_splits=None)
    monkeypatch.setattr(runner, "backend", backend)
    monkeypatch.setattr(runner, "device", torch.device("cuda"))  # the decision only: no kernel runs
    monkeypatch.setattr("appliance.engine.runner.num_sms", lambda device: SMS)
    monkeypatch.setattr(runner.model, "forward", lambda batch, kv, hook: seen.append(backend.decode_splits))
    width_tokens = 16 * PAGE
    assert num_splits_for(1, kv_heads, width_tokens, SMS) == 2  # what the table's width alone would give

    short = _step([8])
    assert short.max_seq == 9 and short.page_table.shape[1] * PAGE == width_tokens
    runner.forward(short)
    runner.forward(_step([8, 600]))
    runner.forward(_step([8], decode_only=False))  # a prefill step: extend attention, nothing to split
    assert seen == [1, num_splits_for(2, kv_heads, 601, SMS), None]
    assert num_splits_for(2, kv_heads, 601, SMS) > 1
    assert backend.decode_splits is None  # each step's count is its own


def test_a_cpu_step_leaves_the_split_count_alone(runner: ModelRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = SimpleNamespace(decode_splits=None)
    seen: list[int | None] = []
    monkeypatch.setattr(runner, "backend", backend)
    monkeypatch.setattr(runner.model, "forward", lambda batch, kv, hook: seen.append(backend.decode_splits))
    runner.forward(_step([8, 600]))
    assert seen == [None]


def test_the_longest_context_travels_in_the_header_to_tp_followers() -> None:
    got = ForwardBatch.unpack(_step([8, 600]).pack())
    assert got.max_seq == 601 and got.max_extend == 1 and got.decode_only
    bare = ForwardBatch(**{f: getattr(got, f) for f in ("input_ids", "positions", "slot_mapping", "page_table",
                                                         "prefix_lens", "extend_lens", "seq_lens", "logit_rows")},
                        decode_only=True)
    assert ForwardBatch.unpack(bare.pack()).max_seq is None  # not known where the batch was built: left unset
