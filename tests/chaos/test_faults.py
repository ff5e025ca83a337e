"""Faults injected for real into a running appliance (`--transport tcp`): a killed KV connection, hung
workers (SIGSTOP), a prefill that never comes (lease expiry), killed prefill and decode workers.

Each fault must end within its deadline with the documented outcome (router.py's module docstring
lists the deadlines), and afterwards both engines' pools are idle and new requests succeed."""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Iterator

import pytest

from tests.chaos.chaos_util import (
    COMP,
    MODEL,
    SSE,
    Appliance,
    Stopped,
    appliance,
    cluster_token,
    error_of,
    get_json,
    in_thread,
    listening,
    loads,
    remote_ports,
    wait_healthy,
    wait_pools_idle,
)
from tests.chaos.conftest import record
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

HUNG_DEADLINE_S = 12.0  # probe timeout 1 s + unhealthy_after 3 s + health interval 1 s, with room for a busy box
KILLED_DEADLINE_S = 6.0


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    """Disaggregated over tcp; the router on 127.0.0.2 (--host), the workers on 127.0.0.1."""
    with appliance("--transport", "tcp", "--host", "127.0.0.2",
                   log_dir=tmp_path_factory.mktemp("faulty-logs")) as app:
        yield app


def long_prompt(n: int) -> list[int]:
    """Token ids nobody sent before (the prefix cache must not make the prefill fast)."""
    rng = random.Random(secrets.randbits(32))
    return [rng.randrange(1000, 20000) for _ in range(n)]


def decode_reserved(app: Appliance) -> bool:
    d = app.worker("decode")
    return get_json(d["url"] + "/load")["reserved_rooms"] >= 1


def outcome(sse: SSE) -> tuple[str, float]:
    """How a stream ended ("done", "error: …" or "http <status>: …") and when (s since it started)."""
    if sse.status != 200:
        err = error_of(sse.resp.read())
        return f"http {sse.status}: {err['message']}", time.monotonic()
    last = None
    for ev in sse.events():
        if ev == "[DONE]":
            break
        last = ev
    t = time.monotonic()
    if isinstance(last, dict) and "error" in last:
        return f"error: {last['error']['message']}", t
    return "done", t


def stream_in_thread(app: Appliance, body: dict):
    """Start a streaming request on a thread (the router answers its headers only with the first token);
    the returned join gives `outcome`."""
    return in_thread(lambda: outcome(SSE(app, COMP, {"model": MODEL, **body})))


def check_served(app: Appliance) -> None:
    status, body = app.chat(max_tokens=8)
    assert status == 200, body
    assert "Paris" in body["choices"][0]["message"]["content"]


def fault(name: str, seconds_to_fail: float) -> None:
    record("faults injected and survived", 1)
    record("longest time to fail a request (s)", round(seconds_to_fail, 2), how="max")
    print(f"{name}: the request failed {seconds_to_fail:.2f} s after the fault")


def test_router_and_workers_bind_where_told(faulty: Appliance) -> None:
    host = urllib.parse.urlsplit(faulty.url).hostname
    assert host == "127.0.0.2"
    assert {ip for ip, _ in listening(faulty.pid)} == {"127.0.0.2"}
    for w in faulty.workers():
        assert {ip for ip, _ in listening(w["pid"])} == {"127.0.0.1"}, w["name"]


def test_killed_kv_connection_fails_only_the_room_it_carried(faulty: Appliance) -> None:
    d = faulty.worker("decode")
    http_port = urllib.parse.urlsplit(d["url"]).port
    kv_port = next(port for _, port in listening(d["pid"]) if port != http_port)
    check_served(faulty)  # the prefill -> decode KV connection is open
    victim = stream_in_thread(faulty, {"prompt": long_prompt(1500), "max_tokens": 4})
    wait_until(lambda: decode_reserved(faulty), 10, what="decode's reservation")
    time.sleep(0.5)  # prefill is pushing the first chunk's layers
    t0 = time.monotonic()
    subprocess.run(["ss", "-K", "-t", "state", "established", f"( dport = :{kv_port} or sport = :{kv_port} )"],
                   check=True, capture_output=True, timeout=10)
    bystander = in_thread(lambda: faulty.chat(max_tokens=8))  # a room that starts after the kill
    how, at = victim(30)
    assert how.startswith(("error:", "http 502")), how
    assert "KV" in how or "handoff" in how or "transfer" in how, how
    fault("killed KV connection", at - t0)
    assert at - t0 < KILLED_DEADLINE_S
    status, body = bystander(60)
    assert status == 200, body  # prefill reconnected: the failure did not stick to the pair
    wait_pools_idle(faulty)
    check_served(faulty)


def test_hung_decode_fails_its_stream_within_the_deadline(faulty: Appliance) -> None:
    d = faulty.worker("decode")
    sse = SSE(faulty, COMP, {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True})
    events = sse.events()
    for _ in range(3):
        next(events)
    with Stopped(d["pid"]):
        t0 = time.monotonic()
        how, at = outcome(sse)
        assert how.startswith("error:"), how
    fault("SIGSTOP decode", at - t0)
    assert at - t0 < HUNG_DEADLINE_S, how
    wait_healthy(faulty, 30)
    wait_pools_idle(faulty)
    check_served(faulty)


def test_hung_prefill_fails_the_request_within_the_deadline(faulty: Appliance) -> None:
    p = faulty.worker("prefill")
    victim = stream_in_thread(faulty, {"prompt": long_prompt(1200), "max_tokens": 4})
    wait_until(lambda: decode_reserved(faulty), 10, what="decode's reservation")
    with Stopped(p["pid"]):
        t0 = time.monotonic()
        how, at = victim(30)
        assert how.startswith(("http 502", "error:")), how
        assert loads_of(faulty, "decode")["reserved_rooms"] == 0  # decode let the room go at once
    fault("SIGSTOP prefill", at - t0)
    assert at - t0 < HUNG_DEADLINE_S, how
    wait_healthy(faulty, 30)
    wait_pools_idle(faulty)
    check_served(faulty)


def _gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie awaiting its parent's wait)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_frozen_prefill_is_killed_before_decode_reuses_the_pages_it_was_writing(faulty: Appliance) -> None:
    """A prefill frozen mid-handoff (SIGSTOP held) is killed by the launcher within HUNG_KILL_S of its last
    answer, so it cannot wake and write a failed room's pages after decode gave them to another request
    (HANDOFF_QUIET_MAX_S after the failure); it is restarted and serves again."""
    from appliance.launcher import HUNG_KILL_S
    from appliance.serve.engine_loop import HANDOFF_QUIET_MAX_S

    assert HUNG_KILL_S + 2.0 < HANDOFF_QUIET_MAX_S  # the probe's interval and timeout, 1 s each
    p = faulty.worker("prefill")
    victim = stream_in_thread(faulty, {"prompt": long_prompt(1200), "max_tokens": 4})
    wait_until(lambda: decode_reserved(faulty), 10, what="decode's reservation")
    os.kill(p["pid"], signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        how, at = victim(30)
        assert how.startswith(("http 502", "error:")), how
        wait_until(lambda: _gone(p["pid"]), HUNG_KILL_S + 5, 0.1, what="the launcher's kill of the frozen prefill")
        killed_after = time.monotonic() - t0
    finally:
        if not _gone(p["pid"]):
            os.kill(p["pid"], signal.SIGCONT)
    fault("SIGSTOP prefill, held", at - t0)
    assert HUNG_KILL_S - 1.5 < killed_after < HANDOFF_QUIET_MAX_S, killed_after
    ws = wait_healthy(faulty, 90, restarts={p["name"]: p["restarts"] + 1})
    assert next(w for w in ws if w["name"] == p["name"])["pid"] != p["pid"]
    wait_pools_idle(faulty)
    check_served(faulty)


def loads_of(app: Appliance, role: str) -> dict:
    return get_json(app.worker(role)["url"] + "/load")


def test_lease_frees_pages_when_prefill_never_comes(faulty: Appliance) -> None:
    """A reservation whose prefill never arrives (a router or prefill gone between the two legs)."""
    d = faulty.worker("decode")
    token = cluster_token(d["pid"])
    idle = loads_of(faulty, "decode")
    body = {"rid": "chaos-" + secrets.token_hex(6), "room": secrets.token_urlsafe(18), "prompt_ids": long_prompt(100),
            "sampling": {"max_tokens": 4}, "lease_s": 2.0}
    u = urllib.parse.urlsplit(d["url"])
    import http.client

    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", "/internal/decode", json.dumps(body), {"Authorization": f"Bearer {token}"})
    resp = conn.getresponse()
    assert resp.status == 200
    t0 = time.monotonic()
    first = json.loads(resp.readline())
    assert first["kind"] == "reserved" and len(first["pages"]) == 7
    held = loads_of(faulty, "decode")
    assert held["reserved_rooms"] == 1 and held["free_pages"] == idle["free_pages"] - 7
    last = json.loads(resp.readline())
    waited = time.monotonic() - t0
    conn.close()
    assert last["kind"] == "error" and "deadline" in last["message"], last
    assert 1.5 < waited < 2.0 + 1.5, waited
    fault("lease expiry", waited)
    wait_pools_idle(faulty, 5)


def test_renewed_lease_holds_the_room_until_renewals_stop(faulty: Appliance) -> None:
    """What the router does while a prompt waits in prefill's queue: POST /internal/extend keeps decode's
    reservation; when the renewals stop, the lease ends it as before and the pages come back."""
    import http.client

    d = faulty.worker("decode")
    auth = {"Authorization": f"Bearer {cluster_token(d['pid'])}"}
    u = urllib.parse.urlsplit(d["url"])
    room = secrets.token_urlsafe(18)
    body = {"rid": "chaos-" + secrets.token_hex(6), "room": room, "prompt_ids": long_prompt(100),
            "sampling": {"max_tokens": 4}, "lease_s": 1.0}
    stream = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    stream.request("POST", "/internal/decode", json.dumps(body), auth)
    resp = stream.getresponse()
    assert resp.status == 200 and json.loads(resp.readline())["kind"] == "reserved"

    def extend(lease_s: float, which: str = room) -> tuple[int, dict | str]:
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        c.request("POST", "/internal/extend", json.dumps({"room": which, "lease_s": lease_s}), auth)
        r = c.getresponse()
        raw = r.read().decode()
        c.close()
        return r.status, json.loads(raw) if r.status == 200 else raw

    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0:  # three leases' worth, renewed every 0.3 s
        assert extend(1.0) == (200, {"ok": True})
        time.sleep(0.3)
    assert loads_of(faulty, "decode")["reserved_rooms"] == 1  # still held, past its first lease
    assert extend(1.0, "no-such-room") == (200, {"ok": False})
    status, text = extend(0.0)
    assert status == 400 and "lease_s" in text
    stopped = time.monotonic()
    last = json.loads(resp.readline())  # no more renewals: the lease ends the room
    waited = time.monotonic() - stopped
    stream.close()
    assert last["kind"] == "error" and "deadline" in last["message"], last
    assert waited < 1.0 + 1.5, waited
    assert extend(1.0) == (200, {"ok": False})  # a failed room is not revived
    wait_pools_idle(faulty, 5)


def test_killed_prefill_after_reservation_fails_fast_and_is_restarted(faulty: Appliance) -> None:
    p = faulty.worker("prefill")
    sse_job = stream_in_thread(faulty, {"prompt": long_prompt(1500), "max_tokens": 4})
    wait_until(lambda: decode_reserved(faulty), 10, what="decode's reservation")
    t0 = time.monotonic()
    os.kill(p["pid"], signal.SIGKILL)
    how, at = sse_job(30)
    assert how.startswith(("http 502", "error:")), how
    fault("SIGKILL prefill", at - t0)
    assert at - t0 < KILLED_DEADLINE_S, how
    wait_until(lambda: loads_of(faulty, "decode")["reserved_rooms"] == 0, 5, what="decode to drop the room")
    ws = wait_healthy(faulty, 120, restarts={"prefill-0": p["restarts"] + 1})
    assert next(w for w in ws if w["role"] == "prefill")["pid"] != p["pid"]
    wait_pools_idle(faulty)
    check_served(faulty)


def test_killed_decode_ends_the_stream_with_an_error_and_is_restarted(faulty: Appliance) -> None:
    d = faulty.worker("decode")
    old_kv_port = next(port for _, port in listening(d["pid"]) if port != urllib.parse.urlsplit(d["url"]).port)
    sse = SSE(faulty, COMP, {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True})
    events = sse.events()
    for _ in range(3):
        next(events)
    t0 = time.monotonic()
    os.kill(d["pid"], signal.SIGKILL)
    how, at = outcome(sse)
    assert how.startswith("error:"), how
    fault("SIGKILL decode", at - t0)
    assert at - t0 < KILLED_DEADLINE_S, how
    ws = wait_healthy(faulty, 120, restarts={"decode-0": d["restarts"] + 1})
    assert next(w for w in ws if w["role"] == "decode")["pid"] != d["pid"]
    wait_pools_idle(faulty)
    for _ in range(3):  # new rooms reach the new decode pool (prefill opens a fresh KV connection)
        check_served(faulty)
    assert all(ld["reserved_rooms"] == 0 for ld in loads(faulty).values())
    p = faulty.worker("prefill")
    assert old_kv_port not in remote_ports(p["pid"]), "prefill still holds its connection to the dead decode"
