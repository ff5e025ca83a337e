"""The OpenAI request bodies as msgspec Structs: every type and limit is written here once.

`openai_api` decodes a body into :class:`ChatRequest` or :class:`CompletionRequest` (after
`openai_fields` has refused unknown and unsupported fields); `openapi_doc` generates /openapi.json
from the same Structs, so the document and the checks cannot drift. A value a Struct refuses is a
:class:`BodyError` naming the field, its message phrased from the generated schema (the bounds, the
allowed values). What msgspec cannot express (the context length, the vocabulary, best_of >= n,
tool_choice needing tools, a schema llguidance compiles) stays in plain code.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Annotated, Any, Literal, get_args

import msgspec
from msgspec import Meta

from appliance.engine.request import (
    LOGIT_BIAS_RANGE,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_STOP,
    PENALTY_RANGE,
    REPETITION_PENALTY_RANGE,
)
from appliance.serve.tools import MAX_TOOLS, NAME_RE

MAX_N = 8  # choices per request; sample i runs with seed + i (mod 2^63) when a seed is given
MAX_PROMPTS = 64  # prompts of one /v1/completions request (each answered as its own request)
MAX_STOP_CHARS = 1024  # one stop string; the stream holds back up to this many characters per token
MAX_TEMPERATURE = 100
MAX_SEED = 2**63 - 1
MIN_TOP_K = -1  # -1 and 0: off
Role = Literal["system", "user", "assistant", "tool", "developer"]
ROLES: tuple[str, ...] = get_args(Role)

TokenId = Annotated[int, Meta(ge=0)]
StopString = Annotated[str, Meta(min_length=1, max_length=MAX_STOP_CHARS)]


class BodyError(ValueError):
    """``field``: the request field the message is about (OpenAI's ``param``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# -- messages -------------------------------------------------------------------------------------------
class TextPart(msgspec.Struct):
    type: Literal["text"]
    text: str


class FunctionCall(msgspec.Struct):
    name: str
    arguments: Annotated[str, Meta(description="a JSON text")]


class ToolCall(msgspec.Struct, kw_only=True):
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall


class Message(msgspec.Struct, kw_only=True):
    role: Role
    content: str | list[TextPart] | None = None
    tool_calls: Annotated[list[ToolCall], Meta(description="assistant: earlier calls")] | None = None
    tool_call_id: Annotated[str, Meta(description="tool: the call answered")] | None = None
    name: str | None = None


# -- structured outputs (checked in detail by `response_format`) -------------------------------------------
class JsonSchemaSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str | None = None
    description: str | None = None
    schema: Annotated[dict[str, Any], Meta(description="a JSON schema")]
    strict: bool | None = None


class TextFormat(msgspec.Struct, tag_field="type", tag="text", forbid_unknown_fields=True):
    pass


class JsonObjectFormat(msgspec.Struct, tag_field="type", tag="json_object", forbid_unknown_fields=True):
    pass


class JsonSchemaFormat(msgspec.Struct, tag_field="type", tag="json_schema", forbid_unknown_fields=True):
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat,
    Meta(description="structured outputs: the answer is constrained token by token (llguidance) to any JSON "
                     "object or to the JSON schema; a schema llguidance cannot compile is a 400 naming "
                     "response_format; strict is accepted and always enforced")]


# -- tools (checked in detail by `tools`) ---------------------------------------------------------------
class FunctionDef(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(pattern=f"^{NAME_RE.pattern}$")]
    description: str = ""
    parameters: Annotated[dict[str, Any], Meta(
        description="a JSON schema (llguidance must compile it when enforced)")] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct):
    type: Literal["function"]
    function: NamedFunction


class StructuredOutputs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's ``structured_outputs`` (checked in detail by `response_format`): exactly one of json, regex,
    choice or json_object."""

    json: Annotated[dict[str, Any] | str, Meta(description="a JSON schema, or its JSON text")] | None = None
    regex: Annotated[str, Meta(min_length=1, extra_json_schema={"format": "regex"})] | None = None
    choice: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1, max_length=256)] | None = None
    json_object: bool | None = None
    disable_fallback: bool | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool | None = None


# -- the bodies -----------------------------------------------------------------------------------------
Penalty = Annotated[float, Meta(ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])]
Bias = Annotated[float, Meta(ge=LOGIT_BIAS_RANGE[0], le=LOGIT_BIAS_RANGE[1])]


class _Common(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None
    max_tokens: Annotated[int, Meta(ge=1, description="at most the context length minus the prompt's tokens")] \
        | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=MAX_TEMPERATURE)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=MIN_TOP_K, description="-1 or 0: off")] | None = None
    min_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    presence_penalty: Annotated[Penalty, Meta(description=(
        "subtracted from the logit of every token the answer already holds"))] | None = None
    frequency_penalty: Annotated[Penalty, Meta(description=(
        "times how often the answer holds a token, subtracted from its logit"))] | None = None
    repetition_penalty: Annotated[float, Meta(ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1],
                                              description=(
        "vLLM's extension (CTRL's penalty): a token of the prompt or the answer has its logit divided by this when "
        "positive, multiplied when negative; 1: off"))] | None = None
    logit_bias: Annotated[dict[str, Bias], Meta(max_length=MAX_LOGIT_BIAS, description=(
        "token id (as a string) -> added to that token's logit before sampling; -100 bans it, 100 all but forces "
        "it"))] | None = None
    seed: Annotated[int, Meta(ge=0, le=MAX_SEED)] | None = None
    n: Annotated[int, Meta(ge=1, le=MAX_N, description=(
        "choices, sharing one prefill of the prompt (and one KV handoff); with a seed, choice i samples with "
        "seed + i (mod 2^63), so each is reproducible"))] | None = None
    stop: StopString | Annotated[list[StopString], Meta(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=MAX_STOP)] | None = None
    ignore_eos: bool | None = None
    min_tokens: Annotated[int, Meta(ge=0, description=(
        "vLLM's extension: no EOS, stop token or stop string ends the answer before this many tokens; at most "
        "max_tokens; not with structured outputs or an enforced tool call"))] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    guided_regex: Annotated[str, Meta(min_length=1, extra_json_schema={"format": "regex"}, description=(
        "vLLM's extension: the answer must match this regex in full; excludes a response_format other than text "
        "and the other guided_* fields"))] | None = None
    guided_json: Annotated[dict[str, Any] | str, Meta(description=(
        "vLLM's extension: the answer is JSON matching this schema (an object, or its JSON text; as "
        "response_format json_schema); excludes a response_format other than text and the other guided_* "
        "fields"))] | None = None
    guided_choice: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1, max_length=256, description=(
        "vLLM's extension: the answer is exactly one of these strings; excludes a response_format other than text "
        "and the other guided_* fields"))] | None = None
    structured_outputs: Annotated[StructuredOutputs, Meta(description=(
        "vLLM's structured outputs (its name since 0.12): exactly one of json, regex, choice, json_object; "
        "excludes a response_format other than text and the guided_* fields"))] | None = None


class ChatRequest(_Common, kw_only=True, forbid_unknown_fields=True):
    """A /v1/chat/completions body."""

    messages: Annotated[list[Message], Meta(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: Annotated[list[Tool], Meta(max_length=MAX_TOOLS, description=(
        "rendered by the chat template (its tools variable; else a Hermes-style system message); calls in the "
        "answer come back in message.tool_calls"))] | None = None
    tool_choice: Annotated[Literal["none", "auto", "required"] | NamedToolChoice, Meta(description=(
        "required and a named function are enforced by constrained decoding (one call); auto: the answer is "
        "parsed for calls; none: the tools are not shown"))] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Common, kw_only=True, forbid_unknown_fields=True):
    """A /v1/completions body."""

    prompt: Annotated[
        Annotated[str, Meta(min_length=1)] | Annotated[list[TokenId], Meta(min_length=1)],
        Meta(description=f"text or token ids (each below the vocabulary size); a list of up to {MAX_PROMPTS} of "
                         "either is answered prompt by prompt, choice index = prompt index x n + sample index")]
    logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: Annotated[bool, Meta(description=(
        "the answer's text starts with the prompt; with logprobs, so do its logprobs: each prompt token's given "
        "the ones before it (the first has none), how a model is scored on a text"))] | None = None
    best_of: Annotated[int, Meta(ge=1, le=MAX_N, description=(
        "at least n; draws best_of samples (one prefill) and returns the n with the highest summed token "
        "logprob; not with stream when above n"))] | None = None


BODIES: dict[str, type[_Common]] = {"chat": ChatRequest, "completions": CompletionRequest}
REF = "#/components/schemas/{name}"


@cache
def components() -> tuple[dict[str, Any], dict[str, Any]]:
    """``({endpoint: {"$ref": ...}}, {name: schema})``: JSON Schema (2020-12) of the bodies."""
    refs, comps = msgspec.json.schema_components(list(BODIES.values()), ref_template=REF)
    return dict(zip(BODIES, refs, strict=True)), comps


def decode(body: dict[str, Any], endpoint: str) -> Any:
    """``body`` (a dict from JSON) as the endpoint's Struct; raises :class:`BodyError` naming the field."""
    try:
        return msgspec.convert(body, BODIES[endpoint], strict=True)
    except msgspec.ValidationError as exc:
        raise _body_error(str(exc), body, endpoint) from None


# -- msgspec's message -> one naming the field ----------------------------------------------------------------
_NOUNS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "a boolean", "array": "a list",
          "object": "an object"}
_STEP = re.compile(r"\.(\w+)|\[(\d+)\]")


def param_of(path: str) -> str:
    """The ``param`` of an error at ``path``: the top field; ``messages[i].field`` inside a message."""
    m = re.match(r"messages\[\d+\](\.\w+)?", path) or re.match(r"\w+", path)
    return m[0] if m else path


def _steps(path: str) -> list[str | int]:
    return [int(i) if i else k for k, i in _STEP.findall("." + path)]


def _value(body: Any, path: str) -> Any:
    for step in _steps(path):
        try:
            body = body[step]
        except (KeyError, IndexError, TypeError):
            return None
    return body


def _branches(node: dict[str, Any], comps: dict[str, Any]) -> list[dict[str, Any]]:
    if "$ref" in node:
        return _branches(comps[node["$ref"].rsplit("/", 1)[1]], comps)
    if "anyOf" in node:
        return [b for sub in node["anyOf"] for b in _branches(sub, comps)]
    return [node]


def _schema_at(endpoint: str, path: str) -> list[dict[str, Any]]:
    """The schema branches that describe ``path`` in the endpoint's body."""
    refs, comps = components()
    nodes = _branches(refs[endpoint], comps)
    for step in _steps(path):
        subs = [n["items"] if isinstance(step, int) else n["properties"][step] for n in nodes
                if ("items" in n if isinstance(step, int) else step in n.get("properties", {}))]
        nodes = [b for sub in subs for b in _branches(sub, comps)]
    return nodes


def _bounds(s: dict[str, Any]) -> str:
    lo, hi = s.get("minimum"), s.get("maximum")
    if s.get("type") == "integer" and lo is not None and hi is not None:
        return f"between {lo} and {hi}"
    parts = [f">= {lo}" if lo is not None else "", f"> {s['exclusiveMinimum']}" if "exclusiveMinimum" in s else "",
             f"<= {hi}" if hi is not None else ""]
    return " and ".join(p for p in parts if p)


def _body_error(text: str, body: dict[str, Any], endpoint: str) -> BodyError:
    msg, _, loc = text.partition(" - at `")
    path = loc.rstrip("`").removeprefix("$").removeprefix(".")
    err = _phrased(msg, path, body, endpoint)
    if re.match(r"messages\[\d+\]\.content\[", path):  # OpenAI's other parts (images, audio): not served
        return BodyError(err.field, f"{err} (a message's content is a string or a list of text parts, "
                                    '{"type": "text", "text": ...})')
    return err


def _phrased(msg: str, path: str, body: dict[str, Any], endpoint: str) -> BodyError:
    if m := re.fullmatch(r"Object missing required field `(\w+)`", msg):
        path = f"{path}.{m[1]}" if path else m[1]
        return BodyError(param_of(path), f"{path} is required")
    if m := re.fullmatch(r"Object contains unknown field `(\w+)`", msg):
        path = f"{path}.{m[1]}" if path else m[1]
        return BodyError(param_of(path), f"unrecognized field {path}")
    value, field = _value(body, path), param_of(path)
    if m := re.fullmatch(r"Expected `([\w |]+)`, got `\w+`", msg):
        nouns = [_NOUNS.get(t, t) for t in m[1].split(" | ") if t != "null"]
        return BodyError(field, f"{path} must be {' or '.join(nouns)}, got {type(value).__name__}")
    if m := re.fullmatch(r"Expected `(\w+)` of length ([<>]=) (\d+)", msg):
        if m[2] == ">=" and m[3] == "1":
            return BodyError(field, f"{path} must not be empty")
        most = "most" if m[2] == "<=" else "least"
        if m[1] == "str":
            return BodyError(field, f"{path} must be at {most} {m[3]} characters")
        return BodyError(field, f"{path} has {len(value or ())} entries; at {most} {m[3]} are allowed")
    if m := re.fullmatch(r"Expected `(\w+)` ([<>]=? \S+)", msg):
        ranged = [s for s in _schema_at(endpoint, path) if {"minimum", "maximum", "exclusiveMinimum"} & set(s)]
        return BodyError(field, f"{path} must be {_bounds(ranged[0]) if ranged else m[2]}, got {value}")
    if m := re.fullmatch(r"Invalid (?:enum )?value (.+)", msg):
        allowed = [v for s in _schema_at(endpoint, path) for v in s.get("enum", ())]
        return BodyError(field, f"{path} {m[1]} is not one of: {', '.join(map(str, allowed))}")
    return BodyError(field, f"{path or 'request body'}: {msg}")
