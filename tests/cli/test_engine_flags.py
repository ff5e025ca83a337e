"""Each engine flag is declared once, as an `EngineConfig` field made with `flag(...)`; `pdbox up`, the
worker, `pdbox slurm` and the argv between them all come from it (`appliance.engine_flags`). These
tests go over every such field, so a new one is covered without a change here."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from click.testing import CliRunner

from appliance import launcher
from appliance.cli import main
from appliance.config import EngineConfig
from appliance.engine_flags import EngineFlags, cli_default, engine_argv, flagged_fields, option_name
from appliance.launcher import UpConfig, plan_workers
from appliance.serve.worker_config import worker_command, worker_config


def changed(name: str) -> Any:
    """A valid value of the flag `name` other than its command-line default."""
    f, default = flagged_fields()[name], cli_default(name)
    if isinstance(default, bool):
        return not default
    if f.metadata["flag"].choices:
        return next(c for c in reversed(f.metadata["flag"].choices) if c not in (default, "auto"))
    return default * 2 if default else 8


def all_changed() -> EngineFlags:
    return EngineFlags(**{name: changed(name) for name in flagged_fields()})


class Stop(Exception):
    """Raised instead of starting the appliance: the test has the UpConfig it wanted."""


def up_config(monkeypatch, args: list[str]) -> UpConfig:
    """The UpConfig `pdbox up ARGS` builds (nothing starts)."""
    seen: list[UpConfig] = []

    def capture(cfg: UpConfig) -> None:
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(launcher, "Launcher", capture)
    result = CliRunner().invoke(main, ["up", *args])
    assert isinstance(result.exception, Stop), result.output
    return seen[0]


def help_text(command, args: list[str]) -> str:
    result = CliRunner().invoke(command, [*args, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def test_the_flags_are_the_flagged_fields_of_engine_config() -> None:
    names = set(flagged_fields())
    assert {"dtype", "page_size", "kv_cache_mb", "max_prefill_tokens", "prefill_order", "cuda_graphs"} <= names
    assert names <= {f.name for f in dataclasses.fields(EngineConfig)}
    assert not names & {"device", "tp_size", "threads"}  # per worker: the launcher decides them


@pytest.mark.parametrize("where", [[], ["up"], ["slurm", "up"], ["slurm", "script"]])
def test_every_flag_is_on_every_command_that_starts_engines(where: list[str]) -> None:
    text = help_text(worker_command, []) if not where else help_text(main, where)
    for name in flagged_fields():
        assert option_name(name) in text, (where, name)


def test_the_argv_reads_back_into_the_same_engine_config() -> None:
    flags = all_changed()
    cfg = worker_config(["--role", "unified", *engine_argv(flags)])[0].engine
    for name, value in flags.items():
        assert getattr(cfg, name) == value, name
    default = worker_config(["--role", "unified", *engine_argv(EngineFlags())])[0].engine
    assert default == worker_config(["--role", "unified"])[0].engine


def test_pdbox_up_hands_every_flag_to_every_worker(monkeypatch, tmp_path) -> None:
    flags = all_changed()
    assert up_config(monkeypatch, ["--mode", "disagg", *engine_argv(flags)]).engine == flags
    specs, _ = plan_workers(UpConfig(mode="disagg", monitor=False, engine=flags), token="t", run_id="r",
                            run_dir=tmp_path)
    assert len(specs) == 2
    for spec in specs:
        cfg = worker_config(spec.argv[3:])[0].engine
        assert all(getattr(cfg, name) == value for name, value in flags.items()), spec.argv


def test_slurm_workers_get_every_flag() -> None:
    from slurm.commands import worker_argv
    from slurm.task import expand_argv

    flags = all_changed()
    argv = expand_argv(worker_argv("prefill", "", "http://r:1", cpu=True, engine=flags, python="py"),
                       {"PDBOX_NODE": "n", "PDBOX_JOB_ID": "1", "PDBOX_RANK": "0"})
    cfg = worker_config(argv[3:])[0].engine
    assert all(getattr(cfg, name) == value for name, value in flags.items())


def test_prefill_order_auto_is_slack_where_prompts_queue() -> None:
    order = {role: worker_config(["--role", role])[0].engine.prefill_order
             for role in ("prefill", "auto", "decode", "unified")}
    assert order == {"prefill": "slack", "auto": "slack", "decode": "fifo", "unified": "fifo"}


def test_engine_flags_refuse_a_name_that_is_not_a_flag() -> None:
    with pytest.raises(TypeError, match="not an engine flag: device"):
        EngineFlags(device="cuda")
    assert EngineFlags(page_size=32).replace(page_size=64)["page_size"] == 64


def test_the_worker_command_line_exits_like_one(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        worker_config(["--role", "nope"])
    assert done.value.code == 2 and "--role" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        worker_config(["--help"])
    assert done.value.code == 0 and "--page-size" in capsys.readouterr().out


def test_pdbox_up_router_options_come_from_router_config(monkeypatch) -> None:
    from appliance.serve.router_config import RouterConfig

    router = flagged_fields(RouterConfig)
    text = help_text(main, ["up"])
    assert all(option_name(name) in text for name in router)
    up = UpConfig()
    assert all(getattr(up, name) == f.default for name, f in router.items() if name != "served_model_name")
    monkeypatch.setenv("PDBOX_API_KEY", "from-env")
    got = up_config(monkeypatch, ["--port", "9123", "--decode-policy", "round_robin", "--lease-s", "2.5"])
    assert (got.port, got.decode_policy, got.lease_s, got.api_key) == (9123, "round_robin", 2.5, "from-env")


def test_pdbox_up_shares_cores_unless_told_not_to(monkeypatch) -> None:
    assert up_config(monkeypatch, ["--mode", "unified"]).share_cores is True
    assert up_config(monkeypatch, ["--mode", "unified", "--no-share-cores"]).share_cores is False
