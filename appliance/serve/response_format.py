"""Structured outputs in a request body: OpenAI's ``response_format`` and vLLM's extensions.

- ``{"type": "text"}`` (or no field): free text;
- ``{"type": "json_object"}``: any JSON object;
- ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``: JSON
  matching the schema. It is always enforced strictly (``strict`` is accepted, either value);
- ``guided_regex``: a string, the answer must match the regex in full;
- ``guided_json``: a JSON schema (an object, or its JSON text), as ``json_schema`` above;
- ``guided_choice``: a list of strings, the answer is exactly one of them;
- ``structured_outputs`` (vLLM's name since 0.12, which dropped the three above): an object with one of
  ``json``, ``regex``, ``choice`` (as above) or ``json_object: true``; ``disable_fallback`` is accepted
  (pdbox has one backend), a ``grammar``, ``structural_tag`` or whitespace option is refused.

At most one of them constrains a request (the others' refusal names the field).

The answer is constrained token by token (llguidance, `appliance.engine.grammar`). Everything is
checked here, before any engine sees the request: a bad schema or regex is a 400 naming the field.
"""

from __future__ import annotations

import json
from typing import Any

from appliance.engine.constraint import MAX_SPEC_CHARS, Constraint
from appliance.serve.protocol import ConstraintSpec

TYPES = ("text", "json_object", "json_schema")
REGEX_FIELD = "guided_regex"
GUIDED = (REGEX_FIELD, "guided_json", "guided_choice", "structured_outputs")  # vLLM's, checked in this order
KIND_OF = {REGEX_FIELD: "regex", "guided_json": "json", "guided_choice": "choice"}  # a guided_* field's kind
SO_KEYS = ("json", "regex", "choice")  # structured_outputs' own names for the same kinds
SO_REFUSED = ("grammar", "structural_tag", "whitespace_pattern", "disable_any_whitespace",
              "disable_additional_properties")
MAX_CHOICES = 256
REGEX_META = set("\\.+*?()|[]{}^$#&-~")  # what llguidance's regex syntax (Rust regex-syntax) reads as syntax


class FormatError(ValueError):
    """``field``: the request field the message is about."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def parse_constraint(body: dict[str, Any]) -> ConstraintSpec | None:
    """The request's constraint (wire form), None for free text; raises :class:`FormatError`."""
    found = _from_response_format(body.get("response_format"))
    field = "response_format"
    for name in GUIDED:
        value = body.get(name)
        if value is None:
            continue
        guided = _structured_outputs(value) if name == "structured_outputs" else _guided(KIND_OF[name], value, name)
        if found is not None:
            other = field if field in GUIDED else "a response_format other than text"
            raise FormatError(name, f"{name} and {other} exclude each other")
        found, field = guided, name
    if found is None:
        return None
    kind, spec = found
    try:
        Constraint(kind, spec)  # compiles the grammar once (cached): a bad schema or regex fails here
    except ValueError as exc:
        raise FormatError(field, f"{field}: {exc}") from None
    return ConstraintSpec(kind=kind, spec=spec)


def _guided(kind: str, value: Any, field: str, name: str | None = None) -> tuple[str, str]:
    """A regex, json or choice constraint of vLLM's as (constraint kind, spec); ``field`` is the request field
    a refusal names, ``name`` (default ``field``) what it calls the value (``structured_outputs.json`` ...)."""
    name = name or field
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise FormatError(field, f"{name} must be a non-empty string (a regex)")
        return "regex", value
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise FormatError(field, f"{name} is not valid JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(value, dict):
            raise FormatError(field, f"{name} must be a JSON schema object (or its JSON text)")
        spec = json.dumps(value, separators=(",", ":"))
        if len(spec) > MAX_SPEC_CHARS:
            raise FormatError(field, f"{name} is {len(spec)} characters as JSON; at most {MAX_SPEC_CHARS}")
        return "json_schema", spec
    if not isinstance(value, list) or not 0 < len(value) <= MAX_CHOICES \
            or not all(isinstance(c, str) and c for c in value):
        raise FormatError(field, f"{name} must be a list of 1 to {MAX_CHOICES} non-empty strings")
    return "regex", choice_regex(value)


def _structured_outputs(value: Any) -> tuple[str, str]:
    field = "structured_outputs"
    if not isinstance(value, dict):
        raise FormatError(field, "structured_outputs must be an object with one of json, regex, choice or json_object")
    unknown = sorted(set(value) - {*SO_KEYS, "json_object", "disable_fallback", *SO_REFUSED})
    if unknown:
        raise FormatError(field, f"structured_outputs has unknown fields: {', '.join(unknown)}")
    refused = next((k for k in SO_REFUSED if value.get(k) not in (None, False, "")), None)
    if refused is not None:
        raise FormatError(field, f"structured_outputs.{refused} is not supported (pdbox serves json, regex, choice "
                                 "and json_object)")
    if value.get("disable_fallback") not in (None, True, False):
        raise FormatError(field, "structured_outputs.disable_fallback must be a boolean")
    json_object = value.get("json_object")
    if json_object not in (None, True, False):
        raise FormatError(field, "structured_outputs.json_object must be a boolean")
    chosen = [k for k in SO_KEYS if value.get(k) is not None] + (["json_object"] if json_object else [])
    if len(chosen) != 1:
        raise FormatError(field, "structured_outputs must set exactly one of json, regex, choice or json_object"
                                 + (f" (it sets {', '.join(chosen)})" if chosen else ""))
    if chosen[0] == "json_object":
        return "json_object", ""
    return _guided(chosen[0], value[chosen[0]], field, f"structured_outputs.{chosen[0]}")


def choice_regex(choices: list[str]) -> str:
    """A regex matching exactly one of ``choices`` (their characters literal)."""
    return "(" + "|".join("".join("\\" + c if c in REGEX_META else c for c in s) for s in choices) + ")"


def _from_response_format(rf: Any) -> tuple[str, str] | None:
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise FormatError("response_format", "response_format must be an object such as {\"type\": \"json_object\"}")
    kind = rf.get("type")
    if kind not in TYPES:
        raise FormatError("response_format", f"response_format.type must be one of {', '.join(TYPES)}, got {kind!r}")
    extra = sorted(set(rf) - {"type", "json_schema"})
    if extra or (kind != "json_schema" and "json_schema" in rf):
        raise FormatError("response_format", f"response_format has fields {kind!r} does not take: "
                                             f"{', '.join(extra or ['json_schema'])}")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object", ""
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise FormatError("response_format", "response_format.json_schema must be an object with name and schema "
                                             "(structured outputs of type json_schema)")
    unknown = sorted(set(js) - {"name", "schema", "strict", "description"})
    if unknown:
        raise FormatError("response_format", f"response_format.json_schema has unknown fields: {', '.join(unknown)}")
    name = js.get("name")
    if name is not None and not isinstance(name, str):
        raise FormatError("response_format", "response_format.json_schema.name must be a string")
    strict = js.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise FormatError("response_format", "response_format.json_schema.strict must be a boolean")
    schema = js.get("schema")
    if schema is None:
        raise FormatError("response_format", "response_format.json_schema.schema is required (structured outputs "
                                             "of type json_schema constrain the answer to it)")
    if not isinstance(schema, dict):
        raise FormatError("response_format", "response_format.json_schema.schema must be a JSON schema object")
    spec = json.dumps(schema, separators=(",", ":"))  # property order is the answer's key order
    if len(spec) > MAX_SPEC_CHARS:
        raise FormatError("response_format", f"response_format.json_schema.schema is {len(spec)} characters as "
                                             f"JSON; at most {MAX_SPEC_CHARS}")
    return "json_schema", spec
