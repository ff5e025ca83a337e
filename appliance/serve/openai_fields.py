"""Which request fields pdbox honours: nothing a client sends is silently dropped.

Every field of OpenAI's chat and completions bodies falls in one of three sets:

- **applied**: the fields of the Structs in `openai_schema`, read by `openai_api` and honoured
  (sampling, penalties and ``logit_bias``, stops, logprobs, streaming, ``n``, structured outputs:
  ``response_format`` text /
  json_object / json_schema and vLLM's ``guided_regex``/``guided_json``/``guided_choice``, checked in
  `response_format`, which
  refuses any other type naming the field; on chat, ``tools``, ``tool_choice`` and
  ``parallel_tool_calls``, checked in `tools`; on completions, ``best_of``);
- **metadata**: fields that do not change the answer (``user``, ``metadata``, ...), accepted;
- **unsupported**: fields that would change the answer, accepted only at their no-op value
  (``"tools": []`` on /v1/completions, ``"suffix": ""``); any other value is a 400 that names the field.

A field in none of the sets is a 400 too (OpenAI answers an unknown argument the same way), so a
typo such as ``max_token`` is caught instead of running with the default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from appliance.serve.openai_schema import BODIES

APPLIED = {endpoint: frozenset(body.__struct_fields__) for endpoint, body in BODIES.items()}  # the Structs' fields
METADATA = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {}


# field -> (is its value a no-op?, what pdbox cannot do)
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (_empty, "tool calling is served on /v1/chat/completions only"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "tool calling is served on /v1/chat/completions only"),
    "parallel_tool_calls": (lambda v: True, ""),  # says nothing without tools
    "functions": (_empty, "function calling is not supported"),
    "function_call": (lambda v: v in (None, "none", "auto"), "function calling is not supported"),
    "best_of": (lambda v: v in (None, 1), "best_of is served on /v1/completions (as OpenAI's API has it); use n"),
    "echo": (lambda v: v in (None, False), "echo is served on /v1/completions"),
    "suffix": (lambda v: v in (None, ""), "suffix (insertion) is not supported"),
    "modalities": (lambda v: v in (None, ["text"]), "only text output is supported"),
    "audio": (lambda v: v is None, "audio output is not supported"),
    "prediction": (lambda v: v is None, "predicted outputs are not supported"),
    "web_search_options": (lambda v: v is None, "web search is not supported"),
    "reasoning_effort": (lambda v: v is None, "reasoning_effort is not supported by this model"),
    "verbosity": (lambda v: v is None, "verbosity is not supported"),
}


def refusal(body: dict[str, Any], endpoint: str) -> tuple[str, str] | None:
    """``(field, message)`` for the first field pdbox would not honour, or None when all are."""
    for name, value in body.items():
        if name in APPLIED[endpoint]:
            continue
        if name in UNSUPPORTED:
            noop, why = UNSUPPORTED[name]
            if not noop(value):
                return name, f"{name}: {why}"
        elif name not in METADATA:
            return name, f"unrecognized request field {name!r} for /v1/{_path(endpoint)}"
    return None


def _path(endpoint: str) -> str:
    return "chat/completions" if endpoint == "chat" else "completions"
