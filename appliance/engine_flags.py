"""The engine's command-line flags, derived from `EngineConfig`'s fields made with `appliance.config.flag`.

One declaration (the field: its default, help, choices) gives:

- the click options of every command that starts or configures engines (`engine_options`: `pdbox up`,
  `pdbox generate`, the worker's own command, `pdbox slurm up/script`), collected into one `EngineFlags`;
- the worker's argv for those flags (`engine_argv`);
- the worker's `EngineConfig` from them plus the per-worker values (`engine_config`).

So a new engine flag is a new `flag(...)` field in `EngineConfig` and its use in the engine.
`config_options` does the same for another config's flagged fields (`pdbox up`'s `RouterConfig` and
`AutoConfig` options).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import Field, fields
from types import MappingProxyType
from typing import Any

import click

from appliance.config import EngineConfig, Flag

AUTO = "auto"  # a command-line value some flags take: decided per worker (`engine_config`)


@functools.cache
def flagged_fields(config: type = EngineConfig) -> Mapping[str, Field]:
    """The fields of a config dataclass (EngineConfig's by default) that are command-line flags, by field
    name, in declaration order."""
    return MappingProxyType({f.name: f for f in fields(config) if "flag" in f.metadata})


def _flag(f: Field) -> Flag:
    return f.metadata["flag"]


def _default(f: Field) -> Any:
    return f.default if _flag(f).cli_default is None else _flag(f).cli_default


def cli_default(name: str) -> Any:
    """The command line's default of the engine flag `name`: its `Flag.cli_default`, else the field's."""
    return _default(flagged_fields()[name])


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_option(f: Field) -> str:
    """A flagged field's option: ``--field-name``, or the ``option`` its metadata names (`AutoConfig.move`
    is ``--move-decodes``)."""
    return f.metadata.get("option") or option_name(f.name)


class EngineFlags(Mapping[str, Any]):
    """The values of every engine flag a command line took (the ones not given keep their command-line
    default), by `EngineConfig` field name. Read-only; `replace` makes a changed copy."""

    __slots__ = ("_values",)

    def __init__(self, **values: Any) -> None:
        known = flagged_fields()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise TypeError(f"not an engine flag: {', '.join(unknown)} (the flags: {', '.join(known)})")
        self._values = MappingProxyType({n: values[n] if n in values else cli_default(n) for n in known})

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        changed = ", ".join(f"{n}={v!r}" for n, v in self._values.items() if v != cli_default(n))
        return f"EngineFlags({changed})"

    def replace(self, **values: Any) -> EngineFlags:
        return EngineFlags(**{**self._values, **values})


def _click_option(f: Field) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    meta, default, opt = _flag(f), _default(f), field_option(f)
    if isinstance(default, bool):
        return click.option(f"{opt}/--no-{opt[2:]}", f.name, default=default, show_default=True, help=meta.help)
    kind: Any = click.Choice(meta.choices) if meta.choices else type(default)
    return click.option(opt, f.name, default=default, show_default=bool(default) or default == 0, type=kind,
                        envvar=meta.envvar, help=meta.help)


def config_options(config: type,
                   names: tuple[str, ...] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator for a click command: an option per flagged field in `names` (None: all, in declaration
    order) of the config dataclass `config`, handed to the command under the field's name (`pdbox up`'s
    `RouterConfig` and `AutoConfig` options)."""
    known = flagged_fields(config)
    names = tuple(known) if names is None else names

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for name in reversed(names):
            command = _click_option(known[name])(command)
        return command

    return decorate


def engine_options(only: tuple[str, ...] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator for a click command: adds an option per engine flag (or those in `only`) and hands the
    command one ``engine: EngineFlags`` argument instead of one argument per flag."""
    names = tuple(flagged_fields()) if only is None else only

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def with_engine(*args: Any, **kw: Any) -> Any:
            engine = EngineFlags(**{n: kw.pop(n) for n in names})
            return command(*args, engine=engine, **kw)

        for name in reversed(names):
            with_engine = _click_option(flagged_fields()[name])(with_engine)
        return with_engine

    return decorate


def engine_argv(engine: Mapping[str, Any]) -> list[str]:
    """The worker's argv for every engine flag (`engine_options` reads it back into the same values)."""
    argv: list[str] = []
    for name, value in EngineFlags(**engine).items():
        opt = option_name(name)
        argv += ([opt] if value else [f"--no-{opt[2:]}"]) if isinstance(value, bool) else [opt, str(value)]
    return argv


def engine_config(engine: Mapping[str, Any], role: str = "unified", **per_worker: Any) -> EngineConfig:
    """The `EngineConfig` of a worker in `role` from the engine flags and its own values (device,
    tp_size, threads). ``prefill_order`` auto: slack on prefill and auto workers (they hold the queue
    that TTFT depends on), fifo elsewhere. ``dtype`` auto resolves in `EngineConfig` by device."""
    values = dict(EngineFlags(**engine))
    if values["prefill_order"] == AUTO:
        values["prefill_order"] = "slack" if role in ("prefill", "auto") else "fifo"
    return EngineConfig(**values, **per_worker)
