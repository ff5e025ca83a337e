"""Property-based fuzzing of /v1/chat/completions, /v1/completions and /v1/responses on a live appliance.

Bodies come from the router's own /openapi.json (a small schema-to-hypothesis translation, the idea
of schemathesis without its dependency tree): documented bodies must succeed, a body with one field
broken must be refused naming that field, and arbitrary JSON or bytes must never get a 5xx. The
server answers a normal request afterwards and both pools are idle."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.chaos import responses_rules
from tests.chaos.chaos_util import CHAT, COMP, MODEL, Appliance, error_of, http_call, wait_pools_idle
from tests.chaos.conftest import record

pytestmark = pytest.mark.slow

VOCAB = 49152
SMALL = {"max_tokens": 3, "max_completion_tokens": 3}  # keep generated answers short: the tier is timed
FUZZ = settings(deadline=None, database=None, derandomize=True, print_blob=True,
                suppress_health_check=list(HealthCheck))
SEEN: dict[str, int] = {"bodies": 0, "5xx": 0, "fuzzers": 0}
RESP = "/v1/responses"
FUZZERS = 9  # the parametrized fuzz tests above test_fuzzing_left_the_server_serving
REGEXES = ["[a-z]{1,8}", " ?(yes|no)", "[0-9]+"]  # a string documented as a regex (guided_regex)
CONSTRAINTS = ("guided_regex", "guided_json", "guided_choice", "structured_outputs")  # vLLM's, one at most


@pytest.fixture(scope="module")
def schemas(guarded: Appliance) -> dict[str, dict]:
    status, _, raw = http_call("GET", guarded.url + "/openapi.json", headers=guarded.headers())
    assert status == 200
    doc = json.loads(raw)
    return {p: doc["paths"][p]["post"]["requestBody"]["content"]["application/json"]["schema"]
            for p in (CHAT, COMP, RESP)}


# -- schema -> strategies ------------------------------------------------------------------------------
def conforming(schema: dict, key: str = "") -> st.SearchStrategy[Any]:
    """Values the schema accepts (lengths kept small, token ids inside the vocabulary)."""
    if "enum" in schema:
        base: st.SearchStrategy[Any] = st.sampled_from(schema["enum"])
    elif schema.get("format") == "regex":
        base = st.sampled_from(REGEXES)
    elif "oneOf" in schema:
        base = st.one_of(*(conforming(s, key) for s in schema["oneOf"]))
    else:
        t = schema["type"]
        if t == "object":
            props = schema.get("properties", {})
            required = set(schema.get("required", ()))
            base = st.fixed_dictionaries({k: conforming(v, k) for k, v in props.items() if k in required},
                                         optional={k: conforming(v, k) for k, v in props.items()
                                                   if k not in required and k != "model"})
        elif t == "array":
            hi = min(schema.get("maxItems", 3), 3)
            base = st.lists(conforming(schema["items"], key), min_size=schema.get("minItems", 0), max_size=hi)
        elif t == "string":
            base = st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 24), 24))
        elif t == "integer":
            lo = schema.get("minimum", -(2**40))
            hi = schema.get("maximum", 2**40)
            if key in SMALL:
                hi = SMALL[key]
            if key in ("prompt", "stop_token_ids"):
                hi = VOCAB - 1
            base = st.integers(lo, hi)
        elif t == "number":
            lo = schema.get("minimum", -1e6)
            base = st.floats(lo, schema.get("maximum", 1e6), exclude_min=bool(schema.get("exclusiveMinimum")),
                             allow_nan=False)
        elif t == "boolean":
            base = st.booleans()
        else:
            raise AssertionError(f"schema type {t!r} is not covered by the fuzzer")
    return st.one_of(st.none(), base) if schema.get("nullable") else base


JSON_TYPES = {"integer": int, "number": (int, float), "string": str, "boolean": bool, "array": list,
              "object": dict}
ANY_VALUE = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
                      st.text(max_size=8), st.booleans(), st.lists(st.integers(-5, 5), max_size=3),
                      st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _accepted_types(schema: dict) -> list[str]:
    if "oneOf" in schema:
        return [t for s in schema["oneOf"] for t in _accepted_types(s)]
    return [schema["type"]] if "type" in schema else []


def _type_ok(value: Any, types: list[str]) -> bool:
    for t in types:
        if t in ("integer", "number") and isinstance(value, bool):
            continue
        if t == "integer" and isinstance(value, float):
            continue
        if isinstance(value, JSON_TYPES[t]):
            return True
    return False


def violating(schema: dict) -> st.SearchStrategy[Any]:
    """Values the schema refuses: a wrong type, or one step past a documented bound."""
    types = _accepted_types(schema)
    options = [ANY_VALUE.filter(lambda v: not _type_ok(v, types))]
    if "enum" in schema:
        options.append(st.text(max_size=8).filter(lambda v: v not in schema["enum"]))
    for s in schema.get("oneOf", [schema]):
        t = s.get("type")
        if t in ("integer", "number"):
            step = 1 if t == "integer" else 0.5
            if "minimum" in s:
                lo = s["minimum"]
                options.append(st.just(lo) if s.get("exclusiveMinimum") else st.just(lo - step))
            if "maximum" in s:
                options.append(st.just(s["maximum"] + step))
        if t == "string" and s.get("minLength"):
            options.append(st.just(""))
        if t == "string" and "maxLength" in s:
            options.append(st.just("x" * (s["maxLength"] + 1)))
        if t == "array" and s.get("minItems"):
            options.append(st.just([]))
        if t == "array" and "maxItems" in s and s["items"].get("type") == "string":
            options.append(st.just(["ab"] * (s["maxItems"] + 1)))
    return st.one_of(*options)


# -- the checks ------------------------------------------------------------------------------------------
def send(app: Appliance, path: str, raw: bytes) -> tuple[int, bytes]:
    status, _, body = app.post(path, None, raw=raw, timeout=60)
    SEEN["bodies"] += 1
    SEEN["5xx"] += int(status >= 500)
    record("fuzzed bodies", 1)
    record("5xx seen", int(status >= 500))
    assert status < 500, (status, raw[:400], body[:400])
    if status != 200:
        error_of(body)
    return status, body


def break_field(body: dict, key: str, value: Any, fields: Collection[str]) -> None:
    """Set ``body[key]`` to a ``value`` outside its schema, so that this field alone is what is wrong;
    ``fields``: the schema's fields (a companion field is set only where the schema has it)."""
    body[key] = value
    if key == "max_tokens":
        body.pop("max_completion_tokens", None)
    if key == "top_logprobs" and "logprobs" in fields:  # chat's top_logprobs needs logprobs; Responses' does not
        body["logprobs"] = True
    if key == "n":
        body.pop("best_of", None)  # else a broken n may surface as best_of's bound


def _documented(schema: dict, body: dict) -> dict:
    body = {**body, "model": MODEL}
    # structured_outputs sets exactly one of json, regex, choice, json_object; json (there and as guided_json)
    # may be a schema's JSON text; one constraint at most: response_format (other than text), a guided_* field
    # or structured_outputs (documented)
    so = body.get("structured_outputs")
    if isinstance(so, dict):
        kinds = [k for k in ("json", "regex", "choice") if so.get(k) is not None] + (
            ["json_object"] if so.get("json_object") else [])
        for k in kinds[1:]:
            so.pop(k)
        if not kinds:
            body.pop("structured_outputs")
    for holder, key in ((body, "guided_json"), (so if isinstance(so, dict) else {}, "json")):
        if isinstance(holder.get(key), str):
            holder[key] = json.dumps({"type": "string", "maxLength": len(holder[key])})
    guided = [k for k in CONSTRAINTS if body.get(k) is not None]
    for k in guided[1:] if body.get("response_format") in (None, {"type": "text"}) else guided:
        body.pop(k)
    # documented cross-field rules: a required or named tool_choice needs tools (and names one of them),
    # function names are unique, best_of is at least n and does not stream
    if body.get("tool_choice") not in (None, "none", "auto"):
        body.pop("tool_choice")
    for i, tool in enumerate(body.get("tools") or []):
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            tool["function"]["name"] = f"f{i}"
    for m in body.get("messages") or []:  # an earlier call's arguments are a JSON text (documented)
        for call in (m.get("tool_calls") or []) if isinstance(m, dict) else []:
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                call["function"]["arguments"] = "{}"
    n = body.get("n") if isinstance(body.get("n"), int) else 1
    if body.get("best_of") is not None and (body["best_of"] < n or body.get("stream")):
        body.pop("best_of")
    if body.get("max_completion_tokens") is not None:
        body.pop("max_tokens", None)
    elif body.get("max_tokens") is None:
        body["max_tokens"] = SMALL["max_tokens"]  # the default (up to 1024 tokens) would take a minute here
    # min_tokens is at most the answer's length and leaves constrained answers alone (documented)
    most = body.get("max_completion_tokens") or body.get("max_tokens")
    constrained = body.get("response_format") not in (None, {"type": "text"}) or any(
        body.get(k) is not None for k in CONSTRAINTS)
    if body.get("min_tokens") is not None and (constrained or not isinstance(most, int) or body["min_tokens"] > most):
        body.pop("min_tokens")
    return body


@pytest.fixture(scope="module")
def kept(guarded: Appliance) -> str:
    """The id of a stored response, which a documented previous_response_id names."""
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 2, "store": True}
    status, _, raw = guarded.post(RESP, body)
    assert status == 200, raw[:400]
    return json.loads(raw)["id"]


def documented(path: str, schema: dict, body: dict, kept: str) -> dict:
    if path == RESP:
        return {**responses_rules.documented(body, kept, SMALL["max_tokens"]), "model": MODEL}
    return _documented(schema, body)


def answered(path: str, resp: bytes) -> bool:
    """Whether an answer (whole or streamed) finished without an error."""
    if path != RESP:
        return b'"error"' not in resp
    if resp.lstrip().startswith(b"{"):  # the Response object (its "error" field is null)
        return json.loads(resp)["status"] in ("completed", "incomplete")
    events = [json.loads(line[5:]) for line in resp.splitlines() if line.startswith(b"data:")]
    return bool(events) and events[-1]["type"] in ("response.completed", "response.incomplete")


@pytest.mark.parametrize("path", [CHAT, COMP, RESP])
def test_documented_bodies_are_accepted(guarded: Appliance, schemas: dict, kept: str, path: str) -> None:
    @settings(FUZZ, max_examples=60)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        body = documented(path, schemas[path], data.draw(conforming(schemas[path])), kept)
        status, resp = send(guarded, path, json.dumps(body).encode())
        assert status == 200, (body, resp[:400])
        assert answered(path, resp), (body, resp[-400:])

    run()
    SEEN["fuzzers"] += 1
    wait_pools_idle(guarded)


@pytest.mark.parametrize("path", [CHAT, COMP, RESP])
def test_one_broken_field_is_refused_by_name(guarded: Appliance, schemas: dict, kept: str, path: str) -> None:
    props = schemas[path]["properties"]

    @settings(FUZZ, max_examples=110)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        body = documented(path, schemas[path], data.draw(conforming(schemas[path])), kept)
        key = data.draw(st.sampled_from(sorted(props)))
        break_field(body, key, data.draw(violating(props[key])), props)
        status, resp = send(guarded, path, json.dumps(body).encode())
        err = error_of(resp)
        if key == "model" and isinstance(body[key], str):
            assert status == 404, (body, err)
        else:
            assert status == 400, (body, err)
        assert err["param"] is not None and err["param"].split("[")[0].split(".")[0] == key, (key, body[key], err)

    run()
    SEEN["fuzzers"] += 1
    wait_pools_idle(guarded)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["messages", "prompt", "role", "content", "max_tokens", "stream", "stop", "model", "n",
                         "temperature", "top_p", "top_k", "logprobs", "seed", "x"]), inner, max_size=5),
    max_leaves=12)


@pytest.mark.parametrize("path", [CHAT, COMP, RESP])
def test_arbitrary_json_and_bytes_never_5xx(guarded: Appliance, path: str) -> None:
    @settings(FUZZ, max_examples=90)
    @given(value=JSON_VALUES, mode=st.sampled_from(["json", "body-with", "bytes"]), junk=st.binary(max_size=64))
    def run(value: Any, mode: str, junk: bytes) -> None:
        if mode == "json":
            raw = json.dumps(value).encode()
        elif mode == "body-with":  # a plausible request with one arbitrary field
            bases = {CHAT: {"max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]},
                     COMP: {"max_tokens": 2, "prompt": "Hi"}, RESP: {"max_output_tokens": 2, "input": "Hi"}}
            base = {"model": MODEL, **bases[path]}
            field = "input" if path == RESP else "stop" if not isinstance(value, dict) else "messages"
            raw = json.dumps({**base, field: value}).encode()
        else:
            raw = junk
        send(guarded, path, raw)

    run()
    SEEN["fuzzers"] += 1


def test_fuzzing_left_the_server_serving(guarded: Appliance) -> None:
    """Runs after the fuzzers (file order): enough bodies were tried, none got a 5xx, all is idle."""
    if SEEN["fuzzers"] == FUZZERS:  # the whole file ran (not a -k selection)
        assert SEEN["bodies"] >= 500, SEEN
    assert SEEN["5xx"] == 0, SEEN
    status, body = guarded.chat(max_tokens=12)
    assert status == 200 and "Paris" in body["choices"][0]["message"]["content"], body
    wait_pools_idle(guarded)
