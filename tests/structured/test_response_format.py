"""response_format and guided_regex in an OpenAI body: applied, or a 400 naming the field."""

from __future__ import annotations

import json

import pytest

from appliance.serve.openai_api import ApiError, parse_chat, parse_completion

NESTED = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12},
    "country": {"$ref": "#/$defs/Country"}},
    "required": ["city", "country"], "additionalProperties": False,
    "$defs": {"Country": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}


class FakeTokenizer:
    vocab_size = 100

    def encode_chat(self, messages):
        return [1, 2, 3]

    def encode(self, text):
        return [1, 2, 3]

    encode_prompt = encode


def chat(**extra):
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    return parse_chat(body, FakeTokenizer(), "m", 64)


def test_text_and_absent_mean_no_constraint() -> None:
    assert chat().sampling.constraint is None
    assert chat(response_format={"type": "text"}).sampling.constraint is None
    assert chat(response_format=None).sampling.constraint is None


def test_json_object_json_schema_and_regex_are_applied() -> None:
    assert chat(response_format={"type": "json_object"}).sampling.constraint.kind == "json_object"
    c = chat(response_format={"type": "json_schema",
                              "json_schema": {"name": "A", "schema": NESTED, "strict": True}}).sampling.constraint
    assert c.kind == "json_schema" and json.loads(c.spec) == NESTED
    assert chat(guided_regex="(yes|no)").sampling.constraint.spec == "(yes|no)"
    comp = parse_completion({"prompt": "x", "response_format": {"type": "json_object"}}, FakeTokenizer(), "m", 64,
                            100)
    assert comp.sampling.constraint.kind == "json_object"


@pytest.mark.parametrize("extra, param, words", [
    ({"response_format": {"type": "xml"}}, "response_format", "must be one of"),
    ({"response_format": "json"}, "response_format", "must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     "schema is required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
     "response_format", "invalid type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}},
     "response_format", "schema object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": 3, "schema": {}}}}, "response_format",
     "name must be a string"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}},
     "response_format", "strict must be a boolean"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "extra": 1}}}, "response_format",
     "unknown fields"),
    ({"response_format": {"type": "json_object", "schema": {}}}, "response_format", "does not take"),
    ({"guided_regex": "[a-"}, "guided_regex", "unclosed"),
    ({"guided_regex": 5}, "guided_regex", "non-empty string"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "exclude each other"),
])
def test_bad_structured_output_fields_are_400_naming_them(extra, param, words) -> None:
    with pytest.raises(ApiError) as info:
        chat(**extra)
    assert info.value.status == 400 and info.value.param == param
    assert words.lower() in info.value.message.lower(), info.value.message
