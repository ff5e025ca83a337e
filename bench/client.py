"""Async streaming client for any OpenAI-compatible server (pdbox, vLLM, SGLang).

It sends what `vllm bench serve` sends (`model`, `max_completion_tokens` for chat or `max_tokens` for
completions, `stream`, `stream_options.include_usage`, `ignore_eos`, `temperature: 0`) and records,
per request, the send time, every token-chunk arrival time and the end time on one monotonic clock
(`time.perf_counter`).

Two deliberate differences from vLLM's client, both semantically neutral:
- chat content is a plain string, not a list of content parts, so servers that only accept strings work;
- only chunks that carry text count as token chunks, so a server that sends the `role` header before
  prefill finishes cannot report an artificially low TTFT.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from bench.workloads import BenchRequest

Endpoint = Literal["chat", "completions"]
ENDPOINT_PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass(frozen=True)
class ClientConfig:
    """Where and how to send requests. `base_url` is the server root, e.g. `http://127.0.0.1:8000`."""

    base_url: str
    model: str
    endpoint: Endpoint = "chat"
    timeout_s: float = 600.0
    api_key: str | None = None

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINT_PATHS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINT_PATHS)}, got {self.endpoint!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")

    @property
    def url(self) -> str:
        return normalize_base_url(self.base_url) + ENDPOINT_PATHS[self.endpoint]

    @property
    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


@dataclass(frozen=True)
class RequestOutcome:
    """What one request did, timed on `time.perf_counter()`.

    `chunk_times` holds the arrival time of every chunk that carried generated text; the first one is
    the first token. `output_tokens` comes from the server's `usage` when it sends one, else it is the
    number of text chunks. On failure `success` is False and `error` says why.
    """

    prompt_len: int
    output_len: int
    send_time: float
    end_time: float
    chunk_times: tuple[float, ...] = ()
    output_tokens: int = 0
    server_prompt_tokens: int | None = None
    success: bool = False
    error: str = ""

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times[0] - self.send_time if self.chunk_times else None

    @property
    def e2el_s(self) -> float:
        return self.end_time - self.send_time

    @property
    def itls_s(self) -> list[float]:
        """Gaps between consecutive text chunks (a chunk may hold several tokens, as in vLLM)."""
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output_tokens - 1)."""
        ttft = self.ttft_s
        if ttft is None or self.output_tokens <= 1:
            return None
        return (self.e2el_s - ttft) / (self.output_tokens - 1)


def normalize_base_url(url: str) -> str:
    """`http://h:p/v1/` and `http://h:p` both name the server root `http://h:p`."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def build_payload(config: ClientConfig, request: BenchRequest) -> dict[str, Any]:
    """The JSON body `vllm bench serve` sends for this endpoint (chat content as a plain string)."""
    payload: dict[str, Any] = {
        "model": config.model,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if config.endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": request.prompt}]
        payload["max_completion_tokens"] = request.output_len
    else:
        payload["prompt"] = request.prompt
        payload["max_tokens"] = request.output_len
    return payload


def parse_sse_line(line: bytes) -> dict[str, Any] | None:
    """One SSE line -> its JSON event, or None for blank lines, comments, non-data fields and [DONE]."""
    text = line.decode("utf-8").strip()
    if not text.startswith("data:"):
        return None
    data = text[len("data:") :].strip()
    if not data or data == "[DONE]":
        return None
    event = json.loads(data)
    if not isinstance(event, dict):
        raise ValueError(f"SSE event is not a JSON object: {data[:200]}")
    return event


def chunk_text(event: dict[str, Any]) -> str:
    """The generated text an event carries (chat `delta.content` or completions `text`), else ''."""
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    return text if isinstance(text, str) else ""


@dataclass
class _Recorder:
    """Mutable state while one stream is read; frozen into a RequestOutcome at the end."""

    request: BenchRequest
    send_time: float
    chunk_times: list[float] = field(default_factory=list)
    usage_tokens: int | None = None
    server_prompt_tokens: int | None = None

    def observe(self, event: dict[str, Any], now: float) -> None:
        if "error" in event:
            raise RuntimeError(f"server error in stream: {json.dumps(event['error'])[:300]}")
        if chunk_text(event):
            self.chunk_times.append(now)
        usage = event.get("usage")
        if isinstance(usage, dict):
            if isinstance(usage.get("completion_tokens"), int):
                self.usage_tokens = usage["completion_tokens"]
            if isinstance(usage.get("prompt_tokens"), int):
                self.server_prompt_tokens = usage["prompt_tokens"]

    def finish(self, end_time: float, error: str = "") -> RequestOutcome:
        if not error and not self.chunk_times:
            error = "stream ended without any generated text"
        output_tokens = self.usage_tokens if self.usage_tokens is not None else len(self.chunk_times)
        return RequestOutcome(
            prompt_len=self.request.prompt_len,
            output_len=self.request.output_len,
            send_time=self.send_time,
            end_time=end_time,
            chunk_times=tuple(self.chunk_times),
            output_tokens=output_tokens if not error else 0,
            server_prompt_tokens=self.server_prompt_tokens,
            success=not error,
            error=error,
        )


class OpenAIClient:
    """Streams requests to one server over one keep-alive session with no client-side connection cap.

    Use as `async with OpenAIClient(config) as client: outcome = await client.send(request)`.
    `send` never raises for a failed request: the failure is in the returned outcome.
    """

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OpenAIClient:
        # NOTE: limit=0 lifts aiohttp's default 100-connection cap, which would otherwise queue requests
        # on the client and hide server-side queueing from TTFT (vLLM does the same).
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        self._session = aiohttp.ClientSession(connector=connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, request: BenchRequest) -> RequestOutcome:
        """Stream one request to completion, failure or timeout, and return what was observed."""
        if self._session is None:
            raise RuntimeError("OpenAIClient.send called outside `async with OpenAIClient(...)`")
        recorder = _Recorder(request=request, send_time=time.perf_counter())
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        try:
            async with self._session.post(
                self.config.url,
                json=build_payload(self.config, request),
                headers=self.config.headers,
                timeout=timeout,
            ) as response:
                if response.status != 200:
                    body = (await response.text())[:300]
                    return recorder.finish(time.perf_counter(), f"HTTP {response.status}: {body}")
                async for line in response.content:
                    event = parse_sse_line(line)
                    if event is not None:
                        recorder.observe(event, time.perf_counter())
            return recorder.finish(time.perf_counter())
        except asyncio.TimeoutError:
            return recorder.finish(time.perf_counter(), f"timed out after {self.config.timeout_s:g} s")
        except (aiohttp.ClientError, ValueError, RuntimeError) as exc:
            return recorder.finish(time.perf_counter(), f"{type(exc).__name__}: {exc}")


async def first_model_id(base_url: str, timeout_s: float = 30.0, api_key: str | None = None) -> str:
    """The first model id from `GET /v1/models`, as `vllm bench serve` picks it when --model is omitted."""
    url = normalize_base_url(base_url) + "/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url, headers=headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"GET {url} returned HTTP {resp.status}; pass --model explicitly")
            data = await resp.json()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise RuntimeError(f"cannot reach {url} ({type(exc).__name__}: {exc}); is the server up?") from exc
    models = data.get("data") if isinstance(data, dict) else None
    if not models:
        raise RuntimeError(f"GET {url} listed no models; pass --model explicitly")
    return str(models[0]["id"])
