"""Property-based fuzzing of /v1/responses' parsing (in process: the body is read as the chat request it
amounts to before any engine sees it), from the router's own /openapi.json like the chaos tier's fuzzers:
any body is either read or refused with a 4xx (never another exception), and a body that is read becomes
a 400 naming the field when one of its fields is broken."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.serve import openai_api as oai
from appliance.serve import responses_api as ra
from appliance.serve.openapi_doc import openapi_document
from appliance.serve.response_store import ResponseStore
from tests.chaos import responses_rules as rules
from tests.chaos.test_fuzz import JSON_VALUES, break_field, conforming, violating

FUZZ = settings(deadline=None, database=None, derandomize=True, print_blob=True,
                suppress_health_check=list(HealthCheck))
SCHEMA = json.loads(json.dumps(openapi_document("m")))["paths"]["/v1/responses"]["post"]["requestBody"][
    "content"]["application/json"]["schema"]


@pytest.fixture(scope="module")
def tok(smollm_path):
    from appliance.model.tokenizer import Tokenizer

    return Tokenizer.from_gguf(str(smollm_path))


KEPT = "resp_kept"  # the one stored response a documented previous_response_id names


def documented(body: dict) -> dict:
    return rules.documented(body, KEPT)


def read(body: dict, tok) -> oai.ParsedRequest | oai.ApiError:
    """What the router does with a body, before any engine: the store's checks, then the parse."""
    store = ResponseStore(4)
    store.put(KEPT, {"id": KEPT, "output": []}, [{"role": "user", "content": "hi"}])
    try:
        previous = store.previous(body)
        store.wants(body)
        return ra.parse(body, tok, "m", 2048, previous)
    except oai.ApiError as exc:
        assert 400 <= exc.status < 500, (body, exc.status, exc.message)
        return exc


def test_any_body_is_read_or_refused_with_a_4xx(tok) -> None:
    tried = {"read": 0, "refused": 0}

    @settings(FUZZ, max_examples=400)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        kind = data.draw(st.sampled_from(["documented", "broken", "junk"]))
        if kind == "junk":
            body = {"input": "hi", **data.draw(st.dictionaries(st.sampled_from(sorted(SCHEMA["properties"])),
                                                               JSON_VALUES, max_size=3))}
        else:
            body = documented(data.draw(conforming(SCHEMA)))
            if kind == "broken":
                key = data.draw(st.sampled_from(sorted(SCHEMA["properties"])))
                break_field(body, key, data.draw(violating(SCHEMA["properties"][key])), SCHEMA["properties"])
        tried["read" if isinstance(read(body, tok), oai.ParsedRequest) else "refused"] += 1

    run()
    assert min(tried.values()) >= 50, tried  # both outcomes were exercised


def test_one_broken_field_of_a_readable_body_is_refused_by_name(tok) -> None:
    props = {k: v for k, v in SCHEMA["properties"].items() if k != "model"}
    broken = []

    @settings(FUZZ, max_examples=400)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        body = documented(data.draw(conforming(SCHEMA)))
        if not isinstance(read(dict(body), tok), oai.ParsedRequest):
            return  # the schema cannot say every rule (arguments are JSON, tool names unique ...)
        key = data.draw(st.sampled_from(sorted(props)))
        break_field(body, key, data.draw(violating(props[key])), props)
        got = read(body, tok)
        assert isinstance(got, oai.ApiError), (key, body[key])
        assert got.status == 400 and (got.param or "").split("[")[0].split(".")[0] == key, (key, got.param, got.message)
        broken.append(key)

    run()
    assert len(set(broken)) >= len(props) - 2, sorted(set(props) - set(broken))  # nearly every field was broken
