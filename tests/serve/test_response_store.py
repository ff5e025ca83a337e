"""The router's store of /v1/responses answers (`appliance.serve.response_store`): store's default and its
refusals, previous_response_id's conversation placed after the new instructions, least recently used first
out, and a Response's output read back as chat's assistant message."""

from __future__ import annotations

import pytest

from appliance.serve import openai_api as oai
from appliance.serve import responses_api as ra
from appliance.serve.response_store import ResponseStore, assistant_message

TEXT = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi Ada."}]}
CALL = {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": '{"city": "Oslo"}'}


def test_store_defaults_to_true_and_is_refused_only_where_nothing_is_kept() -> None:
    kept, none = ResponseStore(2), ResponseStore(0)
    assert kept.wants({}) and kept.wants({"store": True}) and not kept.wants({"store": False})
    assert not none.wants({}) and not none.wants({"store": False})
    for store, body, words in ((none, {"store": True}, "keeps no responses"), (kept, {"store": 0}, "boolean")):
        with pytest.raises(oai.ApiError, match=words) as info:
            store.wants(body)
        assert info.value.status == 400 and info.value.param == "store"
    with pytest.raises(ValueError):
        ResponseStore(-1)


def test_a_previous_response_continues_its_conversation_after_the_new_instructions() -> None:
    store = ResponseStore(2)
    store.put("resp_a", {"id": "resp_a", "output": [TEXT]}, [{"role": "user", "content": "I am Ada."}])
    previous = store.previous({"previous_response_id": "resp_a"})
    assert previous == ({"role": "user", "content": "I am Ada."}, {"role": "assistant", "content": "Hi Ada."})
    chat = ra.chat_body({"instructions": "Be brief.", "input": "Who am I?"}, previous)
    assert chat["messages"] == [{"role": "system", "content": "Be brief."}, *previous,
                                {"role": "user", "content": "Who am I?"}]
    assert store.previous({}) == ()
    for rid, words in (("resp_zz", "not a stored response"), (5, "must be a string")):
        with pytest.raises(oai.ApiError, match=words) as info:
            store.previous({"previous_response_id": rid})
        assert info.value.status == 400 and info.value.param == "previous_response_id"


def test_the_least_recently_used_response_goes_first() -> None:
    store = ResponseStore(2)
    for rid in ("a", "b"):
        store.put(rid, {"id": rid, "output": [TEXT]}, [])
    assert store.get("a") is not None  # a is now the more recent
    store.put("c", {"id": "c", "output": [TEXT]}, [])
    assert store.get("b") is None and store.get("a") and store.get("c") and len(store) == 2
    assert store.delete("a") and not store.delete("a") and len(store) == 1


def test_an_answer_s_items_become_chat_s_assistant_message() -> None:
    assert assistant_message([TEXT, CALL]) == {
        "role": "assistant", "content": "Hi Ada.",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "weather",
                                                                        "arguments": '{"city": "Oslo"}'}}]}
    assert assistant_message([CALL])["content"] == ""
