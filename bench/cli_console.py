"""How a `pdbox bench` command talks to its user: usage errors, its event loop, one progress bar."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.client import RequestOutcome

T = TypeVar("T")


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad values surface as ValueError with an actionable sentence; show it as a usage error."""
    try:
        yield
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; a server that cannot be reached or fails warm-up is a plain error."""
    try:
        return asyncio.run(coro)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        console=console,
    )


class Tracker:
    """Feeds finished requests into one rich progress task, re-labelled per phase."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("starting", total=None, failed=0)
        self.failed = 0

    def phase(self, description: str, total: int) -> None:
        self.failed = 0
        self.progress.reset(self.task, description=description, total=total, failed=0)

    def done(self, outcome: RequestOutcome) -> None:
        self.failed += not outcome.success
        self.progress.update(self.task, advance=1, failed=self.failed)
