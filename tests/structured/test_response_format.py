"""response_format and vLLM's structured_outputs (and its older guided_regex, guided_json, guided_choice) in
an OpenAI body: applied (a choice's characters literal, whatever regex syntax they hold), or a 400 naming
the field."""

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
    for schema in (NESTED, json.dumps(NESTED)):  # vLLM takes the schema or its JSON text
        c = chat(guided_json=schema).sampling.constraint
        assert c.kind == "json_schema" and json.loads(c.spec) == NESTED
    c = chat(guided_choice=["yes", "no"]).sampling.constraint
    assert (c.kind, c.spec) == ("regex", "(yes|no)")
    so = {"json": NESTED, "regex": "(yes|no)", "choice": ["yes", "no"]}
    for key, older in (("json", "guided_json"), ("regex", "guided_regex"), ("choice", "guided_choice")):
        got = chat(structured_outputs={key: so[key], "disable_fallback": True}).sampling.constraint
        assert got == chat(**{older: so[key]}).sampling.constraint
    assert chat(structured_outputs={"json_object": True}).sampling.constraint.kind == "json_object"
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
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_json", "guided_regex exclude each other"),
    ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "guided_choice", "exclude each other"),
    ({"guided_json": "{"}, "guided_json", "not valid JSON"),
    ({"guided_json": [1]}, "guided_json", "schema object"),
    ({"guided_json": {"type": "wat"}}, "guided_json", "invalid type"),
    ({"guided_choice": []}, "guided_choice", "list of 1 to 256"),
    ({"guided_choice": ["a", ""]}, "guided_choice", "non-empty strings"),
    ({"guided_choice": "yes"}, "guided_choice", "list of"),
    ({"guided_choice": ["x"] * 257}, "guided_choice", "list of 1 to 256"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one of json, regex, choice or json_object"),
    ({"structured_outputs": {"json_object": False}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "it sets regex, choice"),
    ({"structured_outputs": {"grammar": "root ::= 'a'"}}, "structured_outputs", "grammar is not supported"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs", "whitespace_pattern"),
    ({"structured_outputs": {"regex": "a", "backend": "xgrammar"}}, "structured_outputs", "unknown fields: backend"),
    ({"structured_outputs": {"json": "{"}}, "structured_outputs", "structured_outputs.json is not valid JSON"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs", "unclosed"),
    ({"structured_outputs": {"choice": [""]}}, "structured_outputs", "structured_outputs.choice must be a list"),
    ({"structured_outputs": "json"}, "structured_outputs", "must be an object"),
    ({"structured_outputs": {"regex": "a"}, "guided_choice": ["a"]}, "structured_outputs",
     "guided_choice exclude each other"),
])
def test_bad_structured_output_fields_are_400_naming_them(extra, param, words) -> None:
    with pytest.raises(ApiError) as info:
        chat(**extra)
    assert info.value.status == 400 and info.value.param == param
    assert words.lower() in info.value.message.lower(), info.value.message


CHOICES = ["a.b (c)", "x|y", "[1-2]*", "50% off? $3 {ok} ^_^ #tag & more~", "back\\slash", "héllo wörld"]


def test_a_guided_choice_answer_is_exactly_one_choice(smollm_path) -> None:
    """Each choice's tokens take the matcher to its end; a choice's regex reading (``a.b`` matching ``axb``)
    does not."""
    from appliance.engine.constraint import Constraint
    from appliance.engine.grammar import GrammarCompiler
    from appliance.model.tokenizer import Tokenizer
    from appliance.serve.response_format import choice_regex

    tok = Tokenizer.from_gguf(str(smollm_path))
    grammars = GrammarCompiler(tok, tok.vocab_size, tok.eos_token_ids)
    constraint = Constraint.regex(choice_regex(CHOICES))

    def accepts(text: str) -> bool:
        m = grammars.matcher(constraint)
        return m.consume_tokens(tok.encode(text)) and m.is_accepting()

    assert all(accepts(c) for c in CHOICES)
    for wrong in ("axb (c)", "x", "y", "12", "[1-2]", "a.b (c)x", "back\\\\slash", "hello world"):
        assert not accepts(wrong), wrong
