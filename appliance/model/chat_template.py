"""Chat templates rendered as transformers renders them (``apply_chat_template``).

Same sandbox and options (trim_blocks, lstrip_blocks, loop controls), the same helpers real templates
call (``raise_exception``, ``strftime_now``, a ``tojson`` that does not HTML-escape), the same variables
(``messages``, ``tools``, ``add_generation_prompt``, ``bos_token``, ``eos_token`` and any extra ones),
and transformers' ``{% generation %}`` block, rendered as its plain body.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplateError(ValueError):
    """The template rejected the conversation (its ``raise_exception``) or failed to render."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template error: {message}")


def _generation_extension() -> type:
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        """``{% generation %}…{% endgeneration %}``: transformers marks assistant text with it."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    return GenerationBlock


class ChatTemplate:
    """One compiled template and the special tokens it may print."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols", _generation_extension()])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template does not compile: {exc}") from exc
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
               tools: Sequence[dict[str, Any]] | None = None, **extra: Any) -> str:
        from jinja2 import TemplateError

        try:
            return str(self._template.render(
                messages=list(messages), tools=None if tools is None else list(tools),
                add_generation_prompt=add_generation_prompt, bos_token=self.bos_token, eos_token=self.eos_token,
                **extra,
            ))
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template error: {exc}") from exc
