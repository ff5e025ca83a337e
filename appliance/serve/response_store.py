"""Stored responses of /v1/responses: ``store``, ``previous_response_id`` and ``GET``/``DELETE
/v1/responses/{id}``.

The router keeps the last ``capacity`` responses in memory (least recently used first out; none survive a
restart, and each router keeps its own). A stored entry is the Response object as it was answered and the
conversation it ends, in chat's shape, so that a request naming it as ``previous_response_id`` continues
that conversation (OpenAI's rule: the earlier ``instructions`` are not carried over; the new request's
apply). A response that failed is not stored.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from appliance.serve import openai_api as oai


@dataclass(frozen=True)
class Stored:
    response: dict[str, Any]
    messages: tuple[dict[str, Any], ...]  # the conversation, this response's answer last


class ResponseStore:
    """At most ``capacity`` responses (0: none, and ``store: true`` is refused)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"the responses store holds >= 0 responses, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, Stored] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def wants(self, body: dict[str, Any]) -> bool:
        """Whether this request's response is kept: ``store`` (OpenAI's default: true) and room for any."""
        store = body.get("store")
        if store is not None and not isinstance(store, bool):
            raise oai.ApiError(400, "store must be a boolean", "store")
        if store and not self.capacity:
            raise oai.ApiError(400, "store: this server keeps no responses (--responses-store 0); send store false",
                               "store")
        return store is not False and self.capacity > 0

    def previous(self, body: dict[str, Any]) -> tuple[dict[str, Any], ...]:
        """The conversation ``previous_response_id`` names (empty without one); a 400 when it is not kept."""
        rid = body.get("previous_response_id")
        if rid is None:
            return ()
        if not isinstance(rid, str):
            raise oai.ApiError(400, "previous_response_id must be a string", "previous_response_id")
        stored = self.get(rid)
        if stored is None:
            raise oai.ApiError(400, f"previous_response_id {rid!r} is not a stored response (this server keeps the "
                                    f"last {self.capacity}, in memory)", "previous_response_id")
        return stored.messages

    def put(self, rid: str, response: dict[str, Any], messages: Sequence[dict[str, Any]]) -> None:
        self._items[rid] = Stored(response, (*messages, assistant_message(response["output"])))
        self._items.move_to_end(rid)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, rid: str) -> Stored | None:
        stored = self._items.get(rid)
        if stored is not None:
            self._items.move_to_end(rid)
        return stored

    def delete(self, rid: str) -> bool:
        return self._items.pop(rid, None) is not None


def assistant_message(output: list[dict[str, Any]]) -> dict[str, Any]:
    """A Response's output items as chat's assistant message: the text, then the calls."""
    text = "".join(part["text"] for item in output if item["type"] == "message" for part in item["content"])
    message: dict[str, Any] = {"role": "assistant", "content": text}
    calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
             for i in output if i["type"] == "function_call"]
    if calls:
        message["tool_calls"] = calls
    return message
