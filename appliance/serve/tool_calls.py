"""Tool calls out of a model's answer, whole or streamed.

Accepted forms (either family's key for the arguments, ``arguments`` or ``parameters``):

- Hermes / Qwen: ``text <tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (several blocks; the
  last one may be cut by the end of the answer);
- Llama 3 JSON: the whole answer is one call object, maybe after ``<|python_tag|>``, or several joined
  by ``;`` (an enforced call is this form).

A call is kept only when its name is one of the request's tools and its arguments are a JSON object;
an answer with no such call is plain content.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from appliance.serve.tools import CALL_BLOCK, CALL_OPEN, PYTHON_TAG, Tools


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object
    id: str

    def message(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _call(obj: Any, names: tuple[str, ...]) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False), f"call_{secrets.token_hex(12)}")


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def parse_calls(text: str, tools: Tools) -> tuple[str | None, list[ToolCall]]:
    """``(content, calls)``: the text before the first call (None when empty) and the calls; with no
    call, the whole text is the content."""
    names = tools.names
    start = text.find(CALL_OPEN)
    if start >= 0:
        calls = [c for c in (_call(_loads(m.group(1)), names) for m in CALL_BLOCK.finditer(text, start)) if c]
        if calls:
            return text[:start].strip() or None, calls
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].strip()
    if body.startswith("{"):
        whole = _call(_loads(body), names)
        if whole is not None:
            return None, [whole]
        parts = [_call(_loads(p), names) for p in body.split(";") if p.strip()]
        if parts and all(parts):
            return None, [p for p in parts if p is not None]
    return text, []


class ToolStream:
    """Streams an answer's content while holding back what may be a tool call; :meth:`finish` parses.

    Enforced calls (``required``/named) hold everything: the answer is the call. Under ``auto`` the
    text is released up to where a call may begin (``<tool_call>``, or an answer that opens with
    ``{`` or ``<|python_tag|>``), and a tail that may grow into ``<tool_call>`` waits a token.
    """

    def __init__(self, tools: Tools) -> None:
        self.tools = tools
        self.text = ""
        self.sent = 0

    def feed(self, delta: str) -> str:
        self.text += delta
        hold = self._hold_from()
        out = self.text[self.sent:hold] if hold > self.sent else ""
        self.sent = max(self.sent, hold)
        return out

    def _hold_from(self) -> int:
        if self.tools.enforced:
            return 0
        head = self.text.lstrip()
        if not head or head.startswith("{") or PYTHON_TAG.startswith(head[:len(PYTHON_TAG)]):
            return 0 if self.sent == 0 else self.sent
        at = self.text.find(CALL_OPEN, self.sent)
        if at >= 0:
            return at
        for k in range(min(len(CALL_OPEN) - 1, len(self.text)), 0, -1):
            if self.text.endswith(CALL_OPEN[:k]):
                return len(self.text) - k
        return len(self.text)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The content not yet released and the calls (none: the rest is content)."""
        content, calls = parse_calls(self.text, self.tools)
        if not calls:
            rest = self.text[self.sent:]
        else:
            before = self.text[:self.text.find(CALL_OPEN)] if CALL_OPEN in self.text else ""
            rest = before.rstrip()[self.sent:] if content else ""
        self.sent = len(self.text)
        return rest, calls


_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]+)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


class CallDeltas:
    """An enforced call's ``delta.tool_calls`` while it is generated: the name (with the call's id) once
    the call object has named it, then its arguments text as it grows, the last ``}`` held back until the
    next token (it may close the call object itself). The deltas' arguments join to the call's arguments."""

    def __init__(self) -> None:
        self.id = f"call_{secrets.token_hex(12)}"
        self.name: str | None = None
        self.sent = 0  # characters of the arguments text released

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Deltas for the answer so far (``text``: all of it)."""
        m = _HEAD.match(text)
        if m is None:
            return []
        out: list[dict[str, Any]] = []
        if self.name is None:
            self.name = m.group(1)
            out.append({"index": 0, "id": self.id, "type": "function",
                        "function": {"name": self.name, "arguments": ""}})
        args = text[m.end():].rstrip()
        return out + self._release(args[:-1] if args.endswith("}") else args)

    def finish(self, text: str) -> list[dict[str, Any]]:
        """The arguments not yet released, once the answer is over (a complete call object loses its
        closing brace; a cut one is released as it is)."""
        m = _HEAD.match(text)
        if m is None or self.name is None:
            return []
        args = text[m.end():].rstrip()
        if isinstance(_loads(text.strip()), dict) and args.endswith("}"):
            args = args[:-1].rstrip()
        return self._release(args)

    def _release(self, args: str) -> list[dict[str, Any]]:
        if len(args) <= self.sent:
            return []
        delta, self.sent = args[self.sent:], len(args)
        return [{"index": 0, "function": {"arguments": delta}}]
