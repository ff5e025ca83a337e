"""`pdbox bench peer`: the same fixed workloads against another OpenAI-compatible server and against pdbox.

The workloads (bench/peer_workloads.py) are driven the way `vllm bench serve --backend openai-chat
--dataset-name random --random-range-ratio 0 --ignore-eos` drives them: streamed chat completions of
fixed lengths whose prompts are random token ids decoded to text (bench/random_prompts.py). Both servers
get the very same prompts and arrival times. Both are probed first (a dead one fails before anything
runs); then the peer runs every workload, then pdbox does, each after the same untimed warm-up.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import aiohttp

from bench.client import ClientConfig, normalize_base_url
from bench.peer_report import summarize
from bench.peer_workloads import PeerWorkload
from bench.random_prompts import RandomTokenPrompts
from bench.run import OnDone, build_result, run_meta, run_requests, write_json
from bench.workloads import BenchRequest

Role = Literal["peer", "pdbox"]
ROLES: tuple[Role, ...] = ("peer", "pdbox")
_WARMUP_OFFSET = 0  # seed offset of the warm-up prompts; workloads use 1..99
_PDBOX_HINT = "start one with `pdbox up` (it prints `ready: http://HOST:PORT`) and pass that URL as --pdbox-url"


@dataclass(frozen=True)
class Target:
    """A server as given on the command line; `model` and `name` None: ask the server."""

    role: Role
    url: str
    model: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"the {self.role} URL must start with http:// or https://, got {self.url!r}")


@dataclass(frozen=True)
class ServerInfo:
    """A server as found: display name, root URL, model, and what its /v1/models says owns it."""

    role: Role
    name: str
    url: str
    model: str
    owned_by: str | None
    mode: str | None = None  # pdbox's --mode, from its GET /workers

    def describe(self) -> dict[str, Any]:
        return {"role": self.role, "name": self.name, "url": self.url, "model": self.model,
                "owned_by": self.owned_by, "mode": self.mode}


@dataclass(frozen=True)
class PeerConfig:
    """One `bench peer` invocation; `workloads` are already sized by --scale/--num-requests."""

    peer: Target
    pdbox: Target
    workloads: tuple[PeerWorkload, ...]
    out_dir: Path
    seed: int = 0
    scale: float = 1.0
    num_requests: int | None = None
    warmup: int = 2
    timeout_s: float = 600.0
    probe_timeout_s: float = 30.0
    api_key: str | None = None

    def __post_init__(self) -> None:
        if not self.workloads:
            raise ValueError("no workload to run")
        if normalize_base_url(self.peer.url) == normalize_base_url(self.pdbox.url):
            raise ValueError(f"--url and --pdbox-url are both {self.peer.url}: the peer and pdbox must differ")
        if not (self.timeout_s > 0 and self.probe_timeout_s > 0):
            raise ValueError(f"timeouts must be positive, got {self.timeout_s} and {self.probe_timeout_s}")
        if self.warmup < 0 or self.seed < 0:
            raise ValueError(f"--warmup and --seed must be >= 0, got {self.warmup} and {self.seed}")

    def command(self) -> str:
        """The `pdbox bench peer` line that reruns this (the API key left out)."""
        args = ["pdbox", "bench", "peer", "--url", self.peer.url, "--pdbox-url", self.pdbox.url]
        for flag, value in (("--model", self.peer.model), ("--pdbox-model", self.pdbox.model),
                            ("--peer-name", self.peer.name)):
            if value is not None:
                args += [flag, value]
        args += ["--workloads", ",".join(w.name for w in self.workloads), "--seed", str(self.seed)]
        if self.scale != 1:
            args += ["--scale", f"{self.scale:g}"]
        if self.num_requests is not None:
            args += ["--num-requests", str(self.num_requests)]
        return shlex.join([*args, "--out", str(self.out_dir)])


async def probe(target: Target, timeout_s: float, api_key: str | None) -> ServerInfo:
    """GET /v1/models within `timeout_s`; an unreachable server raises RuntimeError naming its role and URL."""
    url = normalize_base_url(target.url) + "/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    model_flag = "--pdbox-model" if target.role == "pdbox" else "--model"
    listed: list[Any] = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session, \
                session.get(url, headers=headers) as resp:
            if resp.status == 200:
                try:
                    data = await resp.json(content_type=None)
                except ValueError as exc:
                    raise RuntimeError(f"GET {url} ({target.role}) did not answer JSON: not an OpenAI server?") from exc
                listed = (data.get("data") or []) if isinstance(data, dict) else []
            elif target.model is None:
                raise RuntimeError(f"GET {url} ({target.role}) returned HTTP {resp.status}; pass {model_flag}")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        reason = f"no answer within {timeout_s:g} s" if isinstance(exc, asyncio.TimeoutError) else str(exc)
        hint = _PDBOX_HINT if target.role == "pdbox" else "is the server up?"
        raise RuntimeError(f"cannot reach the {target.role} server at {target.url} ({reason}); {hint}") from exc
    first = listed[0] if listed and isinstance(listed[0], dict) else {}
    model = target.model or first.get("id")
    if not model:
        raise RuntimeError(f"GET {url} ({target.role}) listed no models; pass {model_flag}")
    owned_by = first.get("owned_by") if isinstance(first.get("owned_by"), str) else None
    mode = await pdbox_mode(target.url, timeout_s, headers) if target.role == "pdbox" else None
    name = target.name or (f"pdbox {mode}" if mode else "pdbox" if target.role == "pdbox" else owned_by or "peer")
    return ServerInfo(target.role, name, normalize_base_url(target.url), str(model), owned_by, mode)


async def pdbox_mode(url: str, timeout_s: float, headers: Mapping[str, str]) -> str | None:
    """`auto`, `disagg` or `unified` from pdbox's GET /workers; None from a server without it."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session, \
                session.get(normalize_base_url(url) + "/workers", headers=dict(headers)) as resp:
            data = await resp.json(content_type=None) if resp.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None
    mode = data.get("mode") if isinstance(data, dict) else None
    return mode if isinstance(mode, str) else None


def build_requests(
    config: PeerConfig, prompts: RandomTokenPrompts
) -> tuple[list[BenchRequest], dict[str, list[BenchRequest]]]:
    """The warm-up requests and each workload's requests, built once and sent to both servers."""
    warm_seed = config.seed * 100 + _WARMUP_OFFSET
    warm = prompts.build(config.warmup, 32, 8, warm_seed, "warmup") if config.warmup else []
    return warm, {
        w.name: prompts.build(w.num_requests, w.prompt_len, w.output_len, w.seed(config.seed), w.kind)
        for w in config.workloads
    }


async def run_server(
    config: PeerConfig,
    info: ServerInfo,
    warm: list[BenchRequest],
    requests: Mapping[str, list[BenchRequest]],
    on_phase: Callable[[str, int], None] | None = None,
    on_done: OnDone | None = None,
    tokenizer: str = "",
) -> dict[str, dict[str, Any]]:
    """Every workload on one server, warm-up first; each result.json also goes to OUT/results/."""
    client = ClientConfig(info.url, info.model, "chat", config.timeout_s, config.api_key)
    results: dict[str, dict[str, Any]] = {}
    for i, workload in enumerate(config.workloads):
        if on_phase is not None:
            on_phase(f"{info.name}: {workload.name}", workload.num_requests)
        schedule = workload.schedule(config.seed)
        run = await run_requests(client, requests[workload.name], schedule, warm if i == 0 else (), on_done)
        extra = {"server_role": info.role, "server_name": info.name, "peer_workload": workload.name,
                 "num_prompts": workload.num_requests, "tokenizer_id": tokenizer}
        meta = run_meta(client, schedule, workload.label, workload.seed(config.seed), extra)
        results[workload.name] = build_result(run, None, meta)
        write_json(config.out_dir / "results" / f"{info.role}-{workload.name}.json", results[workload.name])
    return results


async def run_peer(
    config: PeerConfig,
    prompts: RandomTokenPrompts,
    on_phase: Callable[[str, int], None] | None = None,
    on_done: OnDone | None = None,
) -> dict[str, Any]:
    """Probe both servers, run the workloads on the peer, then on pdbox; return peer-report.json's content."""
    found = await asyncio.gather(*(probe(t, config.probe_timeout_s, config.api_key)
                                   for t in (config.peer, config.pdbox)))
    servers = {info.role: info for info in found}
    if servers["peer"].name == servers["pdbox"].name:  # e.g. a second pdbox as the peer: keep the columns apart
        servers["peer"] = replace(servers["peer"], name=f"{servers['peer'].name} (peer)")
    warm, requests = build_requests(config, prompts)
    results = {role: await run_server(config, servers[role], warm, requests, on_phase, on_done, prompts.codec.name)
               for role in ROLES}
    meta = {"command": config.command(), "tokenizer": prompts.codec.name, "seed": config.seed,
            "scale": config.scale, "warmup": config.warmup, "order": list(ROLES)}
    return summarize(config.workloads, config.seed, {r: s.describe() for r, s in servers.items()}, results, meta)
