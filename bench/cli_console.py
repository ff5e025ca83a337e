"""How a `pdbox bench` command talks to its user: usage errors, its event loop, one progress bar."""

from __future__ import annotations

import asyncio
import signal
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
    """Run a command's coroutine; a server that cannot be reached or fails warm-up is a plain error.
    SIGTERM cancels it like Ctrl-C does, so the servers a command launched are stopped on the way out."""
    try:
        return asyncio.run(_cancel_on_sigterm(coro))
    except asyncio.CancelledError:
        raise click.ClickException("stopped by SIGTERM") from None
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc


async def _cancel_on_sigterm(coro: Coroutine[Any, Any, T]) -> T:
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
        return await task
    try:
        return await task
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


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
