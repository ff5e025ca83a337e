"""Moving decodes, KV and all, off an engine that turns prefill (`--mode auto`): real processes, the
real model, the real `openai` client. The moved answers are the tokens an engine alone would give."""

from __future__ import annotations

import concurrent.futures
import json
import re
import urllib.error
import urllib.request

import openai
import pytest

from appliance.config import EngineConfig
from appliance.engine.request import SamplingParams
from appliance.llm import LLM
from tests.serve.appliance_proc import assert_pools_idle, get_json, running_appliance
from tests.waiting import wait_until

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"
QUESTIONS = ["Tell me about the sea.", "Describe a forest at night.", "Explain how bread is made.",
             "Write about a city in the rain."]
MAX_TOKENS = 80  # long enough to still be decoding when the engine turns


def post_json(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def ask(url: str, q: str) -> tuple[str, int]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                       max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    return r.choices[0].message.content, r.usage.completion_tokens


@pytest.fixture(scope="module")
def offline_answers(smollm_path) -> list[str]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    with LLM(str(smollm_path), EngineConfig(dtype="float32", q4_kernels=False, threads=2)) as llm:
        outs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS], params)
    return [o.text for o in outs]


def test_an_engine_turning_prefill_moves_its_decodes_and_the_answers_do_not_change(offline_answers,
                                                                                    tmp_path) -> None:
    # NOTE: the exact fp32 floats: in bf16, or with int4 decode's bf16 activations, a different batch
    # composition can flip a near-tie in greedy decoding
    with running_appliance("--mode", "auto", "--dtype", "float32", "--no-q4-kernels", "--rebalance-idle-s", "600",
                           log_dir=tmp_path) as url:
        names = {w["leaning"]: w["name"] for w in get_json(url + "/workers")["workers"]}
        pre, dec = names["prefill"], names["decode"]
        # bad operator input: named, nothing changes
        assert post_json(f"{url}/workers/nope/leaning", {"leaning": "decode"})[0] == 404
        status, body = post_json(f"{url}/workers/{pre}/leaning", {"leaning": "sideways"})
        assert status == 400 and "leaning" in body["error"]["message"]
        assert post_json(f"{url}/workers/{dec}/leaning", {"leaning": "prefill"})[0] == 409  # the last decode one
        assert post_json(f"{url}/workers/{pre}/leaning", {"leaning": "decode"}) == (
            200, {"name": pre, "leaning": "decode", "moved": 0})

        with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:
            futs = [pool.submit(ask, url, q) for q in QUESTIONS]

            def spread() -> bool:
                loads = {w["name"]: w["load"] for w in get_json(url + "/workers")["workers"]}
                return all(loads[n].get("decoding", 0) for n in (pre, dec))

            wait_until(spread, 120, 0.1, what="the requests to spread over both engines (least-load spreads the four)")
            status, body = post_json(f"{url}/workers/{pre}/leaning", {"leaning": "prefill"})
            assert status == 200 and body["moved"] >= 1, body
            answers = [f.result(timeout=300) for f in futs]

        assert [n for _, n in answers] == [MAX_TOKENS] * len(QUESTIONS)  # nothing lost, nothing repeated
        assert [t for t, _ in answers] == offline_answers
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        moved = re.search(r'pdbox_decode_moves_total\{outcome="moved"[^}]*\} (\d+)', metrics)
        # NOTE: the switch's answer counts the requests decoding there at that moment; one still prefilling
        # there for itself moves as soon as it decodes (evacuate_all), so the total can be higher.
        assert moved and int(moved.group(1)) >= body["moved"], metrics
        ws = get_json(url + "/workers")
        assert {w["name"]: w["leaning"] for w in ws["workers"]} == {pre: "prefill", dec: "decode"}
        assert ws["decodes_moved"] == int(moved.group(1)) and ws["decode_moves_failed"] == 0, ws
        assert_pools_idle(url)  # the moved requests' pages were freed on both engines
    router_log = (tmp_path / "router.log").read_text()  # the router's own account of it
    assert f"role switch: {pre} -> prefill: operator request" in router_log, router_log
