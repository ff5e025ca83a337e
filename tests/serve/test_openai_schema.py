"""The OpenAI bodies' Structs (appliance/serve/openai_schema.py): /openapi.json is generated from them, its
limits are the named constants, and the server's checks are the document's (no live server: a fake
tokenizer; tests/chaos/test_fuzz.py and test_bad_input.py probe the same on a running appliance)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.engine.request import MAX_LOGPROBS, MAX_STOP
from appliance.serve import openai_api as oai
from appliance.serve import openai_fields
from appliance.serve import openai_schema as schema
from appliance.serve.openapi_doc import openapi_document
from appliance.serve.tools import MAX_TOOLS
from tests.chaos.test_fuzz import _documented, break_field, conforming, violating

VOCAB = 49152
MODEL = "smollm2-135m-instruct"


class FakeTokenizer:
    vocab_size = VOCAB
    chat_template = ""

    def encode_chat(self, messages, tools=None):
        return [1] * (1 + sum(len(m["content"]) // 4 for m in messages))

    def encode_prompt(self, text):
        return [1] * (1 + len(text) // 4)

    def decode(self, ids, skip_special_tokens=True):
        return "x" * len(ids)


def parse(path: str, body: dict[str, Any]) -> oai.ParsedRequest:
    if path == "chat":
        return oai.parse_chat(body, FakeTokenizer(), MODEL, 8192)
    return oai.parse_completion(body, FakeTokenizer(), MODEL, 8192, VOCAB)


def refused(path: str, body: dict[str, Any]) -> oai.ApiError:
    with pytest.raises(oai.ApiError) as info:
        parse(path, body)
    return info.value


@pytest.fixture(scope="module")
def bodies() -> dict[str, dict[str, Any]]:
    doc = json.loads(json.dumps(openapi_document(MODEL)))  # as served
    assert doc["openapi"].startswith("3.0")
    paths = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
    return {e: doc["paths"][p]["post"]["requestBody"]["content"]["application/json"]["schema"]
            for e, p in paths.items()}


BASE = {"chat": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        "completions": {"prompt": "The capital of France is", "max_tokens": 2}}


def test_the_documents_limits_are_the_constants(bodies: dict) -> None:
    chat, comp = bodies["chat"]["properties"], bodies["completions"]["properties"]
    assert chat["n"]["maximum"] == comp["n"]["maximum"] == comp["best_of"]["maximum"] == schema.MAX_N
    assert chat["top_logprobs"]["maximum"] == comp["logprobs"]["maximum"] == MAX_LOGPROBS
    assert chat["stop_token_ids"]["maxItems"] == MAX_STOP
    text, many = chat["stop"]["oneOf"]
    assert text["maxLength"] == many["items"]["maxLength"] == schema.MAX_STOP_CHARS and many["maxItems"] == MAX_STOP
    assert chat["temperature"]["maximum"] == schema.MAX_TEMPERATURE and chat["seed"]["maximum"] == schema.MAX_SEED
    assert chat["top_p"]["exclusiveMinimum"] is True and chat["top_p"]["minimum"] == 0
    assert sorted(chat["messages"]["items"]["properties"]["role"]["enum"]) == sorted(schema.ROLES)
    assert chat["tools"]["maxItems"] == MAX_TOOLS
    # the fields the server applies are the documented ones, and the Structs'
    for endpoint, body in bodies.items():
        assert set(body["properties"]) == openai_fields.APPLIED[endpoint]


def test_the_document_is_openapi_3_0(bodies: dict) -> None:
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            assert not {"$ref", "$defs", "anyOf", "discriminator"} & set(node), node
            assert node.get("type") != "null" and node.get("required", [None]) != [], node
            assert isinstance(node.get("exclusiveMinimum", True), bool), node  # 3.0: a flag beside minimum
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(bodies)


@pytest.mark.parametrize("path, key, value, words", [
    ("chat", "n", schema.MAX_N + 1, f"between 1 and {schema.MAX_N}"),
    ("completions", "n", 0, "between 1"),
    ("chat", "temperature", schema.MAX_TEMPERATURE + 0.5, f"<= {schema.MAX_TEMPERATURE}"),
    ("completions", "top_p", 0, "> 0"),
    ("completions", "logprobs", MAX_LOGPROBS + 1, f"between 0 and {MAX_LOGPROBS}"),
    ("chat", "stop", ["s"] * (MAX_STOP + 1), f"at most {MAX_STOP}"),
    ("chat", "stop", "x" * (schema.MAX_STOP_CHARS + 1), f"{schema.MAX_STOP_CHARS} characters"),
    ("chat", "messages", [{"role": "wizard", "content": "x"}], "not one of"),
])
def test_out_of_range_values_are_a_400_naming_the_field(path: str, key: str, value: Any, words: str) -> None:
    err = refused(path, {**BASE[path], key: value})
    assert err.status == 400 and err.param.split("[")[0] == key, (err.param, err.message)
    assert key in err.message and words in err.message, err.message


def test_each_documented_bound_is_the_servers(bodies: dict) -> None:
    """As tests/chaos/test_bad_input.py's live probe: the bound is accepted, one step past it is not."""
    checked = 0
    for path, body in bodies.items():
        for key, prop in body["properties"].items():
            if prop.get("type") not in ("integer", "number") or key in ("max_tokens", "max_completion_tokens"):
                continue
            step = 1 if prop["type"] == "integer" else 0.01
            extra = {"logprobs": True} if key == "top_logprobs" else {}
            for bound, past in (("minimum", -step), ("maximum", step)):
                if bound not in prop:
                    continue
                edge = prop[bound]
                exclusive = bound == "minimum" and prop.get("exclusiveMinimum") is True
                parse(path, {**BASE[path], **extra, key: edge + step if exclusive else edge})
                err = refused(path, {**BASE[path], **extra, key: edge if exclusive else edge + past})
                assert err.param == key, err.message
                checked += 1
    assert checked >= 20


FAST = settings(deadline=None, database=None, derandomize=True, max_examples=150,
                suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("path", ["chat", "completions"])
def test_documented_bodies_parse_and_one_broken_field_is_named(bodies: dict, path: str) -> None:
    """tests/chaos/test_fuzz.py's strategies against the parser: what the document allows parses, a field
    made to break the document is refused naming it."""
    body_schema, props = bodies[path], bodies[path]["properties"]

    @FAST
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        body = _documented(body_schema, data.draw(conforming(body_schema)))
        body["model"] = MODEL
        parse(path, body)
        key = data.draw(st.sampled_from(sorted(props)))
        break_field(body, key, data.draw(violating(props[key])), props)
        if key == "model" and isinstance(body[key], str):
            return  # a 404 (unknown model), checked in tests/chaos/test_bad_input.py
        err = refused(path, body)
        assert err.status == 400 and err.param is not None and err.param.split("[")[0] == key, (key, body[key], err)

    run()
