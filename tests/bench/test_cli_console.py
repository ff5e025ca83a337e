"""A bench command's event loop: SIGTERM cancels it and its clean-up runs (launched servers stop)."""

from __future__ import annotations

import asyncio
import os
import signal

import click
import pytest

from bench.cli_console import run_async


def test_sigterm_cancels_the_command_and_runs_its_cleanup() -> None:
    cleaned: list[str] = []

    async def command() -> None:
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.append("server stopped")

    with pytest.raises(click.ClickException, match="SIGTERM"):
        run_async(command())
    assert cleaned == ["server stopped"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone with the loop


def test_a_finished_command_returns_its_value_and_runtime_errors_are_plain_errors() -> None:
    async def ok() -> int:
        return 7

    async def unreachable() -> None:
        raise RuntimeError("cannot reach http://127.0.0.1:1")

    assert run_async(ok()) == 7
    with pytest.raises(click.ClickException, match="cannot reach"):
        run_async(unreachable())
