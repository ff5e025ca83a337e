"""The worker stream's events: one class per ``kind``, the same NDJSON lines on the wire."""

from __future__ import annotations

import msgspec
import pytest

from appliance.serve.protocol import Done, Error, First, Moved, Reserved, Tokens, decode_event, encode_line

LINES = [
    (b'{"kind":"reserved","pages":[3,4],"handles":["h"]}', Reserved(pages=[3, 4], handles=["h"])),
    (b'{"kind":"tokens","token_ids":[5],"logprobs":[{"token_id":5}]}',
     Tokens(token_ids=[5], logprobs=[{"token_id": 5}])),
    (b'{"kind":"tokens","finish_reason":"stop","index":2}', Tokens(finish_reason="stop", index=2)),
    (b'{"kind":"first","token_ids":[4]}', First(token_ids=[4])),
    (b'{"kind":"done","finish_reason":"length","prompt_tokens":9,"cached_tokens":3}',
     Done(finish_reason="length", prompt_tokens=9, cached_tokens=3)),
    (b'{"kind":"error","message":"no pages","status":503}', Error(message="no pages", status=503)),
    (b'{"kind":"moved","prompt_tokens":9}', Moved(prompt_tokens=9)),
]


@pytest.mark.parametrize(("line", "event"), LINES)
def test_each_kind_is_its_own_class_and_keeps_its_wire_form(line: bytes, event) -> None:
    assert decode_event(line) == event and type(decode_event(line)) is type(event)
    assert encode_line(event) == line + b"\n"


def test_an_unknown_kind_is_malformed_and_another_kinds_field_is_ignored() -> None:
    with pytest.raises(msgspec.ValidationError, match="kind"):
        decode_event(b'{"kind":"later"}')
    assert decode_event(b'{"kind":"done","token_ids":[1]}') == Done()


def test_the_prefill_answer_is_typed_both_ways() -> None:
    """A prefill worker's answer is one Struct, written and read by msgspec: a body without its first
    token is refused (the router turns that into WorkerFailed, never a KeyError)."""
    import msgspec

    from appliance.serve.protocol import PrefillAnswer

    answer = PrefillAnswer(token_ids=[7], logprobs=[{"token_id": 7}], prompt_tokens=12, cached_tokens=4)
    assert msgspec.json.decode(msgspec.json.encode(answer), type=PrefillAnswer) == answer
    with pytest.raises(msgspec.ValidationError, match="token_ids"):
        msgspec.json.decode(b'{"prompt_tokens": 3}', type=PrefillAnswer)
