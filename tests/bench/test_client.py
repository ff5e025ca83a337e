"""The streaming client: what it sends, how it parses SSE, and what it records, against a fake server."""

from __future__ import annotations

import asyncio
import socket

import pytest

from bench.client import (
    ClientConfig,
    OpenAIClient,
    RequestOutcome,
    build_payload,
    chunk_text,
    first_model_id,
    normalize_base_url,
    parse_sse_line,
)
from bench.workloads import BenchRequest
from tests.bench.conftest import ThreadServer
from tests.bench.fake_server import BODIES, MODEL_ID, make_app

REQUEST = BenchRequest(prompt="hello there world", prompt_len=3, output_len=7, kind="test")


def test_payload_matches_what_vllm_bench_serve_sends() -> None:
    chat = build_payload(ClientConfig("http://h:1", "m", "chat"), REQUEST)
    assert chat == {
        "model": "m",
        "messages": [{"role": "user", "content": "hello there world"}],
        "max_completion_tokens": 7,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    completion = build_payload(ClientConfig("http://h:1", "m", "completions"), REQUEST)
    assert completion["prompt"] == "hello there world" and completion["max_tokens"] == 7
    assert "messages" not in completion and "max_completion_tokens" not in completion


def test_config_urls_and_validation() -> None:
    assert ClientConfig("http://h:1/v1/", "m").url == "http://h:1/v1/chat/completions"
    assert ClientConfig("http://h:1", "m", "completions").url == "http://h:1/v1/completions"
    assert normalize_base_url("http://h:1/") == "http://h:1"
    assert ClientConfig("http://h:1", "m", api_key="k").headers["Authorization"] == "Bearer k"
    with pytest.raises(ValueError, match="endpoint"):
        ClientConfig("http://h:1", "m", "embeddings")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="http"):
        ClientConfig("h:1", "m")
    with pytest.raises(ValueError, match="timeout"):
        ClientConfig("http://h:1", "m", timeout_s=0)


def test_sse_parsing() -> None:
    assert parse_sse_line(b'data: {"a": 1}\n') == {"a": 1}
    assert parse_sse_line(b'data:{"a": 2}') == {"a": 2}
    for line in (b"\n", b": ping\n", b"data: [DONE]\n", b"event: message\n", b"data: \n"):
        assert parse_sse_line(line) is None
    with pytest.raises(ValueError):
        parse_sse_line(b"data: [1, 2]")
    assert chunk_text({"choices": [{"delta": {"content": "x"}}]}) == "x"
    assert chunk_text({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) == ""
    assert chunk_text({"choices": [{"delta": {"content": None}}]}) == ""
    assert chunk_text({"choices": [{"text": "y"}]}) == "y"
    assert chunk_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""


def _send(server: ThreadServer, request: BenchRequest = REQUEST, **cfg: object) -> RequestOutcome:
    async def go() -> RequestOutcome:
        async with OpenAIClient(ClientConfig(server.url, MODEL_ID, **cfg)) as client:  # type: ignore[arg-type]
            return await client.send(request)

    return asyncio.run(go())


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_timings_and_counts(fake_server: ThreadServer, endpoint: str) -> None:
    o = _send(fake_server, endpoint=endpoint)
    assert o.success and o.error == ""
    assert o.output_tokens == 7 and len(o.chunk_times) == 7 and len(o.itls_s) == 6
    assert o.server_prompt_tokens == 3 and o.prompt_len == 3
    # The role chunk arrives before the 4 ms "prefill" and must not count as the first token.
    assert o.ttft_s is not None and o.ttft_s >= 0.004
    assert o.send_time < o.chunk_times[0] <= o.chunk_times[-1] <= o.end_time
    assert fake_server.app[BODIES][-1]["ignore_eos"] is True


def test_without_usage_the_chunks_are_counted() -> None:
    with ThreadServer(make_app(usage=False)) as server:
        o = _send(server)
    assert o.success and o.output_tokens == 7 and o.server_prompt_tokens is None


def test_http_error_is_recorded_not_raised(fake_server: ThreadServer) -> None:
    o = _send(fake_server, BenchRequest("please FAIL-ME now", 3, 5, "test"))
    assert not o.success and o.error.startswith("HTTP 500") and "asked to fail" in o.error
    assert o.output_tokens == 0 and o.ttft_s is None


def test_every_request_has_a_timeout() -> None:
    with ThreadServer(make_app(prefill_s=1.0)) as server:
        o = _send(server, timeout_s=0.2)
    assert not o.success and "timed out after 0.2 s" in o.error
    assert o.e2el_s < 0.9


def test_unreachable_server_is_a_failed_outcome() -> None:
    with socket.socket() as s:  # a port nobody listens on once this socket closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    o = asyncio.run(_unreachable(port))
    assert not o.success and "ClientConnectorError" in o.error
    with pytest.raises(RuntimeError, match="cannot reach"):
        asyncio.run(first_model_id(f"http://127.0.0.1:{port}", timeout_s=2))


async def _unreachable(port: int) -> RequestOutcome:
    async with OpenAIClient(ClientConfig(f"http://127.0.0.1:{port}", "m")) as client:
        return await client.send(REQUEST)


def test_first_model_id(fake_server: ThreadServer) -> None:
    assert asyncio.run(first_model_id(fake_server.url + "/v1")) == MODEL_ID


def test_send_outside_context_is_a_programming_error() -> None:
    with pytest.raises(RuntimeError, match="async with"):
        asyncio.run(OpenAIClient(ClientConfig("http://h:1", "m")).send(REQUEST))
