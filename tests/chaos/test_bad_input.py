"""Bad input at the router: each one answered with its status and an OpenAI error naming the field,
and /openapi.json describing exactly what is accepted (its bounds are probed on the live server)."""

from __future__ import annotations

import json

import pytest

from tests.chaos.chaos_util import CHAT, COMP, MODEL, QUESTION, Appliance, error_of, http_call, wait_pools_idle
from tests.chaos.conftest import record

pytestmark = pytest.mark.slow

MSG = {"model": MODEL, "messages": QUESTION, "max_tokens": 2}
PROMPT = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 2}
LONG = "word " * 9000  # ~9000 tokens: past the 8192-token context

# (id, path, body (dict) or raw bytes, status, param (None: not checked), words the message must contain)
CASES: list[tuple[str, str, dict | bytes, int, str | None, str]] = [
    ("malformed-json", CHAT, b'{"messages": [', 400, None, "malformed JSON"),
    ("not-an-object", CHAT, b"[1, 2]", 400, None, "JSON object"),
    ("empty-body", CHAT, b"", 400, None, "malformed JSON"),
    ("invalid-utf8", CHAT, b'{"messages": "\xff\xfe"}', 400, None, "UTF-8"),
    ("nan", CHAT, b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, None, "NaN"),
    ("infinity", CHAT, b'{"messages": [{"role": "user", "content": "x"}], "top_p": Infinity}', 400, None, "Infinity"),
    ("huge-exponent", CHAT, b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1e400}', 400,
     "temperature", "finite"),
    ("huge-integer", CHAT, b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}", 400, None, "malformed"),
    ("deep-nesting", CHAT, b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, None, "nested"),
    ("missing-messages", CHAT, {"model": MODEL}, 400, "messages", "required"),
    ("messages-not-list", CHAT, {**MSG, "messages": "hi"}, 400, "messages", "list"),
    ("empty-messages", CHAT, {**MSG, "messages": []}, 400, "messages", "empty"),
    ("message-not-object", CHAT, {**MSG, "messages": ["hi"]}, 400, "messages[0]", "object"),
    ("unknown-role", CHAT, {**MSG, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role",
     "wizard"),
    ("content-number", CHAT, {**MSG, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content",
     "string"),
    ("content-image", CHAT, {**MSG, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content", "text part"),
    ("unknown-model", CHAT, {**MSG, "model": "gpt-9"}, 404, "model", "gpt-9"),
    ("model-number", CHAT, {**MSG, "model": 7}, 400, "model", "string"),
    ("prompt-too-long-chat", CHAT, {**MSG, "messages": [{"role": "user", "content": LONG}]}, 400, "messages",
     "context"),
    ("missing-prompt", COMP, {"model": MODEL}, 400, "prompt", "required"),
    ("empty-prompt", COMP, {**PROMPT, "prompt": ""}, 400, "prompt", "empty"),
    ("prompt-number", COMP, {**PROMPT, "prompt": 5}, 400, "prompt", "prompt"),
    ("prompt-bad-token", COMP, {**PROMPT, "prompt": [1, 10**9]}, 400, "prompt", "vocabulary"),
    ("prompt-negative-token", COMP, {**PROMPT, "prompt": [-1]}, 400, "prompt", "vocabulary"),
    ("prompt-too-long", COMP, {**PROMPT, "prompt": LONG}, 400, "prompt", "context"),
    ("max-tokens-zero", CHAT, {**MSG, "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ("max-tokens-negative", COMP, {**PROMPT, "max_tokens": -5}, 400, "max_tokens", ">= 1"),
    ("max-tokens-beyond-context", CHAT, {**MSG, "max_tokens": 100000}, 400, "max_tokens", "context"),
    ("max-completion-tokens-zero", CHAT, {**MSG, "max_completion_tokens": 0}, 400, "max_completion_tokens", ">= 1"),
    ("max-tokens-string", CHAT, {**MSG, "max_tokens": "5"}, 400, "max_tokens", "integer"),
    ("max-tokens-float", CHAT, {**MSG, "max_tokens": 2.5}, 400, "max_tokens", "integer"),
    ("temperature-negative", CHAT, {**MSG, "temperature": -0.1}, 400, "temperature", ">= 0"),
    ("temperature-string", CHAT, {**MSG, "temperature": "hot"}, 400, "temperature", "number"),
    ("temperature-bool", CHAT, {**MSG, "temperature": True}, 400, "temperature", "number"),
    ("top-p-zero", CHAT, {**MSG, "top_p": 0}, 400, "top_p", "> 0"),
    ("top-p-above-one", COMP, {**PROMPT, "top_p": 1.5}, 400, "top_p", "<= 1"),
    ("top-k-below-minus-one", CHAT, {**MSG, "top_k": -2}, 400, "top_k", "top_k"),
    ("min-p-above-one", CHAT, {**MSG, "min_p": 2}, 400, "min_p", "<= 1"),
    ("n-nine", CHAT, {**MSG, "n": 9}, 400, "n", "between 1 and 8"),
    ("n-zero", COMP, {**PROMPT, "n": 0}, 400, "n", "between 1 and 8"),
    ("seed-negative", CHAT, {**MSG, "seed": -1}, 400, "seed", "seed"),
    ("seed-huge", CHAT, {**MSG, "seed": 2**64}, 400, "seed", "seed"),
    ("chat-logprobs-int", CHAT, {**MSG, "logprobs": 3}, 400, "logprobs", "boolean"),
    ("top-logprobs-21", CHAT, {**MSG, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "between"),
    ("top-logprobs-negative", CHAT, {**MSG, "logprobs": True, "top_logprobs": -1}, 400, "top_logprobs", "between"),
    ("completion-logprobs-21", COMP, {**PROMPT, "logprobs": 21}, 400, "logprobs", "between"),
    ("completion-logprobs-bool", COMP, {**PROMPT, "logprobs": True}, 400, "logprobs", "integer"),
    ("stop-17", CHAT, {**MSG, "stop": [f"s{i}" for i in range(17)]}, 400, "stop", "at most 16"),
    ("stop-number", CHAT, {**MSG, "stop": 5}, 400, "stop", "string"),
    ("stop-empty-string", CHAT, {**MSG, "stop": [""]}, 400, "stop", "empty"),
    ("stop-too-long", CHAT, {**MSG, "stop": "x" * 5000}, 400, "stop", "characters"),
    ("stop-token-ids-17", CHAT, {**MSG, "stop_token_ids": list(range(17))}, 400, "stop_token_ids", "at most"),
    ("stop-token-ids-outside", CHAT, {**MSG, "stop_token_ids": [2**70]}, 400, "stop_token_ids", "vocabulary"),
    ("stop-token-ids-strings", CHAT, {**MSG, "stop_token_ids": ["a"]}, 400, "stop_token_ids", "integer"),
    ("stream-string", CHAT, {**MSG, "stream": "yes"}, 400, "stream", "boolean"),
    ("stream-options-list", CHAT, {**MSG, "stream": True, "stream_options": []}, 400, "stream_options", "object"),
    ("ignore-eos-int", CHAT, {**MSG, "ignore_eos": 1}, 400, "ignore_eos", "boolean"),
    ("presence-penalty-3", CHAT, {**MSG, "presence_penalty": 3}, 400, "presence_penalty", "<= 2"),
    ("frequency-penalty-string", COMP, {**PROMPT, "frequency_penalty": "x"}, 400, "frequency_penalty", "number"),
    ("repetition-penalty-zero", CHAT, {**MSG, "repetition_penalty": 0}, 400, "repetition_penalty", ">= 0.01"),
    ("repetition-penalty-tiny", COMP, {**PROMPT, "repetition_penalty": 5e-116}, 400, "repetition_penalty",
     ">= 0.01"),  # divided the logits to infinity (the fuzzer's find)
    ("repetition-penalty-11", COMP, {**PROMPT, "repetition_penalty": 11}, 400, "repetition_penalty", "<= 10"),
    ("min-tokens-over-max", COMP, {**PROMPT, "min_tokens": 3}, 400, "min_tokens", "at most max_tokens (2)"),
    ("min-tokens-negative", CHAT, {**MSG, "min_tokens": -1}, 400, "min_tokens", ">= 0"),
    ("min-tokens-constrained", CHAT, {**MSG, "min_tokens": 1, "response_format": {"type": "json_object"}}, 400,
     "min_tokens", "constrains"),
    ("logit-bias-101", COMP, {**PROMPT, "logit_bias": {"50": 101}}, 400, "logit_bias", "<= 100"),
    ("logit-bias-not-an-id", CHAT, {**MSG, "logit_bias": {"hello": 1}}, 400, "logit_bias", "not a token id"),
    ("logit-bias-negative-id", CHAT, {**MSG, "logit_bias": {"-5": 1}}, 400, "logit_bias", "not a token id"),
    ("logit-bias-outside", COMP, {**PROMPT, "logit_bias": {str(2**70): 1}}, 400, "logit_bias", "not a token id"),
    ("logit-bias-twice", COMP, {**PROMPT, "logit_bias": {"50": 1, "050": 2}}, 400, "logit_bias", "twice"),
    ("logit-bias-list", COMP, {**PROMPT, "logit_bias": [[50, 1]]}, 400, "logit_bias", "object"),
    ("logit-bias-1025", COMP, {**PROMPT, "logit_bias": {str(i): 1 for i in range(1025)}}, 400, "logit_bias",
     "at most 1024"),
    # would change the answer, not honoured: refused, never dropped (appliance/serve/openai_fields.py)
    ("json-schema", CHAT, {**MSG, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400,
     "response_format", "structured outputs"),
    ("tools-not-a-list", CHAT, {**MSG, "tools": {"type": "function", "function": {"name": "f"}}}, 400, "tools",
     "list"),
    ("tools-on-completions", COMP, {**PROMPT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tools", "chat/completions"),
    ("tool-choice-unknown-name", CHAT, {**MSG, "tools": [{"type": "function", "function": {"name": "f"}}],
                                        "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400,
     "tool_choice", "not among tools"),
    ("tool-choice-required", CHAT, {**MSG, "tool_choice": "required"}, 400, "tool_choice", "tool"),
    ("best-of-below-n", COMP, {**PROMPT, "best_of": 2, "n": 3}, 400, "best_of", "between n"),
    ("best-of-on-chat", CHAT, {**MSG, "best_of": 3}, 400, "best_of", "completions"),
    ("echo-on-chat", CHAT, {**MSG, "echo": True}, 400, "echo", "/v1/completions"),
    ("echo-string", COMP, {**PROMPT, "echo": "yes"}, 400, "echo", "boolean"),
    ("unknown-field", CHAT, {**MSG, "max_token": 5}, 400, "max_token", "unrecognized"),
    ("chat-field-on-completions", COMP, {**PROMPT, "messages": []}, 400, "messages", "unrecognized"),
]


@pytest.mark.parametrize("path, body, status, param, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_the_field_named(guarded: Appliance, path, body, status, param, words) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, _, resp = guarded.post(path, None, raw=raw)
    record("bad inputs tried", 1)
    record("5xx seen", int(got >= 500))
    err = error_of(resp)
    assert got == status, (got, err)
    assert err["code"] == status
    if param is not None:
        assert err["param"] == param, err
    assert words.lower() in err["message"].lower(), err


def test_body_over_the_size_limit_is_413(guarded: Appliance) -> None:
    raw = json.dumps({**PROMPT, "prompt": "x" * (5 * 1024 * 1024)}).encode()
    status, _, body = guarded.post(COMP, None, raw=raw)
    record("bad inputs tried", 1)
    assert status == 413
    assert "larger than" in error_of(body)["message"]


def test_wrong_method_and_path_are_json_errors(guarded: Appliance) -> None:
    for method, path, status in (("GET", CHAT, 405), ("POST", "/v1/nothing", 404), ("PUT", COMP, 405)):
        got, _, body = http_call(method, guarded.url + path, b"{}" if method != "GET" else None, guarded.headers())
        record("bad inputs tried", 1)
        assert got == status
        assert error_of(body)["code"] == status


def test_accepted_spellings_work(guarded: Appliance) -> None:
    """What clients send that is easy to refuse by mistake: nulls, content parts, top_k 0, one-prompt lists."""
    ok = [
        (CHAT, {**MSG, "temperature": None, "top_p": None, "stop": None, "seed": None, "n": 1}),
        (CHAT, {**MSG, "messages": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                                    {"role": "user", "content": "Hi"}]}),
        (CHAT, {**MSG, "top_k": 0, "presence_penalty": 0, "frequency_penalty": 0, "max_completion_tokens": 1}),
        (COMP, {**PROMPT, "prompt": ["The sky is"], "logprobs": 2}),
        (COMP, {**PROMPT, "prompt": [[504, 3458, 314]], "stop_token_ids": [0]}),
        (CHAT, {**MSG, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "logit_bias": {},
                "user": "u1", "metadata": {"k": "v"}, "parallel_tool_calls": False}),
    ]
    for path, body in ok:
        status, _, resp = guarded.post(path, body)
        assert status == 200, (body, resp[:300])
    wait_pools_idle(guarded)


def test_openapi_describes_what_is_accepted(guarded: Appliance) -> None:
    """Every documented numeric bound holds on the live server: the bound is accepted, one step past is not."""
    status, _, raw = http_call("GET", guarded.url + "/openapi.json", headers=guarded.headers())
    assert status == 200
    doc = json.loads(raw)
    schemas = {path: doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
               for path in (CHAT, COMP)}
    base = {CHAT: MSG, COMP: PROMPT}
    checked = 0
    for path, schema in schemas.items():
        assert set(schema["required"]) == ({"messages"} if path == CHAT else {"prompt"})
        for key, prop in schema["properties"].items():
            if prop.get("type") not in ("integer", "number"):
                continue
            step = 1 if prop["type"] == "integer" else 0.01
            extra = {"logprobs": True} if key == "top_logprobs" else {}
            for bound, past in (("minimum", -step), ("maximum", step)):
                if bound not in prop or key in ("max_tokens", "max_completion_tokens") and bound == "maximum":
                    continue
                edge = prop[bound]
                exclusive = bound == "minimum" and prop.get("exclusiveMinimum") is True
                inside = edge + step if exclusive else edge
                if key == "seed" and bound == "maximum":
                    inside, past = edge, 1
                good = {**base[path], **extra, key: inside}
                bad = {**base[path], **extra, key: (edge if exclusive else edge + past)}
                got, _, body = guarded.post(path, good)
                assert got == 200, (path, key, good[key], body[:300])
                got, _, body = guarded.post(path, bad)
                assert got == 400, (path, key, bad[key], body[:300])
                assert error_of(body)["param"] == key
                checked += 1
                record("bad inputs tried", 1)
    assert checked >= 20
    wait_pools_idle(guarded)
