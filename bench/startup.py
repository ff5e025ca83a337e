"""How long ``pdbox up`` takes to serve: ``python -m bench.startup [--runs 3] [-- UP ARGS...]``.

Each run starts ``pdbox up --port P --no-monitor UP_ARGS`` (a free port; the embedded model unless the
args name one), times the wall seconds until ``GET /v1/models`` answers 200, then stops it (SIGINT, then
SIGKILL after ``--stop-timeout-s``) and waits for its workers to go. The figure is what a user waits
after ``make run`` before the first request can be sent: every worker loaded, calibrated and
registered with the router.
"""

from __future__ import annotations

import json
import statistics

import click

from appliance.cli_support import HELP_OPTIONS, run_command
from bench.up_process import running_up


def ready_s(up_args: tuple[str, ...], timeout_s: float, stop_timeout_s: float) -> float:
    """Seconds from launching ``pdbox up`` until its router lists the model; raises when it exits first or
    is not ready within ``timeout_s``."""
    with running_up(up_args, timeout_s, stop_timeout_s) as up:
        return up.ready_s


@click.command(context_settings=HELP_OPTIONS)
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True, help="start-ups timed, one at a time")
@click.option("--timeout-s", type=click.FloatRange(1), default=300.0, show_default=True,
              help="a start-up that takes longer fails the bench")
@click.option("--stop-timeout-s", type=click.FloatRange(1), default=30.0, show_default=True,
              help="after SIGINT, SIGKILL once this has passed")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object only")
@click.argument("up_args", nargs=-1, type=click.UNPROCESSED)
def command(runs: int, timeout_s: float, stop_timeout_s: float, as_json: bool, up_args: tuple[str, ...]) -> None:
    if any(a == "--port" or a.startswith("--port=") for a in up_args):
        raise click.BadParameter("the bench picks the port itself; leave --port out", param_hint="UP_ARGS")
    times = [ready_s(up_args, timeout_s, stop_timeout_s) for _ in range(runs)]
    result = {"up_args": list(up_args), "runs": [round(t, 2) for t in times],
              "ready_s_median": round(statistics.median(times), 2)}
    if as_json:
        print(json.dumps(result))
        return
    print(f"{' '.join(('pdbox up', *up_args))}: serving after {result['ready_s_median']} s (median of {runs}: "
          f"{', '.join(str(t) for t in result['runs'])})")


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.startup ARGS``; returns the exit status (2: a bad option)."""
    return run_command(command, argv, "python -m bench.startup")


if __name__ == "__main__":
    raise SystemExit(main())
