"""The OpenAPI document the router serves at /openapi.json: what it accepts."""

from __future__ import annotations

from typing import Any

_SAMPLING: dict[str, Any] = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 100},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "seed": {"type": "integer", "minimum": 0},
    "n": {"type": "integer", "minimum": 1, "maximum": 1},
    "stop": {"oneOf": [{"type": "string", "minLength": 1},
                       {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 16}]},
    "stop_token_ids": {"type": "array", "items": {"type": "integer"}, "maxItems": 16},
    "ignore_eos": {"type": "boolean"},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
}

_ERROR = {"description": "OpenAI-style error", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": "integer"}}}}}}}}


def _op(summary: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"summary": summary, "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {"200": {"description": "completion (JSON, or SSE when stream is true)"},
                          **{str(c): _ERROR for c in (400, 401, 404, 413, 429, 503)}}}


def openapi_document(model: str) -> dict[str, Any]:
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"type": "string", "enum": ["system", "user", "assistant", "tool", "developer"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object", "properties": {
            "type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}, "required": ["type", "text"]}}]},
    }}
    chat = {"type": "object", "required": ["messages"], "properties": {
        **_SAMPLING, "messages": {"type": "array", "minItems": 1, "items": message},
        "logprobs": {"type": "boolean"}, "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20}}}
    comp = {"type": "object", "required": ["prompt"], "properties": {
        **_SAMPLING, "prompt": {"oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}]},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 20}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "pdbox", "version": "0.1.0", "description": f"OpenAI-compatible API serving {model}"},
        "paths": {
            "/v1/chat/completions": {"post": _op("Chat completion", chat)},
            "/v1/completions": {"post": _op("Text completion", comp)},
            "/v1/models": {"get": {"summary": "Served models", "responses": {"200": {"description": "model list"}}}},
            "/health": {"get": {"summary": "Health", "responses": {"200": {"description": "ok"},
                                                                    "503": {"description": "degraded"}}}},
        },
    }
