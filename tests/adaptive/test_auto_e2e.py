"""`pdbox up --mode auto` under real traffic: a role switch happens and no request is lost."""

from __future__ import annotations

import asyncio
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
        counts = asyncio.run(wave(url, 12, 128))  # chat-heavy: many long decodes, little to prefill
        assert counts == [128] * 12
        deadline = time.monotonic() + 20
        after = get_json(url + "/workers")
        while after["role_switches"] < 1 and time.monotonic() < deadline:
            time.sleep(0.5)
            after = get_json(url + "/workers")
        assert after["role_switches"] >= 1, after
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
