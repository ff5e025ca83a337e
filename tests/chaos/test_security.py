"""Security: loopback binding, the API key, the cluster token on internal endpoints, no secret in
public answers, bogus rooms (HTTP and KV transport) that cannot grow a worker's memory, and no
pickle or eval anywhere in the serving and transport code."""

from __future__ import annotations

import http.client
import json
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.chaos.chaos_util import (
    CHAT,
    MODEL,
    QUESTION,
    Appliance,
    cluster_token,
    error_of,
    http_call,
    listening,
    rss_mb,
    wait_pools_idle,
)
from tests.chaos.conftest import record

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
INTERNAL = ("/internal/generate", "/internal/prefill", "/internal/decode", "/internal/abort")


def internal(worker: dict, path: str, body: dict | bytes, token: str) -> tuple[int, list[dict]]:
    """POST to a worker's internal endpoint; the NDJSON lines (or the error body) it answers."""
    u = urlsplit(worker["url"])
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, raw, {"Authorization": f"Bearer {token}"} if token else {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    if resp.status != 200 or not data.strip():
        return resp.status, [{"raw": data.decode(errors="replace")}]
    return resp.status, [json.loads(line) for line in data.splitlines() if line.strip()]


def bogus_decode(n_tokens: int = 37, lease_s: float = 0.3) -> dict:
    return {"rid": "bogus-" + secrets.token_hex(8), "room": secrets.token_urlsafe(18),
            "prompt_ids": list(range(1000, 1000 + n_tokens)), "sampling": {"max_tokens": 4}, "lease_s": lease_s}


def test_everything_binds_loopback_by_default(guarded: Appliance) -> None:
    assert urlsplit(guarded.url).hostname == "127.0.0.1"
    assert {ip for ip, _ in listening(guarded.pid)} == {"127.0.0.1"}
    for w in guarded.workers():  # HTTP and the KV transport listener
        addrs = listening(w["pid"])
        assert addrs and {ip for ip, _ in addrs} == {"127.0.0.1"}, (w["name"], addrs)


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic Y2hhb3M6a2V5", "Bearer", "Bearer \u00e9t\u00e9"],
                         ids=["none", "wrong", "basic", "empty", "non-ascii"])
def test_api_key_is_required(guarded: Appliance, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth else {}
    for method, path in (("POST", CHAT), ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/workers"),
                         ("GET", "/openapi.json")):
        body = json.dumps({"model": MODEL, "messages": QUESTION, "max_tokens": 1}).encode() if method == "POST" \
            else None
        status, _, resp = http_call(method, guarded.url + path, body, headers)
        record("bad inputs tried", 1)
        assert status == 401, (path, status)
        assert error_of(resp)["type"] == "authentication_error"
    assert http_call("GET", guarded.url + "/health")[0] == 200  # for load balancers: no key, no secrets
    status, body = guarded.chat(max_tokens=2)
    assert status == 200, body


def test_internal_endpoints_require_the_cluster_token(guarded: Appliance) -> None:
    workers = guarded.workers()
    token = cluster_token(workers[0]["pid"])
    for w in workers:
        for path in INTERNAL:
            for auth in ("", "wrong", guarded.key, token + "x", token.upper(), "\u00e9" * 8):
                status, _ = internal(w, path, bogus_decode(), auth)
                record("bad inputs tried", 1)
                assert status == 403, (w["name"], path, auth, status)
            for garbage in (b"", b"{", b'{"rid": 5}', b"[]", b'{"rid": "x", "room": "y"}'):
                if path == "/internal/abort" and b"room" in garbage:
                    continue  # a well-formed abort of an unknown request: fine, and a no-op
                status, _ = internal(w, path, garbage, token)
                record("bad inputs tried", 1)
                record("5xx seen", int(status >= 500))
                assert 400 <= status < 500, (w["name"], path, garbage, status)
    p = next(w for w in workers if w["role"] == "prefill")
    bad_handle = {**bogus_decode(), "dst_pages": [0, 1, 2], "handles": ["{not json"]}
    status, lines = internal(p, "/internal/prefill", bad_handle, token)
    assert status == 400 and "handle" in lines[0]["raw"], (status, lines)
    d = next(w for w in workers if w["role"] == "decode")
    status, lines = internal(d, "/internal/decode", bogus_decode(lease_s=1e9), token)
    assert status == 400 and "lease_s" in lines[0]["raw"], (status, lines)
    wait_pools_idle(guarded)


def test_public_answers_carry_no_secret(guarded: Appliance) -> None:
    workers = guarded.workers()
    d = next(w for w in workers if w["role"] == "decode")
    token = cluster_token(d["pid"])
    status, lines = internal(d, "/internal/decode", bogus_decode(lease_s=0.2), token)
    assert status == 200 and lines[0]["kind"] == "reserved", lines
    kv_token = json.loads(lines[0]["handles"][0])["token"]
    public = [http_call("GET", guarded.url + p, headers=guarded.headers())[2]
              for p in ("/workers", "/metrics", "/v1/models", "/openapi.json", "/health")]
    public += [http_call("GET", w["url"] + p)[2] for w in workers for p in ("/load", "/health", "/metrics")]
    for text in public:
        assert token.encode() not in text and kv_token.encode() not in text and guarded.key.encode() not in text
    wait_pools_idle(guarded)


def test_bogus_decode_rooms_do_not_grow_memory(guarded: Appliance) -> None:
    """Even with the cluster token (a confused or compromised router), rooms nobody feeds expire on
    their lease: pages and rooms come back and the worker's memory stays flat."""
    d = guarded.worker("decode")
    token = cluster_token(d["pid"])

    def one(_: int) -> str:
        status, lines = internal(d, "/internal/decode", bogus_decode(), token)
        if status != 200:
            return f"http {status}"
        return lines[-1].get("kind", "?")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(64)))  # warm-up: allocator pools, thread stacks
        wait_pools_idle(guarded)
        before = rss_mb(d["pid"])
        kinds = list(pool.map(one, range(400)))
    record("bogus decode reservations (cluster token, never fed)", len(kinds))
    assert set(kinds) <= {"error", "http 503"}, set(kinds)  # deadline passed (or no pages left: refused)
    assert kinds.count("error") >= 300
    wait_pools_idle(guarded)
    grew = rss_mb(d["pid"]) - before
    assert grew < 24, f"decode grew {grew:.1f} MB over 400 bogus rooms"
    status, body = guarded.chat(max_tokens=4)
    assert status == 200, body


def test_kv_signals_for_unknown_rooms_are_dropped(guarded: Appliance) -> None:
    """A KV sender holding a valid pool handle signals thousands of rooms decode never expected, and
    one real room with a malformed payload: nothing is stored, only that room fails."""
    import nvshmem_kv
    from nvshmem_kv import PoolHandle

    d = guarded.worker("decode")
    token = cluster_token(d["pid"])
    u = urlsplit(d["url"])
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    real = bogus_decode(lease_s=20.0)
    conn.request("POST", "/internal/decode", json.dumps(real), {"Authorization": f"Bearer {token}"})
    resp = conn.getresponse()
    reserved = json.loads(resp.readline())
    handle = PoolHandle.from_json(reserved["handles"][0])
    sender = nvshmem_kv.create(handle.backend, run_id="chaos-sender")
    try:
        peer = sender.connect(handle, handle.descriptor)
        before = rss_mb(d["pid"])
        for _ in range(5000):
            sender.signal(peer, secrets.token_urlsafe(18), b'{"token": 1}' * 8)
        sender.flush(peer, 30)
        record("KV signals for unknown rooms", 5000)
        grew = rss_mb(d["pid"]) - before
        assert grew < 16, f"decode grew {grew:.1f} MB over 5000 unknown-room signals"
        assert json.loads(http_call("GET", d["url"] + "/load")[2])["reserved_rooms"] == 1  # only the real one
        sender.signal(peer, real["room"], b"\x80 not json")  # the reserved room, a payload that is not JSON
        sender.flush(peer, 30)
        last = json.loads(resp.readline())
        assert last["kind"] == "error" and "payload" in last["message"], last
    finally:
        conn.close()
        sender.close()
    wait_pools_idle(guarded)
    status, body = guarded.chat(max_tokens=4)
    assert status == 200, body


FORBIDDEN = re.compile(r"^\s*(import|from)\s+(pickle|cPickle|_pickle|dill|cloudpickle|marshal|shelve)\b"
                       r"|\b(pickle|marshal|dill|cloudpickle)\.loads?\(|\beval\(|\bexec\(|\btorch\.load\("
                       r"|\byaml\.(unsafe_)?load\(|\bbroadcast_object_list\(|\brecv_object|\bUnpickler\b", re.M)


def test_no_pickle_or_eval_on_anything_read_from_a_socket() -> None:
    files = sorted([*(ROOT / "appliance" / "serve").glob("*.py"), ROOT / "appliance" / "launcher.py",
                    *(ROOT / "nvshmem_kv").rglob("*.py"), ROOT / "appliance" / "engine" / "tp.py"])
    assert len(files) > 20
    hits = [f"{f.relative_to(ROOT)}: {m.group(0).strip()}" for f in files for m in FORBIDDEN.finditer(f.read_text())]
    assert not hits, hits
