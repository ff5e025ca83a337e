"""Clients that vanish: mid-stream (decode phase), during prefill, and without streaming. Both engines
drop the request at once (well before it would have finished) and free its pages."""

from __future__ import annotations

import random
import secrets
import subprocess
import time

import pytest

from tests.chaos.chaos_util import (
    CHAT,
    COMP,
    MODEL,
    QUESTION,
    SSE,
    Appliance,
    get_json,
    in_thread,
    listening,
    loads,
    wait_pools_idle,
    wait_until,
)
from tests.chaos.conftest import record

pytestmark = pytest.mark.slow

ABORT_DEADLINE_S = 3.0  # the 1000-token answers below would take 20+ s to finish on their own


def engines_quiet(app: Appliance) -> bool:
    return all(not ld["running"] and not ld["waiting"] and not ld["reserved_rooms"] for ld in loads(app).values())


def test_client_gone_mid_stream_aborts_on_both_engines(guarded: Appliance) -> None:
    sse = SSE(guarded, CHAT, {"model": MODEL, "messages": QUESTION, "max_tokens": 1000, "ignore_eos": True})
    assert sse.status == 200
    events = sse.events()
    for _ in range(5):
        next(events)
    d = guarded.worker("decode")
    assert get_json(d["url"] + "/load")["running"] == 1
    sse.drop()
    t0 = time.monotonic()
    wait_until(lambda: engines_quiet(guarded), ABORT_DEADLINE_S, "both engines to drop the request")
    record("faults injected and survived", 1)
    print(f"client gone mid-stream: engines quiet after {time.monotonic() - t0:.2f} s")
    wait_pools_idle(guarded)
    status, body = guarded.chat()
    assert status == 200, body


def test_client_gone_during_prefill_frees_both_legs(guarded: Appliance) -> None:
    rng = random.Random(secrets.randbits(32))
    prompt = [rng.randrange(1000, 20000) for _ in range(1500)]
    sse_box = in_thread(lambda: SSE(guarded, COMP, {"model": MODEL, "prompt": prompt, "max_tokens": 1000,
                                                     "ignore_eos": True}))
    d = guarded.worker("decode")
    wait_until(lambda: get_json(d["url"] + "/load")["reserved_rooms"] == 1, 10, "decode's reservation")
    # NOTE: the router answers a stream's headers with the first token, so the client's socket is killed
    # under the pending request (the SSE helper hands its connection over only once headers came).
    router_port = next(p for _, p in listening(guarded.pid))
    subprocess.run(["ss", "-K", "-t", "state", "established", f"( dport = :{router_port} )"], check=True,
                   capture_output=True, timeout=10)
    t0 = time.monotonic()
    try:
        sse_box(30)
    except OSError:
        pass  # the client saw its own connection die: expected
    wait_until(lambda: get_json(d["url"] + "/load")["reserved_rooms"] == 0, ABORT_DEADLINE_S,
               "decode to drop the reservation")
    wait_until(lambda: engines_quiet(guarded), 10, "prefill to drop the prompt (after its current chunk)")
    record("faults injected and survived", 1)
    print(f"client gone during prefill: engines quiet after {time.monotonic() - t0:.2f} s")
    wait_pools_idle(guarded)


def test_client_gone_without_streaming_aborts_too(guarded: Appliance) -> None:
    job = in_thread(lambda: guarded.post(CHAT, {"model": MODEL, "messages": QUESTION, "max_tokens": 1000,
                                                "ignore_eos": True}, timeout=2.0))
    d = guarded.worker("decode")
    wait_until(lambda: get_json(d["url"] + "/load")["running"] == 1, 10, "decode to run the request")
    try:
        job(10)  # the client gives up after 2 s and closes its socket
    except OSError:
        pass
    t0 = time.monotonic()
    wait_until(lambda: engines_quiet(guarded), ABORT_DEADLINE_S, "both engines to drop the request")
    record("faults injected and survived", 1)
    print(f"client timeout (non-streaming): engines quiet after {time.monotonic() - t0:.2f} s")
    wait_pools_idle(guarded)
