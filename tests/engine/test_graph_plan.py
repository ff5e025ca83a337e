"""CUDA-graph decode planning on CPU: ladder, buckets, split counts, padded metadata, and the static
buffer path's logits equal to the eager step's (graphs themselves need a GPU: tests/engine/test_gpu_engine.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from appliance.engine.graph_plan import (
    DecodeRow,
    GraphPlan,
    TableMemo,
    bucket_ladder,
    fill_meta,
    meta_views,
    plan_graphs,
)


def test_ladder_stops_at_max_running() -> None:
    assert bucket_ladder(64) == (1, 2, 4, 8, 16, 32, 64)
    assert bucket_ladder(48) == (1, 2, 4, 8, 16, 32, 48)
    assert bucket_ladder(1) == (1,)
    assert bucket_ladder(1000) == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    with pytest.raises(ValueError):
        bucket_ladder(0)


def test_configured_ladder() -> None:
    from appliance.config import EngineConfig

    assert bucket_ladder(256, (1, 16, 64, 256)) == (1, 16, 64, 256)
    assert bucket_ladder(48, (1, 16, 64, 256)) == (1, 16, 48)
    with pytest.raises(ValueError, match="cuda_graph_batches"):
        EngineConfig(cuda_graph_batches=(0, 4))


def test_bucket_for_pads_up_and_falls_back_beyond() -> None:
    plan = plan_graphs(max_running=48, max_model_len=1000, page_size=16, kv_heads=8, sms=132)
    assert [plan.bucket_for(n) for n in (1, 3, 5, 17, 33, 48)] == [1, 4, 8, 32, 48, 48]
    assert plan.bucket_for(49) is None
    with pytest.raises(ValueError):
        plan.bucket_for(0)
    assert plan.width == 63  # ceil(1000 / 16)


def test_splits_fixed_per_bucket_fill_the_gpu_and_shrink_with_batch() -> None:
    plan = plan_graphs(max_running=256, max_model_len=8192, page_size=16, kv_heads=8, sms=132)
    s = dict(zip(plan.buckets, plan.num_splits))
    assert s[1] == 32 and s[256] == 1  # ceil(4*132/8) = 66, capped by 8192/256; 4*132 < 256*8
    assert all(a >= b for a, b in zip(plan.num_splits, plan.num_splits[1:]))
    assert all(n & (n - 1) == 0 for n in plan.num_splits)  # powers of two: few distinct compiles
    assert s[4] == 16  # ceil(4*132/32) = 17, rounded down
    short = plan_graphs(max_running=4, max_model_len=300, page_size=16, kv_heads=8, sms=132)
    assert short.num_splits == (2, 2, 2)  # never more splits than 256-token chunks of the context


def test_plan_validation() -> None:
    with pytest.raises(ValueError):
        GraphPlan((2, 1), (1, 1), 4, 16)
    with pytest.raises(ValueError):
        GraphPlan((1, 2), (1,), 4, 16)
    with pytest.raises(ValueError):
        plan_graphs(4, 0, 16, 8, 132)


def test_fill_meta_pads_rows_into_the_scratch_slot() -> None:
    plan = GraphPlan((1, 4), (1, 1), width=3, page_size=4)
    buf = torch.full((plan.buffer_len,), -7, dtype=torch.int64)
    rows = [DecodeRow(11, 5, [9, 2]), DecodeRow(12, 0, [6])]
    used = fill_meta(buf, plan, 4, rows, scratch_slot=40)
    assert used == 4 * 4 + 2 * 4  # the vectors, then the table's first 2 columns (row 0 reaches 2 pages)
    v = meta_views(buf, plan, 4)
    assert v["input_ids"].tolist() == [11, 12, 0, 0]
    assert v["positions"].tolist() == [5, 0, 0, 0]
    assert v["slot_mapping"].tolist() == [2 * 4 + 1, 6 * 4, 40, 40]
    assert v["seq_lens"].tolist() == [6, 1, 0, 0]
    assert v["page_table"][0, :2].tolist() == [9, 2] and v["page_table"][1, 0] == 6
    with pytest.raises(ValueError, match="do not fit"):
        fill_meta(buf, plan, 1, rows, 40)
    with pytest.raises(ValueError, match="needs 4 pages"):
        fill_meta(buf, plan, 4, [DecodeRow(1, 12, [1, 2, 3, 4])], 40)


def test_a_step_copies_the_columns_its_contexts_reach_not_the_tables_width() -> None:
    """A 128K-token limit makes the table 8192 pages wide; 64 requests of ~1K tokens reach 64 of them:
    the step's one copy is the vectors and 64 columns (16K values), not 64 full rows (524K)."""
    plan = plan_graphs(max_running=64, max_model_len=128 * 1024, page_size=16, kv_heads=8, sms=132)
    assert plan.width == 8192
    buf = torch.zeros(plan.buffer_len, dtype=torch.int64)
    rows = [DecodeRow(1, 960 + i, list(range(100 * i, 100 * i + 64))) for i in range(64)]
    used = fill_meta(buf, plan, 64, rows, 0)
    assert used == 4 * 64 + 64 * 64 and used * 30 < 64 * plan.width  # 1023 // 16 + 1 = 64 columns
    device = torch.zeros(plan.buffer_len, dtype=torch.int64)
    device[:used] = buf[:used]  # DecodeGraphs.run's one copy
    table = meta_views(device, plan, 64)["page_table"]
    for i, r in enumerate(rows):  # what the copied prefix holds is every page each row reads
        assert table[i, :(r.position // 16) + 1].tolist() == list(r.pages[:(r.position // 16) + 1])


def test_the_table_memo_writes_new_pages_only_and_never_leaves_a_stale_row() -> None:
    """400 steps of a changing batch (requests growing, finishing, rebinding their pages, reordering;
    the bucket changing): every row reads as a fill without the memo would write it, while a row whose
    list merely grew gets only its new entries; and the device buffer, which gets each step's leading
    values alone, holds every real row's pages."""
    import random

    plan = GraphPlan((2, 4, 8), (1, 1, 1), width=12, page_size=4)
    rng = random.Random(3)
    fresh, kept = torch.zeros(plan.buffer_len, dtype=torch.int64), torch.zeros(plan.buffer_len, dtype=torch.int64)
    device = torch.zeros(plan.buffer_len, dtype=torch.int64)
    memo = TableMemo()
    reqs = [{"pages": [rng.randrange(500)], "pos": 0} for _ in range(5)]
    for step in range(400):
        for r in reqs:
            r["pos"] += 1
            if r["pos"] // 4 + 1 > len(r["pages"]):
                r["pages"].extend([rng.randrange(500)])  # in place, as the scheduler grows a request
        if rng.random() < 0.1:  # one finishes; a new one (or a preempted one, its pages rebound) takes its place
            reqs[rng.randrange(len(reqs))] = {"pages": [rng.randrange(500) for _ in range(3)], "pos": 9}
        if rng.random() < 0.1:
            rng.shuffle(reqs)
        if rng.random() < 0.05 and len(reqs) < 8:
            reqs.append({"pages": [rng.randrange(500)], "pos": 0})
        if rng.random() < 0.05 and len(reqs) > 1:
            reqs.pop()
        reqs = [r for r in reqs if r["pos"] < 40] or [{"pages": [1], "pos": 0}]
        rows = [DecodeRow(step, r["pos"], r["pages"]) for r in reqs]
        bucket = plan.bucket_for(len(rows))
        used = fill_meta(kept, plan, bucket, rows, 0, memo)
        assert fill_meta(fresh, plan, bucket, rows, 0) == used
        device[:used] = kept[:used]  # DecodeGraphs.run's one copy
        assert torch.equal(kept[:4 * bucket], fresh[:4 * bucket])
        got, want = meta_views(kept, plan, bucket)["page_table"], meta_views(fresh, plan, bucket)["page_table"]
        seen = meta_views(device, plan, bucket)["page_table"]
        for i, r in enumerate(rows):
            need = r.position // 4 + 1
            assert got[i, :need].tolist() == want[i, :need].tolist() == seen[i, :need].tolist() == list(r.pages[:need])
    assert memo.bucket == bucket


def test_a_grown_list_gets_only_its_new_entries_and_a_rebound_one_all() -> None:
    plan = GraphPlan((1, 2), (1, 1), width=4, page_size=4)
    buf, memo = torch.zeros(plan.buffer_len, dtype=torch.int64), TableMemo()
    pages = [7, 8]
    fill_meta(buf, plan, 1, [DecodeRow(1, 5, pages)], 0, memo)
    table = meta_views(buf, plan, 1)["page_table"]
    table[0, 0] = -1  # a mark: an entry the next fill has no reason to write
    pages.append(9)
    fill_meta(buf, plan, 1, [DecodeRow(1, 8, pages)], 0, memo)
    assert table[0, :3].tolist() == [-1, 8, 9]  # only the new page went in
    fill_meta(buf, plan, 1, [DecodeRow(1, 8, list(pages))], 0, memo)  # rebound (a copy): written whole
    assert table[0, :3].tolist() == [7, 8, 9]
    fill_meta(buf, plan, 2, [DecodeRow(1, 8, pages), DecodeRow(2, 0, [3])], 0, memo)  # another bucket's layout
    assert memo.bucket == 2 and meta_views(buf, plan, 2)["page_table"][0, :3].tolist() == [7, 8, 9]
    memo.reset()
    assert memo.bucket is None


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU tensors: the Triton interpreter runs only without CUDA"))])
def test_static_buffer_decode_equals_the_eager_step(backend: str) -> None:
    """DecodeGraphs without graphs (the same views a graph reads) on CPU, with the torch references and
    the Triton kernels under the interpreter (the split count fixed per bucket): padded to a bucket,
    its logits are the eager build/forward's."""
    from appliance.config import EngineConfig
    from appliance.engine.decode_graphs import DecodeGraphs
    from appliance.engine.engine import Engine
    from appliance.engine.request import SamplingParams
    from appliance.engine.runner import decode_rows

    engine = Engine("random:tiny", EngineConfig(dtype="float32", page_size=4, num_pages=64,
                                                 attention_backend="torch", max_running=8))
    assert engine.runner.decode_graphs is None  # never on CPU
    prompts = [[5 + i % 200 for i in range(70)], [20, 21], [30 + i for i in range(40)]]
    reqs = [engine.add_request(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)) for p in prompts]
    while any(len(r.output_ids) < 2 for r in reqs):
        engine.step()
    sb = engine.scheduler.schedule()
    assert sb is not None and sb.decode_only and len(sb.requests) == 3
    if backend != "torch":  # prefill ran on the references (fast); the decode steps compared run here
        from appliance.engine.backends import create_backend

        engine.runner.model.backend = create_backend(backend, torch.device("cpu"))
    runner = engine.runner
    eager = runner.forward(runner.build(sb)).clone()
    scratch = engine.pool.alloc(1)[0]
    plan = plan_graphs(8, engine.max_model_len, 4, engine.model_config.num_kv_heads, sms=8)
    plan = dataclasses.replace(plan, num_splits=(4, 4, 2, 2))  # > 1: the kernel merges splits (70 tokens)
    static = DecodeGraphs(runner.model, engine.pool.kv, plan, scratch, use_graphs=False, warmup_context=8)
    seen: list = []
    be = runner.model.backend
    real_decode = be.decode

    def spy(*args, **kwargs):
        seen.append(getattr(be, "decode_splits", None))
        return real_decode(*args, **kwargs)

    be.decode = spy
    static.capture()  # warm-up only: writes just the scratch slot
    layers = engine.model_config.num_layers
    if backend == "triton":  # buckets 8, 4, 2, 1, each with its own count
        assert seen == [n for n in (2, 2, 4, 4) for _ in range(layers)]
    seen.clear()
    got = static.run(decode_rows(sb))
    be.decode = real_decode
    assert seen == [2 if backend == "triton" else None] * layers  # bucket 4's count
    if backend == "triton":
        assert be.decode_splits is None  # restored after the step
    assert got.shape == eager.shape
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    engine.shutdown()


def test_engine_with_static_decode_path_answers_like_without(monkeypatch) -> None:
    """The whole CUDA start-up and step path on CPU, graphs replaced by their eager static-buffer run:
    warm-up (scratch page, capture plan, throw-away prefill), then greedy tokens equal a plain engine's."""
    import functools
    import types

    from appliance.config import EngineConfig
    from appliance.engine import runner as runner_mod
    from appliance.engine.decode_graphs import DecodeGraphs
    from appliance.engine.engine import Engine
    from appliance.engine.request import SamplingParams

    def greedy(engine: Engine) -> list[list[int]]:
        prompts = [[5 + (i * 7 + j) % 200 for j in range(3 + 9 * i)] for i in range(5)]
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        reqs = [engine.add_request(p, params) for p in prompts]
        engine.run_until_done(reqs)
        return [r.output_ids for r in reqs]

    cfg = EngineConfig(dtype="float32", page_size=4, num_pages=96, attention_backend="torch", max_running=4,
                       max_prefill_tokens=16)
    plain = Engine("random:tiny", cfg)
    want = greedy(plain)
    plain.shutdown()

    monkeypatch.setattr(runner_mod.ModelRunner, "wants_decode_graphs", lambda self: True)
    monkeypatch.setattr(runner_mod, "DecodeGraphs", functools.partial(DecodeGraphs, use_graphs=False))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: types.SimpleNamespace(multi_processor_count=4))
    engine = Engine("random:tiny", cfg)
    g = engine.runner.decode_graphs
    assert g is not None and g.plan.buckets == (1, 2, 4)
    assert engine.max_model_len == 95 * 4 - 1  # one page kept as the scratch page
    assert engine.pool.num_free == 95 and engine.stats_prefill_tokens == 0 and engine.warmup_s > 0
    calls = []
    real_run = g.run
    monkeypatch.setattr(g, "run", lambda rows: calls.append(len(rows)) or real_run(rows))
    assert greedy(engine) == want
    assert calls and max(calls) <= 4  # decode steps went through the static path
    engine.cache.reset()
    assert engine.pool.num_free == 95  # the prefix cache gave its pages back; the scratch page stays
    engine.shutdown()


def test_failed_capture_falls_back_to_eager_static_decode(monkeypatch, capsys) -> None:
    import types

    from appliance.config import EngineConfig
    from appliance.engine import runner as runner_mod
    from appliance.engine.decode_graphs import DecodeGraphs
    from appliance.engine.engine import Engine
    from appliance.engine.request import SamplingParams

    class Uncapturable(DecodeGraphs):
        def capture(self) -> None:
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(runner_mod.ModelRunner, "wants_decode_graphs", lambda self: True)
    monkeypatch.setattr(runner_mod, "DecodeGraphs", Uncapturable)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: types.SimpleNamespace(multi_processor_count=4))
    engine = Engine("random:tiny", EngineConfig(dtype="float32", page_size=4, num_pages=64,
                                                 attention_backend="torch", max_running=2))
    assert "capture failed, decoding eagerly" in capsys.readouterr().err
    assert not engine.runner.decode_graphs.use_graphs
    req = engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    engine.run_until_done([req])
    assert len(req.output_ids) == 4
    engine.shutdown()


def test_an_eager_step_table_on_a_gpu_is_16_pages_wide_or_a_multiple() -> None:
    """Its row stride reaches the attention kernels as an int that Triton compiles apart when it is 1, a
    multiple of 16 or neither: a first one-page prompt compiled the prefill kernel while serving."""
    from appliance.engine.runner import table_width

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert [table_width(n, cuda) for n in (1, 15, 16, 17, 32, 33)] == [16, 16, 16, 32, 32, 48]
    assert [table_width(n, cpu) for n in (1, 17)] == [1, 17]  # the CPU kernels take any width
