"""`pdbox monitor`: the live dashboard of a running appliance (imports rich and aiohttp lazily)."""

from __future__ import annotations

import click


@click.command()
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="The router's base URL.")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts and tests).")
@click.option("--api-key", default="", envvar="PDBOX_API_KEY", help="Bearer key if the router requires one.")
def monitor(url: str, interval: float, once: bool, api_key: str) -> None:
    """Show workers, latency percentiles and KV transfer throughput of a running appliance, live.

    Reads the router's /metrics and /workers. On a terminal the view refreshes in place (Ctrl-C
    quits); without one, frames are printed one after another as plain text.
    """
    import asyncio

    from appliance.cli_support import CliError
    from appliance.monitor import live
    from appliance.monitor.snapshot import MonitorError

    try:
        if once:
            asyncio.run(live.once(url, api_key))
        else:
            asyncio.run(live.watch(url, interval, api_key))
    except MonitorError as exc:
        raise CliError(str(exc)) from None
    except KeyboardInterrupt:
        pass
