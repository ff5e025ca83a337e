"""`pdbox up --mode auto` under real traffic: roles follow a chat -> RAG shift and no request is lost."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import urllib.request

import openai
import pytest

from tests.serve.appliance_proc import assert_pools_idle, get_json, running_appliance
from tests.waiting import wait_until

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"
LONG_TEXT = " ".join(f"Note {i}: the valve on line {i % 7} reads {i * 3} kPa." for i in range(70))  # ~1 K tokens


async def one(client: openai.AsyncOpenAI, text: str, max_tokens: int) -> int:
    r = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0,
        extra_body={"ignore_eos": True})
    return r.usage.completion_tokens


async def chat_wave(url: str, n: int, max_tokens: int) -> list[int]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    return await asyncio.gather(*(one(client, f"Tell story number {i}.", max_tokens) for i in range(n)))


async def streamed(client: openai.AsyncOpenAI, text: str, max_tokens: int, decoding: list[int]) -> int:
    """``one``, streamed: appends to ``decoding`` when its first token arrives."""
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    tokens = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and not tokens:
            tokens = 1
            decoding.append(1)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens


async def rag_wave(url: str) -> tuple[list[int], list[int]]:
    """Short answers decoding (little TPOT slack) while long prompts arrive beside them. NOTE: the prompts
    go out once every answer is decoding, not after a fixed wait: a faster decode step (a bf16 layer a call)
    had the answers done within the second the test used to wait, and the prompts then found idle engines.
    Short answers, so an engine drains in time for the first long prompt (the ``drain`` decision)."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    decoding: list[int] = []
    chats = [asyncio.create_task(streamed(client, f"Say hi {i}.", 48, decoding)) for i in range(6)]
    async with asyncio.timeout(60):
        while len(decoding) < len(chats):
            await asyncio.sleep(0.02)
    rags = [asyncio.create_task(one(client, f"Doc {i}. {LONG_TEXT} Summarize.", 8)) for i in range(3)]
    return list(await asyncio.gather(*chats)), list(await asyncio.gather(*rags))


class SwitchWatch:
    """Polls /workers in the background until ``role_switches`` reaches ``n``."""

    def __init__(self, url: str, n: int, within_s: float = 120) -> None:
        self.seen: list[dict] = []
        self.thread = threading.Thread(target=self._run, args=(url, n, within_s), daemon=True)
        self.thread.start()

    def _run(self, url: str, n: int, within_s: float) -> None:
        def switched() -> dict | None:
            ws = get_json(url + "/workers")
            return ws if ws["role_switches"] >= n else None

        try:
            self.seen.append(wait_until(switched, within_s, 0.3, what=f"{n} role switches"))
        except TimeoutError:
            pass  # wait() returns None: the test names what it expected

    def wait(self, timeout_s: float) -> dict | None:
        self.thread.join(timeout_s)
        return self.seen[0] if self.seen else None


def test_roles_follow_a_chat_to_rag_shift_under_traffic_and_lose_nothing() -> None:
    with running_appliance("--mode", "auto", "--rebalance-idle-s", "4") as url:
        before = get_json(url + "/workers")
        assert {w["leaning"] for w in before["workers"]} == {"prefill", "decode"}
        # chat-heavy: long decodes, nothing a decode engine cannot prefill itself -> the prefill
        # engine turns to decode while they run
        watch = SwitchWatch(url, 1)
        assert asyncio.run(chat_wave(url, 16, 256)) == [256] * 16  # no request lost across the switch
        assert watch.wait(30) is not None, "no role switch under chat-only traffic"
        both = get_json(url + "/workers")
        assert [w["leaning"] for w in both["workers"]] == ["decode", "decode"]
        # RAG arrives: long prompts beside decodes with little slack need a prefill engine again
        watch = SwitchWatch(url, 2)
        chats, rags = asyncio.run(rag_wave(url))
        assert chats == [48] * 6 and rags == [8] * 3
        after = watch.wait(30)
        assert after is not None, "no switch back to a prefill engine when long prompts arrived"
        assert sorted(w["leaning"] for w in after["workers"]) == ["decode", "prefill"]
        assert after["last_decision"]
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        assert "pdbox_role_switches_total" in metrics and 'pdbox_auto_decisions_total{decision="local"' in metrics
        # the first long prompt found no prefill engine and no decode slack: it waited for an engine to drain
        assert 'pdbox_auto_decisions_total{decision="disagg",reason="drain",' in metrics, metrics
        frame = subprocess.run([sys.executable, "-m", "appliance.cli", "monitor", "--url", url, "--once"],
                               capture_output=True, text=True, timeout=60).stdout
        # each engine's leaning now (the quiet window may already have turned the prefill one back)
        assert "auto:decode" in frame, frame
        # a move the source refuses ("not decoding here") leaves the request in place: "(M failed)"
        switches = re.search(r"auto: disagg \d+ local \d+, (\d+) role switches, \d+ decodes moved"
                             r"(?: \(\d+ failed\))?; last: \w+", frame)
        assert switches and int(switches.group(1)) >= 2, frame
        assert asyncio.run(chat_wave(url, 4, 16)) == [16] * 4  # new requests after the switches succeed
        assert_pools_idle(url)
