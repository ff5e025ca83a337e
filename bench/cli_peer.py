"""`pdbox bench peer`: the same fixed workloads against a peer server and against pdbox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console

from bench.cli_console import Tracker, progress_bar, run_async, user_errors
from bench.cli_options import bench_context
from bench.peer import PeerConfig, Target, run_peer
from bench.peer_report import peer_table, write_peer_report
from bench.peer_workloads import PEER_WORKLOADS, parse_workloads
from bench.random_prompts import RandomTokenPrompts


@click.command("peer")
@click.option("--url", required=True, help="The peer: any OpenAI-compatible server (vLLM, SGLang, llama.cpp).")
@click.option("--pdbox-url", help="A running pdbox (`pdbox up` prints it), e.g. http://127.0.0.1:8000.")
@click.option("--model", help="The peer's model name [default: the first id of its GET /v1/models].")
@click.option("--pdbox-model", help="pdbox's model name [default: the first id of its GET /v1/models].")
@click.option("--peer-name", help="The peer's name in the report [default: owned_by of its /v1/models].")
@click.option("--workloads", default=",".join(PEER_WORKLOADS), show_default=True,
              help="Comma-separated subset of the fixed workloads.")
@click.option("--num-requests", type=int, help="Requests per workload [default: each workload's own].")
@click.option("--scale", type=float, default=1.0, show_default=True,
              help="Shrink every workload for smoke tests: x requests and prompt tokens, arrivals 1/x as far apart.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True, dir_okay=False),
              help="GGUF whose tokenizer makes the prompts [default: pdbox's embedded model].")
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed warm-up requests per server.")
@click.option("--timeout-s", type=float, default=600.0, show_default=True, help="Per-request timeout.")
@click.option("--probe-timeout-s", type=float, default=30.0, show_default=True,
              help="How long each server gets to answer GET /v1/models before it counts as unreachable.")
@click.option("--api-key", envvar="OPENAI_API_KEY", help="Bearer token for both servers [env: OPENAI_API_KEY].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
def peer_cmd(url: str, pdbox_url: str | None, model: str | None, pdbox_model: str | None, peer_name: str | None,
             workloads: str, num_requests: int | None, scale: float, seed: int, tokenizer_path: str | None,
             warmup: int, timeout_s: float, probe_timeout_s: float, api_key: str | None, out_dir: Path) -> None:
    """The same fixed workloads against a peer server and against pdbox: OUT/peer-report.md and .json.

    Workloads (as `vllm bench serve --backend openai-chat --dataset-name random --random-range-ratio 0
    --ignore-eos` sends them): chat 256 in / 64 out, 48 at once; the same at 1 and 2 req/s (Poisson);
    RAG 1536 in / 32 out at 0.3 req/s. Same prompts for both; the peer runs first, then pdbox.
    """
    with user_errors():
        if pdbox_url is None:
            raise ValueError("--pdbox-url is needed: start pdbox first (`pdbox up`, which prints "
                             "`ready: http://HOST:PORT`) and pass that URL")
        config = PeerConfig(
            peer=Target("peer", url, model, peer_name), pdbox=Target("pdbox", pdbox_url, pdbox_model),
            workloads=tuple(w.sized(scale, num_requests) for w in parse_workloads(workloads)), out_dir=out_dir,
            seed=seed, scale=scale, num_requests=num_requests, warmup=warmup, timeout_s=timeout_s,
            probe_timeout_s=probe_timeout_s, api_key=api_key,
        )
        prompts = RandomTokenPrompts(bench_context().load_codec(tokenizer_path))

    async def go() -> dict[str, Any]:
        with progress_bar(Console(stderr=True)) as progress:
            tracker = Tracker(progress)
            return await run_peer(config, prompts, tracker.phase, tracker.done)

    summary = run_async(go())
    md, js = write_peer_report(out_dir, summary)
    console = Console()
    console.print(peer_table(summary))
    console.print(f"wrote {md} and {js}")
