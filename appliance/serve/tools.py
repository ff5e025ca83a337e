"""Tool calling on /v1/chat/completions: ``tools``, ``tool_choice``, ``parallel_tool_calls``.

- The tools go through the chat template: a template that renders ``tools`` gets them as its variable
  (as transformers passes them); one that does not (SmolLM2, the embedded model) gets them in the
  system message, in the Hermes format (Qwen2.5's wording, ``<tools>`` and ``<tool_call>`` tags).
- The call format is the template's: ``llama3`` (a bare JSON object ``{"name", "parameters"}``, maybe
  after ``<|python_tag|>``) when the template speaks ``ipython``/``<|python_tag|>``, else ``hermes``
  (``<tool_call>{"name", "arguments"}</tool_call>``). The parser accepts both, either key.
- ``tool_choice``: ``none`` (the tools are not shown and the answer is text), ``auto`` (the default:
  free text, parsed for calls), ``required`` and ``{"type": "function", "function": {"name": ...}}``:
  ENFORCED by constrained decoding, the answer is one call object (JSON, the format's keys) matching
  a tool's ``parameters`` schema, so even a 135M model returns a well-formed call. One call per
  answer when enforced (``parallel_tool_calls`` is accepted; ``auto`` may return several).

Everything is checked before any engine sees the request; a bad value is a 400 naming the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from appliance.engine.constraint import MAX_SPEC_CHARS, Constraint
from appliance.serve.protocol import ConstraintSpec

MAX_TOOLS = 64
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
CHOICES = ("none", "auto", "required")
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>"
)


class ToolError(ValueError):
    """``field``: the request field the message is about."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Tools:
    """A request's tools (as sent), the choice (``none``/``auto``/``required``/``named``), the forced
    name (``named``), the call format (``hermes``/``llama3``) and, when enforced, the constraint."""

    tools: tuple[dict[str, Any], ...]
    choice: str
    name: str | None
    format: str
    constraint: ConstraintSpec | None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t["function"]["name"] for t in self.tools)

    @property
    def parses(self) -> bool:
        """Whether the answer is parsed for calls (not with ``none``)."""
        return self.choice != "none"

    @property
    def enforced(self) -> bool:
        return self.constraint is not None

    @property
    def args_key(self) -> str:
        return "parameters" if self.format == "llama3" else "arguments"


def call_format(template: str) -> str:
    """``llama3`` for a template that speaks Llama 3.1's ipython tool format, else ``hermes``."""
    return "llama3" if PYTHON_TAG in template or "ipython" in template else "hermes"


def renders_tools(template: str) -> bool:
    return "tools" in template


def parse_tools(body: dict[str, Any], template: str) -> Tools | None:
    """The request's tools, None when it has none; raises :class:`ToolError` naming the field."""
    raw, choice = body.get("tools"), body.get("tool_choice")
    par = body.get("parallel_tool_calls")
    if par is not None and not isinstance(par, bool):
        raise ToolError("parallel_tool_calls", "parallel_tool_calls must be a boolean")
    if raw is None or raw == []:
        if choice not in (None, "none", "auto"):
            raise ToolError("tool_choice", "tool_choice needs tools: send a non-empty tools list")
        return None
    if not isinstance(raw, list):
        raise ToolError("tools", "tools must be a list of {\"type\": \"function\", \"function\": {...}} objects")
    if len(raw) > MAX_TOOLS:
        raise ToolError("tools", f"tools has {len(raw)} entries; at most {MAX_TOOLS}")
    tools = tuple(_tool(i, t) for i, t in enumerate(raw))
    names = [t["function"]["name"] for t in tools]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ToolError("tools", f"tools has two functions named {dup!r}")
    name = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ToolError("tool_choice", "tool_choice must be none, auto, required or "
                                           "{\"type\": \"function\", \"function\": {\"name\": ...}}")
        name = fn["name"]
        if name not in names:
            raise ToolError("tool_choice", f"tool_choice names {name!r}, which is not among tools "
                                           f"({', '.join(names)})")
        choice = "named"
    elif choice not in CHOICES:
        raise ToolError("tool_choice", f"tool_choice must be none, auto, required or a named function, got {choice!r}")
    fmt = call_format(template)
    constraint = None
    if choice in ("required", "named"):
        chosen = [t for t in tools if name is None or t["function"]["name"] == name]
        constraint = _call_constraint(chosen, "parameters" if fmt == "llama3" else "arguments")
    return Tools(tools, choice, name, fmt, constraint)


def _tool(i: int, t: Any) -> dict[str, Any]:
    where = f"tools[{i}]"
    if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
        raise ToolError("tools", f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
    fn = t["function"]
    unknown = sorted(set(fn) - {"name", "description", "parameters", "strict"})
    if unknown:
        raise ToolError("tools", f"{where}.function has unknown fields: {', '.join(unknown)}")
    name = fn.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ToolError("tools", f"{where}.function.name must be 1-64 letters, digits, _ or -, got {name!r}")
    if "description" in fn and not isinstance(fn["description"], str):
        raise ToolError("tools", f"{where}.function.description must be a string")
    if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
        raise ToolError("tools", f"{where}.function.parameters must be a JSON schema object")
    if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
        raise ToolError("tools", f"{where}.function.strict must be a boolean")
    return {"type": "function", "function": {k: v for k, v in fn.items() if v is not None}}


def _call_constraint(tools: list[dict[str, Any]], args_key: str) -> ConstraintSpec:
    """One call object of any of ``tools``, its arguments matching the tool's parameters schema."""
    options = [{"type": "object", "additionalProperties": False, "required": ["name", args_key], "properties": {
        "name": {"const": t["function"]["name"]},
        args_key: t["function"].get("parameters") or {"type": "object"}}} for t in tools]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    spec = json.dumps(schema, separators=(",", ":"))
    if len(spec) > MAX_SPEC_CHARS:
        raise ToolError("tools", f"the tools' schemas are {len(spec)} characters as JSON; at most {MAX_SPEC_CHARS}")
    try:
        Constraint("json_schema", spec)
    except ValueError as exc:
        raise ToolError("tools", f"tools: a function's parameters schema is not usable: {exc}") from None
    return ConstraintSpec(kind="json_schema", spec=spec)


# -- the prompt -------------------------------------------------------------------------------------
def system_text(tools: Tools) -> str:
    """The Hermes tool preamble, for a template that does not render ``tools`` itself."""
    return HERMES_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools.tools))


def with_tools(messages: list[dict[str, Any]], tools: Tools | None, template: str) -> tuple[list[dict], list | None]:
    """The messages and the ``tools`` template variable for this request (see the module's doc)."""
    if tools is None or tools.choice == "none":
        return messages, None
    if renders_tools(template):
        return messages, list(tools.tools)
    pre = system_text(tools)
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": messages[0]["content"] + "\n\n" + pre}
        return [first, *messages[1:]], None
    return [{"role": "system", "content": pre}, *messages], None


def history_message(m: dict[str, Any], i: int, template: str) -> dict[str, Any]:
    """An assistant message with ``tool_calls`` or a ``tool`` message, as this template takes it: passed
    through (arguments as objects) to a template that renders tools, else written out in Hermes tags."""
    aware = renders_tools(template)
    role, content = m["role"], m["content"]
    if role == "tool":
        call_id = m.get("tool_call_id")
        if call_id is not None and not isinstance(call_id, str):
            raise ToolError(f"messages[{i}].tool_call_id", f"messages[{i}].tool_call_id must be a string")
        if aware:
            return {k: v for k, v in (("role", "tool"), ("content", content), ("tool_call_id", call_id),
                                      ("name", m.get("name"))) if v is not None}
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
    calls = m.get("tool_calls")
    if role != "assistant" or not calls:
        return {"role": role, "content": content}
    if not isinstance(calls, list):
        raise ToolError(f"messages[{i}].tool_calls", f"messages[{i}].tool_calls must be a list")
    clean = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise ToolError(f"messages[{i}].tool_calls", f"messages[{i}].tool_calls[{j}] must be "
                            "{\"type\": \"function\", \"function\": {\"name\": ..., \"arguments\": \"<JSON>\"}}")
        try:
            args = json.loads(fn["arguments"])
        except json.JSONDecodeError:
            raise ToolError(f"messages[{i}].tool_calls",
                            f"messages[{i}].tool_calls[{j}].function.arguments is not JSON") from None
        clean.append({"id": c.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    if aware:
        return {"role": "assistant", "content": content, "tool_calls": clean}
    calls_json = (json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}) for c in clean)
    text = "".join(f"{CALL_OPEN}\n{j}\n{CALL_CLOSE}" for j in calls_json)
    return {"role": "assistant", "content": (content + "\n" if content else "") + text}
