"""/tokenize and /detokenize with the embedded model's real tokenizer: a prompt gets the ids
/v1/completions gives it, a chat the ids /v1/chat/completions renders, ids give their text back; bad
bodies are 400s naming the field."""

from __future__ import annotations

import pytest

from appliance.model.loader import load_tokenizer
from appliance.serve import openai_api as oai
from appliance.serve.tokenize_api import detokenize, tokenize

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tok(smollm_path):
    return load_tokenizer(smollm_path)[0]


def test_prompts_and_chats_get_the_ids_the_endpoints_use(tok) -> None:
    got = tokenize({"model": MODEL, "prompt": "Hello, world"}, tok, MODEL, 8192)
    assert got["tokens"] == tok.encode_prompt("Hello, world") and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == 8192 and got["token_strs"] is None
    raw = tokenize({"prompt": "Hello, world", "add_special_tokens": False, "return_token_strs": True}, tok, MODEL, 64)
    assert raw["tokens"] == tok.encode("Hello, world") and len(raw["token_strs"]) == raw["count"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text",
                                                                                            "text": "Hi"}]}]
    chat = tokenize({"messages": messages}, tok, MODEL, 64)
    parsed = oai.parse_chat({"model": MODEL, "messages": messages}, tok, MODEL, 8192)
    assert chat["tokens"] == parsed.prompt_ids  # what /v1/chat/completions prefills
    bare = tokenize({"messages": messages, "add_generation_prompt": False}, tok, MODEL, 64)
    assert bare["count"] < chat["count"] and chat["tokens"][:bare["count"]] == bare["tokens"]
    assert detokenize({"tokens": raw["tokens"]}, tok, MODEL, tok.vocab_size) == {"prompt": "Hello, world"}


@pytest.mark.parametrize(("path", "body", "param", "words"), [
    ("tokenize", {}, "prompt", "one of prompt"),
    ("tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt", "one of prompt"),
    ("tokenize", {"prompt": 5}, "prompt", "string"),
    ("tokenize", {"messages": [{"role": "robot", "content": "b"}]}, "messages", "messages"),
    ("tokenize", {"messages": []}, "messages", "empty"),
    ("tokenize", {"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens", "boolean"),
    ("tokenize", {"prompt": "a", "max_tokens": 3}, "max_tokens", "unrecognized"),
    ("tokenize", {"model": "nope", "prompt": "a"}, "model", "does not exist"),
    ("detokenize", {"tokens": [1, "a"]}, "tokens", "list of token ids"),
    ("detokenize", {"tokens": [10**9]}, "tokens", "outside the vocabulary"),
    ("detokenize", {}, "tokens", "list of token ids"),
])
def test_bad_bodies_name_the_field(tok, path: str, body: dict, param: str, words: str) -> None:
    with pytest.raises(oai.ApiError, match=words) as info:
        if path == "tokenize":
            tokenize(body, tok, MODEL, 64)
        else:
            detokenize(body, tok, MODEL, tok.vocab_size)
    assert info.value.param == param and info.value.status in (400, 404)
