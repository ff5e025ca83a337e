"""The adaptive-mode settings are stated once, as `AutoConfig`'s flagged fields: `pdbox up` has an option
per field with the field's default and hands them to the launcher as one `AutoConfig`; bad values are
refused with the option's name. The tests go over every flagged field, so a new one is covered too."""

from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

from appliance import launcher
from appliance.cli import main
from appliance.engine_flags import field_option, flagged_fields
from appliance.launcher import UpConfig
from appliance.serve.router_config import AutoConfig


class Stop(Exception):
    """Raised instead of starting the appliance: the test has the UpConfig it wanted."""


def up(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[click.testing.Result, list[UpConfig]]:
    """`pdbox up ARGS` with the launcher replaced: the result, and the UpConfig it got (if any)."""
    seen: list[UpConfig] = []

    def capture(cfg: UpConfig) -> None:
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(launcher, "Launcher", capture)
    return CliRunner().invoke(main, ["up", *args]), seen


def test_every_flagged_field_is_a_pdbox_up_option_with_its_default() -> None:
    fields = flagged_fields(AutoConfig)
    assert {"slo_ttft_ms", "slo_tpot_ms", "rebalance_idle_s", "move"} <= set(fields)
    assert "initial_prefill" not in fields  # the launcher's plan, not an option
    params = {p.name: p for p in main.commands["up"].params if isinstance(p, click.Option)}
    for name, f in fields.items():
        assert name in params, name
        assert field_option(f) in params[name].opts, (name, params[name].opts)
        assert params[name].default == f.default, name
        assert params[name].help == f.metadata["flag"].help, name
    assert field_option(fields["move"]) == "--move-decodes"
    assert params["move"].secondary_opts == ["--no-move-decodes"]


def test_the_options_reach_the_launcher_as_one_auto_config(monkeypatch: pytest.MonkeyPatch) -> None:
    _, [default] = up(monkeypatch)
    assert default.auto == AutoConfig()
    changed = {name: (not f.default) if isinstance(f.default, bool) else f.default * 2 + 1
               for name, f in flagged_fields(AutoConfig).items()}
    args: list[str] = []
    for name, value in changed.items():
        opt = field_option(flagged_fields(AutoConfig)[name])
        args += ([opt] if value else [f"--no-{opt[2:]}"]) if isinstance(value, bool) else [opt, str(value)]
    result, [cfg] = up(monkeypatch, "--mode", "auto", *args)
    assert isinstance(result.exception, Stop), result.output
    assert cfg.auto == dataclasses.replace(AutoConfig(), **changed)


@pytest.mark.parametrize("bad", ["0", "-5"])
def test_rebalance_idle_must_be_positive(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    with pytest.raises(ValueError, match="--rebalance-idle-s"):
        AutoConfig(rebalance_idle_s=float(bad))
    result, seen = up(monkeypatch, "--mode", "auto", "--rebalance-idle-s", bad)
    assert result.exit_code == 1 and not seen
    assert "error: --rebalance-idle-s must be > 0" in result.output


def test_negative_slo_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="--slo-tpot-ms must be >= 0 .* got -1"):
        AutoConfig(slo_tpot_ms=-1)
    result, seen = up(monkeypatch, "--mode", "auto", "--slo-ttft-ms", "-250")
    assert result.exit_code == 1 and not seen
    assert "error: --slo-ttft-ms must be >= 0 (0: derived), got -250" in result.output
