"""The options `pdbox bench` commands share, each set packed into one frozen dataclass."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import click

from bench.arrivals import ArrivalProcess
from bench.client import ClientConfig, Endpoint, first_model_id
from bench.metrics import AbsoluteSLO, IsolatedBaseline, RelativeSLO
from bench.workloads import WORKLOADS, PromptBuilder, RequestSource, TextCodec, load_codec


@dataclass(frozen=True)
class BenchContext:
    """What the commands take from outside: how to load a tokenizer (tests pass a stand-in)."""

    load_codec: Callable[[str | None], TextCodec] = load_codec


def bench_context() -> BenchContext:
    found = click.get_current_context().find_object(BenchContext)
    return found if found is not None else BenchContext()


@dataclass(frozen=True)
class LoadOptions:
    """The options every command shares: what to send, how, and where results go."""

    workload: str
    dataset: Path | None
    num_requests: int
    seed: int
    shared_prefix: int
    tokenizer_path: str | None
    endpoint: str
    arrival: str
    timeout_s: float
    warmup: int
    api_key: str | None
    out_dir: Path

    @property
    def source(self) -> RequestSource:
        return RequestSource(self.workload, self.num_requests, self.dataset)

    @property
    def process(self) -> ArrivalProcess:
        return cast(ArrivalProcess, self.arrival)

    def builder(self) -> PromptBuilder:
        return PromptBuilder(bench_context().load_codec(self.tokenizer_path), shared_prefix_len=self.shared_prefix)

    async def client(self, url: str, model: str | None) -> ClientConfig:
        model = model or await first_model_id(url, api_key=self.api_key)
        return ClientConfig(url, model, cast(Endpoint, self.endpoint), self.timeout_s, self.api_key)


@dataclass(frozen=True)
class SLOOptions:
    """The SLO options: absolute limits when either is given, else the relative scales."""

    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    k_ttft: float
    k_tpot: float

    def absolute(self) -> AbsoluteSLO | None:
        if self.slo_ttft_ms is None and self.slo_tpot_ms is None:
            return None
        unset = lambda ms: math.inf if ms is None else ms
        return AbsoluteSLO(unset(self.slo_ttft_ms), unset(self.slo_tpot_ms))

    def relative(self, baseline: IsolatedBaseline) -> RelativeSLO:
        return RelativeSLO(baseline, self.k_ttft, self.k_tpot)


_LOAD_OPTIONS = [
    click.option("--dataset", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="ShareGPT-format JSON file; replaces --workload."),
    click.option("--num-requests", type=int, default=100, show_default=True, help="Requests per run (per rate)."),
    click.option("--seed", type=int, default=0, show_default=True),
    click.option("--shared-prefix", type=int, default=0, show_default=True,
                 help="Prepend one common system-prompt-like block of N tokens to every prompt."),
    click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True, dir_okay=False),
                 help="GGUF whose tokenizer measures lengths [default: pdbox's embedded model]."),
    click.option("--endpoint", type=click.Choice(["chat", "completions"]), default="chat", show_default=True),
    click.option("--arrival", type=click.Choice(["poisson", "constant"]), default="poisson", show_default=True),
    click.option("--timeout-s", type=float, default=600.0, show_default=True, help="Per-request timeout."),
    click.option("--warmup", type=int, default=2, show_default=True, help="Untimed warm-up requests."),
    click.option("--api-key", envvar="OPENAI_API_KEY", help="Bearer token [env: OPENAI_API_KEY]."),
    click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True),
]

_SLO_OPTIONS = [
    click.option("--slo-ttft-ms", type=float, help="Absolute TTFT SLO (ms)."),
    click.option("--slo-tpot-ms", type=float, help="Absolute TPOT SLO (ms)."),
    click.option("--k-ttft", type=float, default=4.0, show_default=True,
                 help="Relative SLO: TTFT <= k x isolated TTFT + 0.5 s."),
    click.option("--k-tpot", type=float, default=1.5, show_default=True,
                 help="Relative SLO: TPOT <= k x isolated TPOT of the prompt's length bucket."),
]


def _packed(cls: type, options: list[Callable[..., Any]], name: str) -> Callable[[Callable[..., Any]], Any]:
    """Add `options` to a command and hand their values to it as one `cls` instance named `name`."""
    fields = [f.name for f in dataclasses.fields(cls)]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            packed = cls(**{f: kwargs.pop(f) for f in fields})
            return command(**kwargs, **{name: packed})

        return functools.reduce(lambda acc, option: option(acc), reversed(options), wrapper)

    return decorate


def load_options(default_workload: str) -> Callable[[Callable[..., Any]], Any]:
    """The shared options, packed into `load: LoadOptions`; `--workload` defaults per command."""
    workload = click.option(
        "--workload",
        type=click.Choice(sorted(WORKLOADS)),
        default=default_workload,
        show_default=True,
        help="Synthetic workload (length ranges: bench/workloads.py).",
    )
    return _packed(LoadOptions, [workload, *_LOAD_OPTIONS], "load")


slo_options = _packed(SLOOptions, _SLO_OPTIONS, "slo_opts")
url_option = click.option("--url", required=True, help="Server root, e.g. http://127.0.0.1:8000.")
model_option = click.option("--model", help="Model name [default: the first id of GET /v1/models].")
rates_option = click.option("--rates", default="0.5,1,2,4", show_default=True, help="Offered rates (req/s), a,b,c.")
isolated_option = click.option("--isolated-per-bucket", type=int, default=3, show_default=True,
                               help="Isolated requests per prompt-length bucket (relative SLO baseline).")


def read_baseline(path: Path) -> IsolatedBaseline:
    return IsolatedBaseline.from_dict(json.loads(path.read_text())["baseline"])
