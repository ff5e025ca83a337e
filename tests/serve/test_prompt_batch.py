"""A /v1/completions request that lists several prompts: split into one request per prompt, answered
together (choice index = prompt index x n + sample index, usage summed), streamed interleaved; the
merge of their streams closes every one however it ends. Synthetic worker events, no engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from appliance.serve import openai_api as oai
from appliance.serve.merge_streams import merged
from appliance.serve.openai_api import ParsedRequest
from appliance.serve.protocol import Sampling, Tokens
from appliance.serve.relay import Outcome, Relayed
from appliance.serve.responses import ResponseWriter
from appliance.serve.router_config import RouterConfig
from appliance.serve.router_metrics import RouterMetrics
from tests.serve.test_choices import CharTokenizer, ids


def parsed(n: int = 1, stream: bool = False, usage: bool = False) -> ParsedRequest:
    return ParsedRequest("completions", "m", [1, 2, 3], Sampling(n=n), stream, usage, False)


async def events(evs: list[Relayed], pause: float = 0.0) -> AsyncIterator[Relayed]:
    for ev in evs:
        await asyncio.sleep(pause)
        yield ev


def answer(n: int, texts: list[str], prompt: int, cached: int = 0) -> list[Relayed]:
    evs: list[Relayed] = []
    for i, t in enumerate(texts):
        evs += [Tokens(token_ids=ids(t), index=i), Tokens(index=i, finish_reason="length")]
    return [*evs, Outcome("length", prompt, cached)]


def test_split_prompts_makes_a_body_per_prompt_and_names_bad_batches() -> None:
    body = {"model": "m", "prompt": ["a", "b"], "max_tokens": 2}
    assert oai.split_prompts(body) == [{**body, "prompt": "a"}, {**body, "prompt": "b"}]
    assert oai.split_prompts({"prompt": [[1, 2], [3]]}) == [{"prompt": [1, 2]}, {"prompt": [3]}]
    assert oai.split_prompts({"prompt": [1, 2]}) == [{"prompt": [1, 2]}]  # one prompt of token ids
    assert oai.split_prompts({"prompt": "a"}) == [{"prompt": "a"}]
    with pytest.raises(oai.ApiError, match="not both") as info:
        oai.split_prompts({"prompt": ["a", [1]]})
    assert info.value.param == "prompt"
    with pytest.raises(oai.ApiError, match="lists 65 prompts; at most 64"):
        oai.split_prompts({"prompt": ["a"] * 65})
    with pytest.raises(oai.ApiError, match="split first"):  # parse_completion takes one prompt
        oai.parse_completion({"prompt": ["a", "b"]}, None, "m", 64, 32)


def test_collect_numbers_each_prompts_choices_after_the_last_and_sums_usage() -> None:
    writer = ResponseWriter(RouterConfig(), CharTokenizer(), RouterMetrics())
    parts = [(parsed(n=2), events(answer(2, ["ab", "cd"], 3, 1), 0.01)),
             (parsed(n=2), events(answer(2, ["ef", "g"], 5)))]
    body = json.loads(asyncio.run(writer.collect(parts, "cmpl-x")).body)
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "ab"), (1, "cd"), (2, "ef"), (3, "g")]
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 7, "total_tokens": 15,
                             "prompt_tokens_details": {"cached_tokens": 1}}


def test_a_failed_prompt_fails_the_batch_and_stops_the_others() -> None:
    from appliance.serve.worker_client import WorkerFailed

    closed = asyncio.Event()

    async def endless() -> AsyncIterator[Relayed]:
        try:
            while True:
                await asyncio.sleep(0.001)
                yield Tokens(token_ids=ids("x"))
        finally:
            closed.set()

    async def broken() -> AsyncIterator[Relayed]:
        await asyncio.sleep(0.02)
        raise WorkerFailed("decode-0 went away")
        yield  # an async generator

    async def run() -> None:
        writer = ResponseWriter(RouterConfig(), CharTokenizer(), RouterMetrics())
        with pytest.raises(oai.ApiError, match="decode-0 went away") as info:
            await writer.collect([(parsed(), endless()), (parsed(), broken())], "cmpl-x")
        assert info.value.status == 502
        await asyncio.wait_for(closed.wait(), 5)

    asyncio.run(run())


def test_streamed_prompts_interleave_with_their_own_indexes_and_one_usage_chunk() -> None:
    async def run() -> list[dict]:
        writer = ResponseWriter(RouterConfig(), CharTokenizer(), RouterMetrics())

        async def handler(request: web.Request) -> web.StreamResponse:
            parts = [(parsed(stream=True, usage=True), events(answer(1, ["abc"], 3), 0.01)),
                     (parsed(stream=True, usage=True), events(answer(1, ["de"], 4), 0.015))]
            return await writer.stream(request, parts, "cmpl-x")

        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        async with TestClient(TestServer(app)) as client:
            resp = await client.post("/v1/completions")
            text = await resp.text()
        return [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]

    chunks = asyncio.run(run())
    texts = {0: "", 1: ""}
    finish = {}
    for ch in chunks[:-1]:
        (c,) = ch["choices"]
        texts[c["index"]] += c["text"]
        if c["finish_reason"]:
            finish[c["index"]] = c["finish_reason"]
    assert texts == {0: "abc", 1: "de"} and finish == {0: "length", 1: "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 7
    assert chunks[-1]["usage"]["completion_tokens"] == 5


def test_merged_tags_items_by_source_and_closes_every_source_on_early_exit() -> None:
    closed: list[int] = []

    async def source(k: int, n: int) -> AsyncIterator[int]:
        try:
            for i in range(n):
                await asyncio.sleep(0.001 * (k + 1))
                yield i
        finally:
            closed.append(k)

    async def run() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        whole = [x async for x in merged([source(0, 3), source(1, 2)])]
        early = []
        it = merged([source(2, 100), source(3, 100)])
        async for x in it:
            early.append(x)
            if len(early) == 3:
                break
        await it.aclose()
        return whole, early

    whole, early = asyncio.run(run())
    assert sorted(whole) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert [i for k, i in whole if k == 0] == [0, 1, 2]  # each source's order kept
    assert len(early) == 3 and sorted(closed) == [0, 1, 2, 3]
