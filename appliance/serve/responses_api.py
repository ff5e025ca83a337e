"""/v1/responses, OpenAI's Responses API, for text and function tools: a body is read as the chat request
it amounts to (the same checks, sampling, placement and engines), and the answer comes back as a Response
object or, streamed, as its typed events (``response.created`` ... ``response.output_text.delta`` ...
``response.completed``).

Served: ``input`` (a string, or messages whose content is a string or ``input_text``/``output_text``
parts, and ``function_call``/``function_call_output`` items), ``instructions`` (a system message first),
``max_output_tokens``, ``temperature``, ``top_p``, ``text.format`` (text, json_object, json_schema:
structured outputs), function ``tools`` with ``tool_choice`` and ``parallel_tool_calls``
(`appliance.serve.responses_tools`), the text's logprobs (``include: ["message.output_text.logprobs"]``
and ``top_logprobs``), ``stream``, the metadata fields, and ``store``/``previous_response_id``: the router
keeps the last responses in memory (`appliance.serve.response_store`). ``conversation`` objects, hosted
tools, reasoning and other input types are refused: a 400 that names the field, never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from appliance.serve import openai_api as oai
from appliance.serve import responses_tools as rt

CHAT_PARAMS = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text"}
COPIED = ("model", "temperature", "top_p", "stream", "parallel_tool_calls")
METADATA = frozenset({"metadata", "user", "safety_identifier", "prompt_cache_key", "service_tier"})  # echoed or unused
MAX_METADATA = 16  # OpenAI's limits on metadata: pairs, key and value characters
MAX_METADATA_KEY, MAX_METADATA_VALUE = 64, 512
# field -> (is its value a no-op?, why pdbox refuses any other)
NOOP: dict[str, tuple[Any, str]] = {
    "conversation": (lambda v: v is None, "pdbox keeps no conversation objects; name the last response in "
                                          "previous_response_id or send the messages in input"),
    "background": (lambda v: v is None or v is False, "background responses are not supported"),
    "max_tool_calls": (lambda v: v is None, "max_tool_calls is not supported (an enforced tool_choice makes "
                                            "one call)"),
    "reasoning": (lambda v: v is None, "reasoning is not supported by this model"),
    "truncation": (lambda v: v in (None, "disabled"), "truncation: a prompt over the context is refused"),
    "stream_options": (lambda v: v is None, "stream_options: usage comes with response.completed"),
    "prompt": (lambda v: v is None, "stored prompts are not supported"),
}
ROLES = ("user", "assistant", "system", "developer")
LOGPROBS = "message.output_text.logprobs"  # the one thing ``include`` can add


def chat_body(body: dict[str, Any], previous: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The chat request a Responses body amounts to (``previous``: the conversation its
    ``previous_response_id`` ends, after the instructions); a field pdbox would not honour is a 400 naming it."""
    for name, value in body.items():
        if name in METADATA:
            _check_metadata(name, value)
            continue
        if name in (*COPIED, "input", "instructions", "max_output_tokens", "text", "tools", "tool_choice", "include",
                    "top_logprobs", "store", "previous_response_id"):  # the last two: the router's store
            continue
        if name not in NOOP:
            raise oai.ApiError(400, f"unrecognized request field {name!r} for /v1/responses", name)
        noop, why = NOOP[name]
        if not noop(value):
            raise oai.ApiError(400, f"{name}: {why}", name)
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise oai.ApiError(400, "instructions must be a string", "instructions")
        messages.append({"role": "system", "content": instructions})
    messages += [*previous, *input_messages(body)]
    chat: dict[str, Any] = {k: body[k] for k in COPIED if body.get(k) is not None}
    chat["messages"] = messages
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    fmt = _format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    tools = rt.chat_tools(body.get("tools"))
    if tools is not None:
        chat["tools"] = tools
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = rt.chat_tool_choice(body["tool_choice"])
    if _wants_logprobs(body):
        if tools is not None:
            raise oai.ApiError(400, "logprobs are not served with tools on /v1/responses (they are on "
                                    "/v1/chat/completions)", "include" if body.get("include") else "top_logprobs")
        chat["logprobs"] = True
        top = body.get("top_logprobs")
        chat["top_logprobs"] = 0 if top is None else top  # as given (0.0, false ...): checked as chat checks it
    elif body.get("top_logprobs") is not None:
        chat["top_logprobs"] = body["top_logprobs"]  # 0: checked as chat checks it, asks for nothing
    return chat


def _wants_logprobs(body: dict[str, Any]) -> bool:
    """``include`` lists the text's logprobs, or ``top_logprobs`` asks for alternatives (never dropped)."""
    include = body.get("include")
    if include is not None and (not isinstance(include, list) or any(i != LOGPROBS for i in include)):
        raise oai.ApiError(400, f"include may list only {LOGPROBS!r}: pdbox adds nothing else to a response",
                           "include")
    top = body.get("top_logprobs")
    return bool(include) or (isinstance(top, int) and not isinstance(top, bool) and top > 0)


def _check_metadata(name: str, value: Any) -> None:
    """``metadata`` (an object of up to 16 strings, echoed in the response) and the other fields pdbox takes
    and does not use (strings): a 400 naming the field when the value is not of that shape."""
    if value is None:
        return
    if name != "metadata":
        if not isinstance(value, str):
            raise oai.ApiError(400, f"{name} must be a string", name)
        return
    if not isinstance(value, dict) or len(value) > MAX_METADATA:
        raise oai.ApiError(400, f"metadata must be an object of at most {MAX_METADATA} string values", name)
    for k, v in value.items():
        if len(k) > MAX_METADATA_KEY or not isinstance(v, str) or len(v) > MAX_METADATA_VALUE:
            raise oai.ApiError(400, f"metadata[{k[:MAX_METADATA_KEY]!r}]: keys are at most {MAX_METADATA_KEY} "
                                    f"characters, values strings of at most {MAX_METADATA_VALUE}", name)


def input_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The body's ``input`` as chat messages (what a stored response keeps of its request)."""
    return _messages(body.get("input"))


def _messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise oai.ApiError(400, "input must be a string or a non-empty list of messages", "input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else type(item).__name__
        if kind == "function_call":
            rt.add_call(out, item, where)
            continue
        if kind == "function_call_output":
            out.append(rt.call_output(item, where))
            continue
        if kind != "message" or item.get("role") not in ROLES:
            raise oai.ApiError(400, f"{where} must be a message with a role among {', '.join(ROLES)}, a function_call "
                                    f"or a function_call_output (pdbox serves text and function tools; got "
                                    f"{kind!r})", "input")
        content = item.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text") \
                        or not isinstance(part.get("text"), str):
                    raise oai.ApiError(400, f"{where}.content[{j}] must be an input_text or output_text part "
                                            "(pdbox serves text)", "input")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise oai.ApiError(400, f"{where}.content must be a string or a list of text parts", "input")
        out.append({"role": item["role"], "content": content})
    return out


def _format(text: Any) -> dict[str, Any] | None:
    """``text.format`` as chat's ``response_format`` (None: plain text)."""
    if text is None:
        return None
    if not isinstance(text, dict) or set(text) - {"format", "verbosity"}:
        raise oai.ApiError(400, "text must be an object with format", "text")
    if text.get("verbosity") is not None:
        raise oai.ApiError(400, "text.verbosity is not supported", "text")
    fmt = text.get("format")
    if fmt is None or fmt == {"type": "text"}:
        return None
    if not isinstance(fmt, dict):
        raise oai.ApiError(400, "text.format must be an object", "text")
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    raise oai.ApiError(400, f"text.format type {fmt.get('type')!r} is not one of text, json_object, json_schema",
                       "text")


def parse(body: dict[str, Any], tokenizer: Any, served: str, max_model_len: int,
          previous: Sequence[dict[str, Any]] = (), **kw: Any) -> oai.ParsedRequest:
    """The body as a parsed chat request (after the ``previous`` conversation), its errors named in the
    Responses API's words."""
    chat = chat_body(body, previous)
    try:
        return oai.parse_chat(chat, tokenizer, served, max_model_len, **kw)
    except oai.ApiError as exc:  # in the chat body's words
        param = CHAT_PARAMS.get((exc.param or "").split("[")[0].split(".")[0], exc.param)
        message = exc.message.replace(".function", "")  # chat nests a tool under "function"
        for chat, ours in CHAT_PARAMS.items():
            message = message.replace(chat, ours)
        raise oai.ApiError(exc.status, message, param, exc.kind, exc.headers) from None
