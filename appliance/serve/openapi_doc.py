"""The OpenAPI document the router serves at /openapi.json: what it accepts.

The request bodies are generated from the Structs that check them (`openai_schema`), so every type and
limit in the document is the one the server applies."""

from __future__ import annotations

from typing import Any

from appliance.serve.openai_fields import METADATA
from appliance.serve.openai_schema import components


def _openapi30(node: Any, comps: dict[str, Any]) -> Any:
    """msgspec's JSON Schema (2020-12) as an OpenAPI 3.0 schema: references inlined (the bodies are not
    recursive), ``anyOf`` with null as ``nullable``, other unions as ``oneOf``, a numeric
    ``exclusiveMinimum`` as 3.0's boolean, a string enum typed."""
    if isinstance(node, list):
        return [_openapi30(v, comps) for v in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return _openapi30(comps[node["$ref"].rsplit("/", 1)[1]], comps)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "anyOf":
            options = [_openapi30(v, comps) for v in value if v != {"type": "null"}]
            if len(options) < len(value):
                out["nullable"] = True
            if len(options) == 1:
                out.update(options[0])
            else:
                out["oneOf"] = options
        elif key == "exclusiveMinimum" and not isinstance(value, bool):
            out.update(minimum=value, exclusiveMinimum=True)
        elif key == "required" and not value:
            continue  # OpenAPI 3.0: a required list has at least one name
        elif key not in ("discriminator", "default", "title"):
            out[key] = _openapi30(value, comps)
    if "enum" in out and "type" not in out and all(isinstance(v, str) for v in out["enum"]):
        out["type"] = "string"
    return out


def request_schemas() -> dict[str, dict[str, Any]]:
    """``{endpoint: schema}`` of the request bodies, generated from `openai_schema`'s Structs."""
    refs, comps = components()
    bodies = {endpoint: _openapi30(ref, comps) for endpoint, ref in refs.items()}
    for body in bodies.values():  # metadata fields are accepted too (openai_fields), beside the Struct's
        body.pop("additionalProperties", None)
    return bodies


_TEXT_PART = {"type": "object", "required": ["type", "text"], "properties": {
    "type": {"type": "string", "enum": ["input_text", "output_text"]}, "text": {"type": "string"}}}
RESPONSES_BODY: dict[str, Any] = {
    "type": "object", "required": ["input"], "description": "appliance/serve/responses_api.py: what is served",
    "properties": {
        "model": {"type": "string"},
        "input": {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"oneOf": [
            {"type": "object", "required": ["role", "content"], "properties": {
                "type": {"type": "string", "enum": ["message"]},
                "role": {"type": "string", "enum": ["user", "assistant", "system", "developer"]},
                "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]}}},
            {"type": "object", "required": ["type", "call_id", "name", "arguments"], "properties": {
                "type": {"type": "string", "enum": ["function_call"]}, "call_id": {"type": "string"},
                "name": {"type": "string"}, "arguments": {"type": "string", "description": "JSON"}}},
            {"type": "object", "required": ["type", "call_id", "output"], "properties": {
                "type": {"type": "string", "enum": ["function_call_output"]}, "call_id": {"type": "string"},
                "output": {"oneOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]}}}]}}]},
        "instructions": {"type": "string", "nullable": True},
        "max_output_tokens": {"type": "integer", "minimum": 1, "nullable": True},
        "temperature": {"type": "number", "minimum": 0, "maximum": 100, "nullable": True},
        "top_p": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1, "nullable": True},
        "stream": {"type": "boolean", "nullable": True},
        "text": {"type": "object", "nullable": True, "description": "format: text, json_object or json_schema"},
        "tools": {"type": "array", "nullable": True, "items": {
            "type": "object", "required": ["type", "name"], "properties": {
                "type": {"type": "string", "enum": ["function"]}, "name": {"type": "string"},
                "description": {"type": "string"}, "parameters": {"type": "object"}, "strict": {"type": "boolean"}}}},
        "tool_choice": {"nullable": True, "oneOf": [{"type": "string", "enum": ["none", "auto", "required"]}, {
            "type": "object", "required": ["type", "name"], "properties": {
                "type": {"type": "string", "enum": ["function"]}, "name": {"type": "string"}}}]},
        "parallel_tool_calls": {"type": "boolean", "nullable": True},
        "include": {"type": "array", "nullable": True, "items": {
            "type": "string", "enum": ["message.output_text.logprobs"]}},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20, "nullable": True,
                         "description": "with include's message.output_text.logprobs (or alone, when > 0)"},
        "metadata": {"type": "object", "nullable": True},
        "store": {"type": "boolean", "nullable": True,
                  "description": "default true: kept in memory (--responses-store)"},
        "previous_response_id": {"type": "string", "nullable": True, "description": "a stored response to continue"},
    }}

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
              "echo: false, suffix: \"\", ...). "
              "Errors use OpenAI's shape, with param naming the field. Past "
              "--max-inflight requests in flight the answer is 429 with Retry-After; 502 means a worker failed "
              "(in a stream: an error event), 503 that no worker is available.")
    bodies = request_schemas()
    return {
        "openapi": "3.0.3",
        "info": {"title": "pdbox", "version": "0.1.0", "description": f"OpenAI-compatible API serving {model}"},
        "paths": {
            "/v1/chat/completions": {"post": _op("Chat completion", bodies["chat"], limits)},
            "/v1/completions": {"post": _op("Text completion", bodies["completions"], limits)},
            "/v1/responses": {"post": _op("Response (OpenAI's Responses API: text, function tools)", RESPONSES_BODY,
                                          limits + " A /v1/responses body is read as the chat request it "
                                          "amounts to: the chat body's limits apply to its fields.")},
            "/tokenize": {"post": {"summary": "Token ids of a prompt or a chat (vLLM's extension): "
                                              "appliance/serve/tokenize_api.py",
                                   "responses": {"200": {"description": "count, max_model_len, tokens"},
                                                 "400": _ERROR}}},
            "/detokenize": {"post": {"summary": "Text of token ids (vLLM's extension)",
                                     "responses": {"200": {"description": "prompt"}, "400": _ERROR}}},
            "/v1/models": {"get": {"summary": "Served models", "responses": {"200": {"description": "model list"}}}},
            "/v1/models/{model}": {"get": {"summary": "The served model", "responses": {
                "200": {"description": "model"}, "404": _ERROR}}},
            "/v1/responses/{id}": {
                "get": {"summary": "A stored response (the router keeps the last --responses-store, in memory)",
                        "responses": {"200": {"description": "Response object"}, "404": _ERROR}},
                "delete": {"summary": "Forget a stored response",
                           "responses": {"200": {"description": "deleted"}, "404": _ERROR}}},
            "/health": {"get": {"summary": "Health", "responses": {"200": {"description": "ok"},
                                                                    "503": {"description": "degraded"}}}},
        },
    }
