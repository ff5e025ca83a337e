"""A burst of prompts queued on one prefill engine is served, not failed by leases that expire in the queue."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.serve.appliance_proc import assert_pools_idle, running_appliance

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"


async def burst(url: str, n: int) -> list[int]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)

    async def one(i: int) -> int:
        prompt = [1000 + 7 * i + j for j in range(40)]  # no shared prefix: every prompt prefills whole
        r = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0,
                                            extra_body={"ignore_eos": True})
        return r.usage.completion_tokens

    return await asyncio.gather(*(one(i) for i in range(n)))


def test_burst_outlives_a_lease_sized_for_one_prompt() -> None:
    # One prompt's lease is 0.2 s + 0.05 s x 40 tokens = 2.2 s; the 16th of a burst waits for 15
    # prefills first (several seconds on one core). Its lease must count the prompts ahead of it.
    with running_appliance("--mode", "disagg", "--lease-s", "0.2", "--dtype", "float32") as url:
        assert asyncio.run(burst(url, 16)) == [2] * 16
        assert_pools_idle(url)
