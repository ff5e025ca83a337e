"""The refresh loop: rich ``Live`` on a TTY, plain frames otherwise, one frame with ``--once``.

``Foreground`` is what ``pdbox up`` shows on a TTY: a progress display while the workers load
their model, then the dashboard. The launcher's own lines (``ready: …`` on stdout, messages on
stderr) are printed through the same console, above the live region, so they stay readable.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, TextIO

from rich.console import Console, RenderableType

from appliance.monitor.snapshot import Monitor, MonitorError, fetch_snapshot
from appliance.monitor.view import render, render_problem


async def _next_renderable(session: Any, mon: Monitor, api_key: str) -> RenderableType:
    try:
        return render(mon.update(await fetch_snapshot(session, mon.url, api_key)))
    except MonitorError as exc:
        frame = mon.failed(str(exc))
        return render(frame) if frame is not None else render_problem(mon.url, str(exc))


async def once(url: str, api_key: str = "", console: Console | None = None) -> None:
    """Print one frame. Raises ``MonitorError`` when the router cannot be scraped."""
    import aiohttp

    console = console or Console()
    async with aiohttp.ClientSession() as session:
        snap = await fetch_snapshot(session, url, api_key)
    console.print(render(Monitor(url).update(snap)))


async def watch(url: str, interval_s: float = 1.0, api_key: str = "", console: Console | None = None,
                redirect: bool = True) -> None:
    """Refresh until cancelled: in place on a terminal, one frame after another otherwise."""
    import aiohttp
    from rich.live import Live

    console = console or Console()
    mon = Monitor(url)
    async with aiohttp.ClientSession() as session:
        if not console.is_terminal:
            while True:
                t0 = time.monotonic()
                console.print(await _next_renderable(session, mon, api_key))
                console.print()
                await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - t0)))
        with Live(console=console, auto_refresh=False, redirect_stdout=redirect, redirect_stderr=redirect,
                  vertical_overflow="crop") as live:
            while True:
                t0 = time.monotonic()
                live.update(await _next_renderable(session, mon, api_key), refresh=True)
                await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - t0)))


class _ConsoleLines:
    """A text stream that prints each complete line through a rich console (above a live region)."""

    def __init__(self, console: Console, style: str = "") -> None:
        self.console, self.style, self.buf = console, style, ""

    def write(self, s: str) -> int:
        self.buf += s
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            self.console.print(line, style=self.style, markup=False, highlight=False, soft_wrap=True)
        return len(s)

    def flush(self) -> None:
        self.console.file.flush()

    def isatty(self) -> bool:
        return True


class Foreground:
    """Start-up progress, then the dashboard, for ``pdbox up`` on a TTY.

    Owns ``launcher.out``/``launcher.err`` between ``start`` and ``close`` (restored after).
    """

    def __init__(self, launcher: Any) -> None:
        self.launcher = launcher
        self.console = Console(file=launcher.out)
        self._streams: tuple[TextIO, TextIO] = (launcher.out, launcher.err)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Show a spinner per worker while it loads; route the launcher's lines through the console."""
        self.launcher.out = _ConsoleLines(self.console)
        self.launcher.err = _ConsoleLines(self.console, style="yellow")
        self._task = asyncio.create_task(self._startup())

    def ready(self) -> None:
        """The router serves: replace the progress display with the dashboard."""
        if self._task is not None:
            self._task.cancel()
        cfg = self.launcher.cfg
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
        self._task = asyncio.create_task(watch(f"http://{host}:{cfg.port}", 1.0, cfg.api_key, self.console))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # the display must never mask a shutdown
                pass
        self.launcher.out, self.launcher.err = self._streams

    async def _startup(self) -> None:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        specs = list(self.launcher.specs)
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=12),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True, redirect_stdout=False,
                      redirect_stderr=False) as progress:
            tasks = {s.name: progress.add_task(f"{s.name} [{s.devices}]", total=1, status="loading model")
                     for s in specs}
            router = None
            while True:
                for s in specs:
                    status, done = _worker_status(s)
                    progress.update(tasks[s.name], status=status, completed=1 if done else 0)
                if router is None and all(_worker_status(s)[1] for s in specs):
                    router = progress.add_task("router", total=1, status="loading tokenizer")
                await asyncio.sleep(0.25)


def _worker_status(spec: Any) -> tuple[str, bool]:
    if spec.proc is not None and spec.proc.poll() is not None:
        return f"exited ({spec.proc.returncode})", False
    try:
        with open(spec.log_path, "rb") as f:
            text = f.read()[-4096:].decode(errors="replace")
    except (OSError, TypeError):
        return "starting", False
    if "worker ready:" in text:
        return "ready", True
    return "loading model", False
