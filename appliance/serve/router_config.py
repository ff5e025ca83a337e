"""The router's settings: `RouterConfig` (every mode) and `AutoConfig` (``--mode auto`` only).

The ``*_s`` fields of `RouterConfig` are the router's deadlines (see :mod:`appliance.serve.router`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.config import DEFAULT_PAGE_SIZE, Flag, flag
from appliance.model.generation import GenerationDefaults

PREFILL_POLICIES = ("cache_aware", "least_load", "power_of_two", "round_robin")  # appliance.serve.policies
DECODE_POLICIES = ("least_load", "power_of_two", "round_robin")
REJECT_FACTOR = 2.0  # --mode auto: a prompt whose predicted TTFT is beyond this many times --slo-ttft-ms gets a 429


@dataclass(frozen=True)
class RouterConfig:
    """Router settings. The ``*_s`` fields are the deadlines listed in `appliance.serve.router`'s docstring.
    The fields made with `flag` are `pdbox up`'s router options (`appliance.engine_flags.config_options`)."""

    mode: str = "disagg"
    served_model_name: str = flag("model", "Model id clients send (default: the model's name).", cli_default="")
    host: str = flag("127.0.0.1", "Address the OpenAI endpoint binds.")
    port: int = flag(8000, "Port of the OpenAI endpoint.")
    api_key: str = flag("", "Require Authorization: Bearer KEY.", envvar="PDBOX_API_KEY")
    cluster_token: str = ""
    prefill_policy: str = flag("cache_aware", "How the router picks a prefill engine.", choices=PREFILL_POLICIES)
    decode_policy: str = flag("least_load", "How the router picks a decode engine.", choices=DECODE_POLICIES)
    unified_policy: str = "cache_aware"
    max_inflight: int = flag(256, "Requests in flight before 429.")
    responses_store: int = flag(256, "/v1/responses answers kept in memory for previous_response_id and GET "
                                     "/v1/responses/ID (0: none; store true is then refused).")
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 5.0
    lease_s: float = flag(5.0, "Base lease of reserved decode pages.")
    lease_per_token_s: float = 0.05
    max_body_bytes: int = 4 * 1024 * 1024
    page_size: int = DEFAULT_PAGE_SIZE  # the engines' (pdbox up passes its --page-size)
    health_interval_s: float = 1.0
    unhealthy_after_s: float = 3.0
    probe_timeout_s: float = 1.0
    stream_idle_s: float = 60.0
    client_stall_s: float = 30.0
    kv_wait_s: float = 30.0  # how long a prompt may wait for a full decode engine's KV pages before a 503
    generation: GenerationDefaults = GenerationDefaults()  # the checkpoint's sampling defaults (unset fields)

    def __post_init__(self) -> None:
        if self.mode not in ("disagg", "unified", "auto"):
            raise ValueError(f"mode must be disagg, unified or auto, got {self.mode!r}")
        if self.kv_wait_s < 0:
            raise ValueError(f"kv_wait_s must be >= 0, got {self.kv_wait_s}")
        if self.responses_store < 0:
            raise ValueError(f"--responses-store must be >= 0, got {self.responses_store}")


@dataclass(frozen=True)
class AutoConfig:
    """``slo_tpot_ms``/``slo_ttft_ms`` 0 = derived from the calibration (1.5 x step; TTFT relative to the
    prompt's own prefill, and no admission control). ``rebalance_idle_s``: how long the handed-over
    prefill demand must stay low before a prefill-leaning engine turns to decode.
    The fields made with `flag` are `pdbox up`'s auto-mode options (`appliance.engine_flags.config_options`),
    each ``--field-name`` unless its metadata names the ``option``; a new one needs no change elsewhere."""

    initial_prefill: tuple[str, ...] = ()  # the engines that start prefill-leaning (the launcher's plan)
    slo_ttft_ms: float = flag(0.0, "auto mode: answer 429 at once when the predicted TTFT is beyond "
                                   f"{REJECT_FACTOR:g}x this SLO (0: off).")
    slo_tpot_ms: float = flag(0.0, "auto mode: TPOT SLO for decisions (0: 1.5x the measured step).")
    reject_factor: float = REJECT_FACTOR
    rebalance: bool = True
    rebalance_idle_s: float = flag(20.0, "auto mode: seconds of low handed-over prefill demand before a prefill "
                                         "engine turns to decode.")
    move: bool = field(default=True, metadata={
        "option": "--move-decodes",
        "flag": Flag("auto mode: an engine turning prefill moves its decodes, KV and all, to another engine "
                     "(else they finish where they are first)."),
    })

    def __post_init__(self) -> None:
        for option, value in (("--slo-tpot-ms", self.slo_tpot_ms), ("--slo-ttft-ms", self.slo_ttft_ms)):
            if value < 0:
                raise ValueError(f"{option} must be >= 0 (0: derived), got {value:g}")
        if self.rebalance_idle_s <= 0:
            raise ValueError(f"--rebalance-idle-s must be > 0, got {self.rebalance_idle_s}")
