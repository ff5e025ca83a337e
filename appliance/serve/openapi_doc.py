"""The OpenAPI document the router serves at /openapi.json: what it accepts."""

from __future__ import annotations

from typing import Any

from appliance.serve.openai_api import MAX_LOGPROBS, MAX_N, MAX_STOP, MAX_STOP_CHARS, ROLES
from appliance.serve.openai_fields import METADATA
from appliance.serve.response_format import REGEX_FIELD
from appliance.serve.tools import MAX_TOOLS

_SAMPLING: dict[str, Any] = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1, "nullable": True,
                   "description": "at most the context length minus the prompt's tokens"},
    "max_completion_tokens": {"type": "integer", "minimum": 1, "nullable": True},
    "temperature": {"type": "number", "minimum": 0, "maximum": 100, "nullable": True},
    "top_p": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1, "nullable": True},
    "top_k": {"type": "integer", "minimum": -1, "nullable": True, "description": "-1 or 0: off"},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1, "nullable": True},
    "presence_penalty": {"type": "number", "minimum": 0, "maximum": 0, "nullable": True,
                         "description": "not applied: only 0"},
    "frequency_penalty": {"type": "number", "minimum": 0, "maximum": 0, "nullable": True,
                          "description": "not applied: only 0"},
    "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1, "nullable": True},
    "n": {"type": "integer", "minimum": 1, "maximum": MAX_N, "nullable": True,
          "description": "choices, sharing one prefill of the prompt (and one KV handoff); with a seed, choice i "
                         "samples with seed + i (mod 2^63), so each is reproducible"},
    "stop": {"nullable": True, "oneOf": [
        {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
        {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
         "maxItems": MAX_STOP}]},
    "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": MAX_STOP,
                       "nullable": True},
    "ignore_eos": {"type": "boolean", "nullable": True},
    "stream": {"type": "boolean", "nullable": True},
    "stream_options": {"type": "object", "nullable": True,
                       "properties": {"include_usage": {"type": "boolean", "nullable": True}}},
    "response_format": {"nullable": True, "description": "structured outputs: the answer is constrained token by "
                        "token (llguidance) to any JSON object or to the JSON schema; a schema llguidance cannot "
                        "compile is a 400 naming response_format; strict is accepted and always enforced",
                        "oneOf": [
                            {"type": "object", "required": ["type"],
                             "properties": {"type": {"type": "string", "enum": ["text", "json_object"]}}},
                            {"type": "object", "required": ["type", "json_schema"], "properties": {
                                "type": {"type": "string", "enum": ["json_schema"]},
                                "json_schema": {"type": "object", "required": ["schema"], "properties": {
                                    "name": {"type": "string"}, "description": {"type": "string"},
                                    "schema": {"type": "object", "description": "a JSON schema"},
                                    "strict": {"type": "boolean", "nullable": True}}}}}]},
    REGEX_FIELD: {"type": "string", "minLength": 1, "format": "regex", "nullable": True,
                  "description": "pdbox extension (vLLM's name): the answer must match this regex in full; "
                                 "excludes a response_format other than text"},
}

_FUNCTION = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}, "description": {"type": "string"},
    "parameters": {"type": "object", "description": "a JSON schema (llguidance must compile it when enforced)"},
    "strict": {"type": "boolean", "nullable": True}}}
_TOOLS: dict[str, Any] = {
    "tools": {"type": "array", "maxItems": MAX_TOOLS, "nullable": True, "items": {
        "type": "object", "required": ["type", "function"],
        "properties": {"type": {"type": "string", "enum": ["function"]}, "function": _FUNCTION}},
        "description": "rendered by the chat template (its tools variable; else a Hermes-style system message); "
                       "calls in the answer come back in message.tool_calls"},
    "tool_choice": {"nullable": True, "description": "required and a named function are enforced by constrained "
                    "decoding (one call); auto: the answer is parsed for calls; none: the tools are not shown",
                    "oneOf": [{"type": "string", "enum": ["none", "auto", "required"]},
                              {"type": "object", "required": ["type", "function"], "properties": {
                                  "type": {"type": "string", "enum": ["function"]},
                                  "function": {"type": "object", "required": ["name"],
                                               "properties": {"name": {"type": "string"}}}}}]},
    "parallel_tool_calls": {"type": "boolean", "nullable": True},
}

_ERROR = {"description": "OpenAI-style error", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": "string", "nullable": True},
        "code": {"type": "integer"}}}}}}}}


def _op(summary: str, schema: dict[str, Any], limits: str) -> dict[str, Any]:
    return {"summary": summary, "description": limits,
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {"200": {"description": "completion (JSON, or SSE when stream is true)"},
                          **{str(c): _ERROR for c in (400, 401, 404, 413, 429, 502, 503)}}}


def openapi_document(model: str, max_body_bytes: int = 4 * 1024 * 1024) -> dict[str, Any]:
    limits = (f"The body is a UTF-8 JSON object of at most {max_body_bytes} bytes (413 past it); NaN and Infinity "
              "are refused. The prompt plus max_tokens must fit the model's context (GET /v1/models: max_model_len). "
              "A field not listed is refused (400 naming it), except metadata that cannot change the answer ("
              f"{', '.join(sorted(METADATA))}) and the no-op value of a field pdbox does not support ("
              "logit_bias: {}, presence_penalty: 0, ...). "
              "Errors use OpenAI's shape, with param naming the field. Past "
              "--max-inflight requests in flight the answer is 429 with Retry-After; 502 means a worker failed "
              "(in a stream: an error event), 503 that no worker is available.")
    message = {"type": "object", "required": ["role"], "properties": {
        "role": {"type": "string", "enum": list(ROLES)},
        "content": {"nullable": True, "oneOf": [{"type": "string"}, {"type": "array", "items": {
            "type": "object", "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
            "required": ["type", "text"]}}]},
        "tool_calls": {"type": "array", "nullable": True, "description": "assistant: earlier calls", "items": {
            "type": "object", "required": ["function"],
            "properties": {"id": {"type": "string"}, "type": {"type": "string", "enum": ["function"]},
                           "function": {"type": "object", "required": ["name", "arguments"], "properties": {
                               "name": {"type": "string"},
                               "arguments": {"type": "string", "description": "a JSON text"}}}}}},
        "tool_call_id": {"type": "string", "nullable": True, "description": "tool: the call answered"},
        "name": {"type": "string", "nullable": True},
    }}
    chat = {"type": "object", "required": ["messages"], "properties": {
        **_SAMPLING, **_TOOLS, "messages": {"type": "array", "minItems": 1, "items": message},
        "logprobs": {"type": "boolean", "nullable": True},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS, "nullable": True}}}
    comp = {"type": "object", "required": ["prompt"], "properties": {
        **_SAMPLING, "prompt": {"oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0},
             "description": "token ids, each below the vocabulary size"},
            {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "string", "minLength": 1}},
            {"type": "array", "minItems": 1, "maxItems": 1,
             "items": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}}]},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS, "nullable": True},
        "best_of": {"type": "integer", "minimum": 1, "maximum": MAX_N, "nullable": True,
                    "description": "at least n; draws best_of samples (one prefill) and returns the n with the "
                                   "highest summed token logprob; not with stream when above n"}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "pdbox", "version": "0.1.0", "description": f"OpenAI-compatible API serving {model}"},
        "paths": {
            "/v1/chat/completions": {"post": _op("Chat completion", chat, limits)},
            "/v1/completions": {"post": _op("Text completion", comp, limits)},
            "/v1/models": {"get": {"summary": "Served models", "responses": {"200": {"description": "model list"}}}},
            "/health": {"get": {"summary": "Health", "responses": {"200": {"description": "ok"},
                                                                    "503": {"description": "degraded"}}}},
        },
    }
