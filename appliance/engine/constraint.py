"""A structured-output constraint: what the answer must match (a JSON schema, any JSON object, a regex).

Frozen and hashable, it travels inside :class:`~appliance.engine.request.SamplingParams` (and on the
wire inside :class:`~appliance.serve.protocol.Sampling`), so the prefill and decode engines of a
request each build the same grammar from it. Checked when built: a bad schema or regex raises
``ValueError`` with llguidance's reason. Imports no torch (the router builds these too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import llguidance

KINDS = ("json_schema", "json_object", "regex")
MAX_SPEC_CHARS = 64 * 1024
# Compact JSON with Python's separators: a small model left free to emit whitespace may never stop.
# A schema's own "x-guidance" options override these.
JSON_DEFAULTS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = json.dumps({"type": "object"})


@dataclass(frozen=True)
class Constraint:
    """``kind``: one of :data:`KINDS`; ``spec``: the JSON schema as a JSON string (``json_schema``),
    ``""`` (``json_object``) or the regex (``regex``)."""

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"constraint kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.spec, str):
            raise ValueError(f"constraint spec must be a string, got {type(self.spec).__name__}")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise ValueError(f"constraint spec is {len(self.spec)} characters; at most {MAX_SPEC_CHARS}")
        if self.kind == "regex" and not self.spec:
            raise ValueError("a regex constraint needs a non-empty pattern")
        error = grammar_error(self.kind, self.spec)
        if error:
            raise ValueError(error)

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> Constraint:
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def json_object(cls) -> Constraint:
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", pattern)

    def grammar(self) -> str:
        """llguidance's grammar for this constraint (cached by (kind, spec))."""
        return _grammar(self.kind, self.spec)


@lru_cache(maxsize=256)
def _grammar(kind: str, spec: str) -> str:
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    schema = ANY_OBJECT if kind == "json_object" else spec
    try:
        parsed = json.loads(schema)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the JSON schema is not valid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(parsed, dict | bool):
        raise ValueError(f"a JSON schema must be an object or a boolean, got {type(parsed).__name__}")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(parsed, defaults=JSON_DEFAULTS)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"the JSON schema is not usable: {exc}") from None


@lru_cache(maxsize=256)
def grammar_error(kind: str, spec: str) -> str:
    """Why ``(kind, spec)`` does not compile ("" when it does). No tokenizer needed."""
    try:
        grammar = _grammar(kind, spec)
    except ValueError as exc:
        return str(exc)
    what = "regex" if kind == "regex" else "JSON schema"
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return f"the {what} is not supported: {_brief(messages[0])}" if is_error and messages else ""


def _brief(message: str) -> str:
    """llguidance's first line and its ``error:`` line (it also prints the grammar with a caret)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    extra = [ln for ln in lines[1:] if ln.startswith("error:")]
    return " ".join(lines[:1] + extra)
