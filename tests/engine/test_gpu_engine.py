"""The engine on a GPU (issue 21): CUDA-graph decode gives the eager and torch-reference tokens, and
sampling keeps its semantics there. Random weights (``random:small``), so nothing is read from disk."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MODEL = "random:small"
PROMPTS = [[5 + (i * 7 + j * 13) % 250 for j in range(3 + 11 * i)] for i in range(5)]  # 3..47 tokens


def _engine(backend: str = "triton", dtype: str = "float32", graphs: bool = True, max_running: int = 8):
    from appliance.config import EngineConfig
    from appliance.engine.engine import Engine

    cfg = EngineConfig(device="cuda", dtype=dtype, attention_backend=backend, page_size=16, num_pages=256,
                       max_prefill_tokens=32, max_running=max_running, cuda_graphs=graphs)
    return Engine(MODEL, cfg)


def _greedy(engine, max_tokens: int = 16) -> list[list[int]]:
    from appliance.engine.request import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in PROMPTS]
    engine.run_until_done(reqs)
    return [r.output_ids for r in reqs]


@pytest.fixture(scope="module")
def graphs_fp32():
    engine = _engine()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def eager_tokens() -> list[list[int]]:
    """Greedy tokens of a graph-free engine (same kernels, eager decode steps)."""
    engine = _engine(graphs=False)
    assert engine.runner.decode_graphs is None
    tokens = _greedy(engine)
    engine.shutdown()
    return tokens


def test_graphs_are_captured_for_every_bucket(graphs_fp32) -> None:
    g = graphs_fp32.runner.decode_graphs
    assert g is not None and g.use_graphs
    assert sorted(g.graphs) == [1, 2, 4, 8] == list(g.plan.buckets)
    assert graphs_fp32.warmup_s > 0 and g.warmup_s > 0


def test_greedy_graphs_equal_eager_and_torch_reference(graphs_fp32, eager_tokens) -> None:
    got = _greedy(graphs_fp32)
    want = eager_tokens
    assert got == want, "greedy tokens differ with CUDA graphs on vs off (fp32)"
    ref = _engine(backend="torch")
    assert ref.runner.decode_graphs is None
    assert _greedy(ref) == want, "triton + graphs differ from the torch references (fp32)"
    ref.shutdown()


def test_bf16_graph_step_logits_match_the_eager_step() -> None:
    from appliance.engine.request import SamplingParams

    engine = _engine(dtype="bfloat16")
    # the warm-up timed cuBLAS against the GEMV for every weight kind at every bucket (all <= 16 here)
    timings = engine.runner.linear_timings
    assert {(t.name, t.rows) for t in timings} == {(k, b) for k in ("qkv", "o_proj", "gate_up", "down", "lm_head")
                                                   for b in (1, 2, 4, 8)}
    assert all(t.cublas_us > 0 and t.gemv_us > 0 for t in timings)
    # ... and QKV and gate/up once more with the RMSNorm before them (`kernels.rmsnorm_gemv` against the two)
    assert {(t.name, t.rows) for t in timings if t.norm} == {(k, b) for k in ("qkv", "gate_up") for b in (1, 2, 4, 8)}
    reqs = [engine.add_request(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)) for p in PROMPTS]
    while any(len(r.output_ids) < 2 for r in reqs):
        engine.step()
    sb = engine.scheduler.schedule()
    assert sb is not None and sb.decode_only and len(sb.requests) == 5  # padded to bucket 8
    runner = engine.runner
    graphed = runner.step(sb).clone()
    eager = runner.forward(runner.build(sb))
    assert torch.isfinite(graphed).all()
    torch.testing.assert_close(graphed, eager, rtol=0.05, atol=0.05 * float(eager.abs().max()))
    assert (graphed.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.8
    engine.shutdown()


def test_sampling_semantics_on_the_gpu(graphs_fp32) -> None:
    from appliance.engine.request import SamplingParams

    def gen(params: SamplingParams) -> list[int]:
        req = graphs_fp32.add_request(PROMPTS[2], params)
        graphs_fp32.run_until_done([req])
        return req.output_ids

    greedy = gen(SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert gen(SamplingParams(max_tokens=10, temperature=1.0, top_k=1, ignore_eos=True)) == greedy
    seeded = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, min_p=0.01, seed=1234, ignore_eos=True)
    a, b = gen(seeded), gen(seeded)
    assert a == b, "a seeded request sampled differently twice"
    lp = gen(SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True))
    assert lp == greedy[:4]


def test_batch_beyond_the_ladder_runs_eagerly(graphs_fp32, eager_tokens) -> None:
    """The ladder cut to buckets 1 and 2: the decode batches of 5 fall back to the eager step (any of 1
    or 2 would replay), and the tokens equal a graph-free engine's."""
    import dataclasses

    g = graphs_fp32.runner.decode_graphs
    plan = g.plan
    g.plan = dataclasses.replace(plan, buckets=(1, 2), num_splits=plan.num_splits[:2])
    try:
        assert g.fits(2) and not g.fits(3)
        assert _greedy(graphs_fp32, 8) == [t[:8] for t in eager_tokens]
    finally:
        g.plan = plan


def test_device_sampler_on_cuda_logits() -> None:
    """CUDA logits: draws follow the probabilities, logprobs equal the host sampler's on the same logits."""
    from appliance.engine.device_sampler import DeviceSampler
    from appliance.engine.request import Request, SamplingParams
    from appliance.engine.sampler import Sampler

    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4], device="cuda")).expand(4000, 4).contiguous()
    reqs = [Request(prompt_ids=[1], params=SamplingParams(temperature=1.0)) for _ in range(4000)]
    tokens, _ = Sampler(seed=5).sample(logits, reqs)
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.03, rtol=0)
    seeded = [Request(prompt_ids=[1], params=SamplingParams(temperature=1.0, seed=s)) for s in range(200)]
    on_gpu, _ = DeviceSampler().sample(logits[:200], seeded)
    on_cpu, _ = DeviceSampler().sample(logits[:200].cpu(), seeded)
    assert on_gpu == on_cpu, "a seeded row drew another token on the GPU than on the CPU (the same u)"
    rnd = torch.randn(3, 1000, device="cuda")
    lp_reqs = [Request(prompt_ids=[1], params=SamplingParams(temperature=0, logprobs=k)) for k in (0, 2, 5)]
    got_t, got_lp = DeviceSampler().sample(rnd, lp_reqs)
    want_t, want_lp = Sampler().sample(rnd.cpu(), lp_reqs)
    assert got_t == want_t
    for g, w in zip(got_lp, want_lp):
        assert [t for t, _ in g["top"]] == [t for t, _ in w["top"]]
        assert abs(g["logprob"] - w["logprob"]) < 1e-4


def test_bench_splits_a_decode_step_into_device_time_and_kernels(tmp_path) -> None:
    """``python -m bench.engine --device cuda --profile-batches 4``: every replay's device time, the
    profiled size's kernels."""
    import json

    from bench.engine_gpu import run_cuda

    out = run_cuda(MODEL, "bfloat16", batches=(1, 4), prefill_lens=(64,), context=32, steps=3,
                   out_path=str(tmp_path / "r.json"), profile=(4,))
    assert json.loads((tmp_path / "r.json").read_text()) == out
    assert 0 < out["decode_gpu_ms_b1"] <= out["decode_ms_b1_graphs"]
    assert 0 < out["decode_gpu_ms_b4"] <= out["decode_ms_b4_graphs"]
    assert "profile_b4_error" not in out, out.get("profile_b4_error")
    assert "profile_b1_graphs" not in out  # only the sizes asked for
    graphs, eager = out["profile_b4_graphs"], out["profile_b4_eager"]
    # random:small has 2 layers: a step is at least their GEMMs, the LM head and attention
    assert graphs["kernels"] >= 8 and graphs["top"] and graphs["busy_us"] > 0
    assert eager["kernels"] >= graphs["kernels"]  # the same forward, launched one kernel at a time


def test_penalties_and_bias_apply_on_the_device(graphs_fp32) -> None:
    from appliance.engine.request import SamplingParams
    from tests.engine.penalised import checked_penalised_steps

    forced = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logit_bias=((77, 100.0),))
    penalised = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=20, presence_penalty=1.0,
                               frequency_penalty=0.5)
    reqs = [graphs_fp32.add_request(PROMPTS[1], forced), graphs_fp32.add_request(PROMPTS[2], penalised)]
    graphs_fp32.run_until_done(reqs)
    assert reqs[0].output_ids == [77] * 6
    got = reqs[1]
    assert checked_penalised_steps(got.output_ids, got.output_logprobs, 1.0, 0.5) >= len(got.output_ids) - 2


def test_prompt_logprobs_on_the_device(graphs_fp32) -> None:
    from appliance.engine.request import SamplingParams

    prompt = PROMPTS[3]
    scored = graphs_fp32.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3))
    alone = [graphs_fp32.add_request(prompt[:j], SamplingParams(max_tokens=1, temperature=0, logprobs=3))
             for j in range(1, len(prompt))]
    graphs_fp32.run_until_done([scored, *alone])
    got = scored.prompt_logprobs
    assert [e["token_id"] for e in got] == prompt[1:]
    for e, a in zip(got, alone, strict=True):  # each position's top 3 as a request for that prefix alone
        top = a.output_logprobs[0]["top"]
        assert [t for t, _ in e["top"]] == [t for t, _ in top]
        assert [v for _, v in e["top"]] == pytest.approx([v for _, v in top], abs=1e-3)


def test_a_nan_row_fails_its_request_alone_on_the_device(graphs_fp32) -> None:
    """NaN logits for one request in a graph-replayed decode batch: it ends with an error, its neighbours'
    greedy tokens are those of a clean run, with logprobs, and no page leaks."""
    from appliance.engine.request import SamplingParams
    from tests.engine.faults import poison

    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    clean = [graphs_fp32.add_request(p, params) for p in PROMPTS[:3]]
    graphs_fp32.run_until_done(clean)
    undo = poison(graphs_fp32, "victim", after=3)
    try:
        reqs = [graphs_fp32.add_request(p, params, request_id=rid)
                for p, rid in zip(PROMPTS[:3], ("a", "victim", "b"))]
        graphs_fp32.run_until_done(reqs)
    finally:
        undo()
    assert reqs[1].finish_reason == "error" and len(reqs[1].output_ids) == 3 and "not finite" in reqs[1].error
    for got, want in ((reqs[0], clean[0]), (reqs[2], clean[2])):
        assert got.output_ids == want.output_ids and len(got.output_logprobs) == 8
    graphs_fp32.cache.reset()
    assert graphs_fp32.pool.num_free == graphs_fp32.pool.num_pages - 1  # the graphs' scratch page stays


def _host_syncs(fn):  # type: ignore[no-untyped-def]
    """``fn()``'s result and where it made the host wait for the GPU (torch's sync debug mode)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out, [f"{w.filename}:{w.lineno}: {w.message}" for w in seen if "synchroniz" in str(w.message)]


def _mixed_params() -> list:  # type: ignore[type-arg]
    """Every sampling feature the device sampler has, one or two a row (logprobs on some rows only)."""
    from appliance.engine.request import SamplingParams

    return [
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=1.0, top_k=20, min_p=0.05, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=12, temperature=0, logit_bias=((77, 5.0),), ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0, presence_penalty=0.5, frequency_penalty=0.3,
                       repetition_penalty=1.2, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.7, min_tokens=10, stop_token_ids=(3,)),
    ]


def test_the_device_sampler_waits_for_the_gpu_once() -> None:
    """Penalties, bias, a token mask, filters, seeded draws and logprobs for some rows: the host waits for
    the GPU once, for the step's one copy of ids and logprobs (a list made into a CUDA tensor waited for
    the whole stream, a replayed decode step included)."""
    from appliance.engine.device_sampler import DeviceSampler
    from appliance.engine.request import Request
    from appliance.engine.token_mask import TokenMask

    vocab = 1000
    reqs = [Request(prompt_ids=[1, 2, 3], params=p) for p in _mixed_params()]
    for r in reqs:
        r.output_ids = [4, 5, 4]
    reqs[5].early_stops = (3, 0)
    bits = torch.zeros(2, -(-vocab // 32), dtype=torch.int32)
    bits[:, :4] = -1  # tokens 0..127 allowed in rows 1 and 4
    mask = TokenMask(rows=(1, 4), bitmask=bits)
    logits = torch.randn(len(reqs), vocab, device="cuda")
    sampler = DeviceSampler(seed=3)
    sampler.sample(logits, reqs, mask)  # first use: the mask's byte table goes to the device
    (tokens, logprobs), syncs = _host_syncs(lambda: sampler.sample(logits, reqs, mask))
    assert len(syncs) == 1, "the device sampler made the host wait more than once:\n" + "\n".join(syncs)
    assert tokens[1] < 128 and tokens[4] < 128 and tokens[5] not in (3, 0)
    assert logprobs[2] is not None and len(logprobs[2]["top"]) == 2 and logprobs[0] is None


def test_a_graph_decode_step_waits_for_the_gpu_once(graphs_fp32) -> None:
    """A replayed decode step of requests with every sampling feature: one host wait, the sampled ids'."""
    reqs = [graphs_fp32.add_request(PROMPTS[i % len(PROMPTS)], p) for i, p in enumerate(_mixed_params())]
    while any(len(r.output_ids) < 2 for r in reqs):  # every request decoding
        graphs_fp32.step()
    sb = graphs_fp32.scheduler.schedule
    seen = []

    def spy():  # type: ignore[no-untyped-def]
        out = sb()
        seen.append(out)
        return out

    graphs_fp32.scheduler.schedule = spy  # type: ignore[method-assign]
    try:
        _, syncs = _host_syncs(graphs_fp32.step)
    finally:
        del graphs_fp32.scheduler.schedule
    assert seen[0].decode_only and len(seen[0].requests) == len(reqs)
    assert graphs_fp32.runner.decode_graphs.fits(len(reqs))
    assert len(syncs) == 1, "a graph decode step made the host wait more than once:\n" + "\n".join(syncs)
    graphs_fp32.run_until_done(reqs)
