"""The rules of a /v1/responses body that its schema cannot state, shared by the in-process fuzzer
(tests/serve/test_responses_fuzz.py) and the live one (tests/chaos/test_fuzz.py)."""

from __future__ import annotations


def documented(body: dict, kept: str, most_tokens: int = 16) -> dict:
    """``body`` made documented: ``previous_response_id`` names the stored response ``kept``, a function
    call's arguments are JSON, tool names have the documented form and are unique, an enforced tool_choice
    comes only with tools, logprobs only without them, and the answer is at most ``most_tokens`` long
    (also where the body leaves it to the default)."""
    if isinstance(body.get("previous_response_id"), str):
        body["previous_response_id"] = kept
    items = body["input"] if isinstance(body.get("input"), list) else []
    for item in items:
        if isinstance(item, dict) and item.get("type") == "function_call":
            item["arguments"] = "{}"
    tools = body.get("tools") or []
    for i, tool in enumerate(tools):
        tool["name"] = f"f{i}"
    if body.get("tool_choice") not in (None, "none", "auto"):
        body.pop("tool_choice")
    if tools:
        body.pop("include", None)
        body.pop("top_logprobs", None)
    if isinstance(body.get("max_output_tokens"), int):
        body["max_output_tokens"] = min(body["max_output_tokens"], most_tokens)
    else:
        body["max_output_tokens"] = most_tokens
    return body
