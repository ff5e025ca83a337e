"""What the `pdbox` command line is built from: a one-line error, and a group whose subcommand groups
(bench, monitor, slurm) are imported only when one of them runs (`pdbox up` never loads them)."""

from __future__ import annotations

import importlib

import click


class CliError(click.ClickException):
    """A one-line error for the user; no traceback."""

    def show(self, file=None) -> None:  # type: ignore[override]
        click.echo(f"error: {self.format_message()}", err=True)


class LazyGroup(click.Group):
    """A click group with some subcommands named as ``"module:attribute"``, imported on first use."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, attr = self.lazy[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}  # context_settings: -h as well, as argparse had


def run_command(command: click.Command, argv: list[str] | None, prog_name: str | None = None) -> int:
    """Run a click command as ``python -m ...`` would (``argv`` None: sys.argv) but return its exit status
    instead of exiting: the command's own int return value (0 for anything else), 0 after --help, and
    2 after a bad option, which click's usage error explains on stderr (as argparse did). ``prog_name``
    None: the script's file name."""
    try:
        rv = command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        return 1
    return rv if isinstance(rv, int) else 0
