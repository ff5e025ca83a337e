"""A TP engine whose follower rank dies is started afresh, not left serving errors: its worker process
exits (the engine loop stops, failing what was in flight), the launcher restarts it, and the same
question gets the same answer. Real `pdbox up`, two TP ranks over gloo, a real SIGKILL."""

from __future__ import annotations

import os
import signal

import openai

from tests.serve.appliance_proc import get_json, running_appliance, workers
from tests.waiting import wait_until


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def test_a_dead_tp_rank_restarts_its_worker(tiny_model) -> None:
    with running_appliance("--model", str(tiny_model), "--mode", "unified", "--cpus", "0-1", "--tp", "2",
                           "--dtype", "float32", "--no-monitor") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id

        def ask() -> list[int]:
            r = client.completions.create(model=model, prompt="one two three", max_tokens=6, temperature=0,
                                          logprobs=1)
            return r.choices[0].logprobs.tokens  # type: ignore[union-attr,return-value]

        before = ask()
        (w,) = workers(url)
        pid = get_json(w["url"] + "/load")["pid"]
        cmdlines = {c: open(f"/proc/{c}/cmdline", "rb").read() for c in _children(pid)}
        follower = [c for c, cmd in cmdlines.items() if b"spawn_main" in cmd]  # not the resource tracker
        assert len(follower) == 1, cmdlines
        os.kill(follower[0], signal.SIGKILL)
        wait_until(lambda: (ws := workers(url)) and ws[0]["restarts"] >= 1 and ws[0]["healthy"], 180,
                   interval=0.5, what="the worker restarted after its TP rank died")
        assert get_json(workers(url)[0]["url"] + "/load")["pid"] != pid
        assert ask() == before
