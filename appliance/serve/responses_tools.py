"""Function tools on /v1/responses, read as chat's (`appliance.serve.tools`: the same prompt, parsing and
enforcement) and answered as the Responses API's items.

- ``tools``: ``{"type": "function", "name", "description", "parameters", "strict"}`` (flat, where chat
  nests them under ``function``); hosted tools (web search, files, computer use, MCP ...) are refused
  with a 400 naming the entry.
- ``tool_choice``: ``none``, ``auto``, ``required`` or ``{"type": "function", "name": ...}``.
- ``input`` items ``function_call`` (a call the model made earlier: an assistant message's tool call, merged
  into the assistant message before it) and ``function_call_output`` (its result: a ``tool`` message).
- The answer's calls are ``function_call`` output items after the message (there is a message only when
  the model wrote text, or made no call); streamed, each call's item is added when its name is known,
  its arguments follow as ``response.function_call_arguments.delta`` events.
"""

from __future__ import annotations

import json
from typing import Any

from appliance.serve import openai_api as oai
from appliance.serve.tool_calls import ToolCall

TOOL_FIELDS = ("name", "description", "parameters", "strict")
CHOICE_SHAPE = 'none, auto, required or {"type": "function", "name": ...}'


def chat_tools(value: Any) -> list[dict[str, Any]] | None:
    """``tools`` in chat's shape (None: none sent); a hosted tool or a stray field is a 400 naming it."""
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise oai.ApiError(400, 'tools must be a list of function tools ({"type": "function", "name": ...})', "tools")
    out = []
    for i, t in enumerate(value):
        kind = t.get("type") if isinstance(t, dict) else type(t).__name__
        if kind != "function":
            raise oai.ApiError(400, f'tools[{i}] is a {kind!r} tool: pdbox serves function tools ({{"type": '
                                    '"function", "name": ...}) and runs no hosted tool', "tools")
        unknown = sorted(set(t) - {"type", *TOOL_FIELDS})
        if unknown:
            raise oai.ApiError(400, f"tools[{i}] has unknown fields: {', '.join(unknown)}", "tools")
        out.append({"type": "function", "function": {k: t[k] for k in TOOL_FIELDS if t.get(k) is not None}})
    return out


def chat_tool_choice(value: Any) -> Any:
    """``tool_choice`` in chat's shape."""
    if value is None or value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and set(value) == {"type", "name"} \
            and isinstance(value["name"], str):
        return {"type": "function", "function": {"name": value["name"]}}
    raise oai.ApiError(400, f"tool_choice must be {CHOICE_SHAPE}, got {value!r}", "tool_choice")


def _text(value: Any, where: str, name: str) -> str:
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") in ("input_text", "output_text")
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise oai.ApiError(400, f"{where}.{name} must be a string (or input_text parts)", "input")
    return value


def add_call(messages: list[dict[str, Any]], item: dict[str, Any], where: str) -> None:
    """A ``function_call`` input item: a tool call of the assistant message before it (a new one if the
    message before is not the assistant's)."""
    for key in ("call_id", "name", "arguments"):
        if not isinstance(item.get(key), str):
            raise oai.ApiError(400, f"{where}.{key} must be a string", "input")
    try:
        json.loads(item["arguments"])
    except json.JSONDecodeError:
        raise oai.ApiError(400, f"{where}.arguments is not JSON", "input") from None
    fn = {"name": item["name"], "arguments": item["arguments"]}
    call = {"id": item["call_id"], "type": "function", "function": fn}
    if messages and messages[-1]["role"] == "assistant":
        messages[-1].setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})


def call_output(item: dict[str, Any], where: str) -> dict[str, Any]:
    """A ``function_call_output`` input item as chat's ``tool`` message."""
    if not isinstance(item.get("call_id"), str):
        raise oai.ApiError(400, f"{where}.call_id must be a string", "input")
    return {"role": "tool", "tool_call_id": item["call_id"], "content": _text(item.get("output"), where, "output")}


def item_id(call_id: str) -> str:
    """The output item id of the call ``call_id`` (the same in a stream's events and its final response)."""
    return "fc_" + call_id.removeprefix("call_")


def call_item(call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id(call_id), "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def call_items(calls: list[ToolCall], status: str = "completed") -> list[dict[str, Any]]:
    return [call_item(c.id, c.name, c.arguments, status) for c in calls]
