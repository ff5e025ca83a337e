"""A decode engine with no free KV pages makes a new prompt wait (within a deadline), not fail."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from appliance.serve.router_config import RouterConfig
from tests.serve.appliance_proc import assert_pools_idle, running_appliance

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"
PROMPT = list(range(1000, 1040))  # 40 tokens: 3 pages reserved on decode, 5 once its 30-token answer is out


async def both(url: str) -> tuple[list[int], list[float]]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    t0 = time.monotonic()

    async def one(delay_s: float) -> tuple[int, float]:
        await asyncio.sleep(delay_s)
        r = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0,
                                            extra_body={"ignore_eos": True})
        return r.usage.completion_tokens, time.monotonic() - t0

    out = await asyncio.gather(one(0.0), one(0.3))
    return [n for n, _ in out], [t for _, t in out]


def test_a_prompt_waits_for_a_full_decode_engine_then_is_served() -> None:
    # 4 MB of KV per engine: 5 pages of 16 tokens, one such request at a time on the decode engine
    with running_appliance("--kv-cache-mb", "4", "--dtype", "float32") as url:
        tokens, done = asyncio.run(both(url))
        assert tokens == [30, 30]  # the second was not refused: it waited for the first one's pages
        assert done[1] > done[0]  # ... and so ended after it
        assert_pools_idle(url)


def test_kv_wait_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="kv_wait_s must be >= 0"):
        RouterConfig(kv_wait_s=-1)
