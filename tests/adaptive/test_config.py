"""Bad adaptive-mode settings are refused with the option's name."""

from __future__ import annotations

import pytest

from appliance.launcher import UpConfig
from appliance.serve.router_config import AutoConfig


@pytest.mark.parametrize("bad", [0.0, -5.0])
def test_rebalance_idle_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="--rebalance-idle-s"):
        UpConfig(mode="auto", rebalance_idle_s=bad)
    with pytest.raises(ValueError, match="--rebalance-idle-s"):
        AutoConfig(rebalance_idle_s=bad)


def test_negative_slo_is_refused() -> None:
    with pytest.raises(ValueError, match="--slo-tpot-ms must be >= 0 .* got -1"):
        AutoConfig(slo_tpot_ms=-1)
    with pytest.raises(ValueError, match="--slo-ttft-ms must be >= 0 .* got -250"):
        UpConfig(mode="auto", slo_ttft_ms=-250)
