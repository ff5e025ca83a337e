"""`pdbox up --mode auto` under real traffic: a role switch happens and no request is lost."""

from __future__ import annotations

import asyncio
import threading
import time

import openai
import pytest

from tests.serve.appliance_proc import assert_pools_idle, get_json, running_appliance

pytestmark = pytest.mark.slow


async def wave(url: str, n: int, max_tokens: int) -> list[int]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)

    async def one(i: int) -> int:
        r = await client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": f"Tell story number {i}."}],
            max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
        return r.usage.completion_tokens

    return await asyncio.gather(*(one(i) for i in range(n)))


def test_role_switch_under_chat_traffic_loses_nothing() -> None:
    with running_appliance("--mode", "auto") as url:
        before = get_json(url + "/workers")
        assert {w["leaning"] for w in before["workers"]} == {"prefill", "decode"}
        # chat-heavy: many long decodes, little to prefill; the switch must happen while they run
        switched: list[dict] = []

        def watch() -> None:
            deadline = time.monotonic() + 120
            while not switched and time.monotonic() < deadline:
                ws = get_json(url + "/workers")
                if ws["role_switches"] >= 1:
                    switched.append(ws)
                time.sleep(0.3)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        counts = asyncio.run(wave(url, 16, 256))
        assert counts == [256] * 16  # no request lost across the switch
        watcher.join(5)
        assert switched, "no role switch under chat-heavy traffic"
        after = get_json(url + "/workers")
        assert [w["leaning"] for w in after["workers"]] == ["decode", "decode"]
        assert after["last_decision"]
        metrics = get_json_text(url + "/metrics")
        assert "pdbox_role_switches_total" in metrics and "pdbox_auto_decisions_total" in metrics
        assert asyncio.run(wave(url, 4, 16)) == [16] * 4  # new requests after the switch succeed
        assert_pools_idle(url)


def get_json_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()
