"""What the KV handoff adds to time-to-first-token: long prompts through unified and disaggregated
`pdbox up` on the same GPU, one at a time, on a random-weight Llama-shaped model written here.

    python3 scripts/ttft_check.py --prompt-tokens 8192 --out ttft.json          # on a GPU (cuda_ipc)
    python3 scripts/ttft_check.py --cpu --prompt-tokens 256 --layers 2 --hidden 128 --heads 4 --kv-heads 2  # CPU smoke

Each request is a fresh prompt (a distinct number leads it, so no prefix-cache hit) asking for one
token. Figures come from the router's own histograms, diffed over the timed requests (means):
``pdbox_ttft_seconds`` in both modes, and in disaggregated mode ``pdbox_handoff_tail_seconds``, from
prefill's first token (which the client gets at once) to decode's, i.e. the part of the KV handoff
not hidden behind the prefill: the last layer's copy, the completion signal, decode taking it in.
The handoff's share is that tail over disaggregated TTFT. Exit 0 when it is at most ``--max-share``,
3 when it is over (the check ran: a missed target, which the device check's summary labels MISS).
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
TARGET_MISSED = 3  # the exit status when everything ran and the handoff's share is over --max-share


@dataclass(frozen=True)
class Report:
    prompt_tokens: int
    requests: int
    model: dict
    unified_ttft_ms: float
    disagg_ttft_ms: float
    handoff_tail_ms: float
    handoff_share: float
    # where TTFT goes, per timed request (means): the engine's own TTFT (arrival at the worker to its
    # first token), the forward steps' wall time inside it, and the step count. Router TTFT minus the
    # engine's is the router's part (in disaggregated mode, decode's page reservation first); the
    # engine's minus its steps is queueing and the host's work between steps.
    unified_engine_ttft_ms: float
    unified_step_ms: float
    unified_steps: float
    prefill_engine_ttft_ms: float
    prefill_step_ms: float
    prefill_steps: float
    unified_latency_ms: list[float]     # client-side, per request (one token: about its TTFT)
    disagg_latency_ms: list[float]
    max_share: float
    ok: bool


def prompts(n: int, tokens: int, seed: int) -> list[str]:
    """``n`` distinct prompts of about ``tokens`` byte-level tokens (the written model's tokenizer)."""
    rng = random.Random(seed)
    words = ["river", "stone", "lamp", "orbit", "paper", "signal", "garden", "copper", "winter", "echo"]
    out = []
    for i in range(n):
        text = f"{i} " + " ".join(rng.choice(words) for _ in range(tokens))
        out.append(text[:tokens])
    return out


def scrape(url: str):
    import urllib.request

    from appliance.monitor.prom import Metrics

    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        return Metrics.from_text(r.read().decode())


def mean_ms(before, after, name: str, role: str = "router") -> float:
    """Mean of histogram ``name`` (``role``'s series) over the requests between two scrapes, in ms."""
    h = after.histogram(name, role=role).minus(before.histogram(name, role=role))
    if h.count <= 0:
        raise RuntimeError(f"the {role} series recorded no {name} over the timed requests")
    return h.total / h.count * 1e3


def steps(before, after, role: str, requests: int) -> tuple[float, float]:
    """Forward-step wall time (ms) and step count of ``role``'s engines per timed request."""
    h = after.histogram("pdbox_step_seconds", role=role).minus(before.histogram("pdbox_step_seconds", role=role))
    return round(h.total / requests * 1e3, 2), round(h.count / requests, 2)


def run(url: str, texts: list[str], warmup: int) -> tuple[list[float], object, object]:
    """Client latencies of the timed requests, and the router's metrics before and after them."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120)
    model = client.models.list().data[0].id
    out, before = [], None
    for i, text in enumerate(texts):
        if i == warmup:
            before = scrape(url)
        t0 = time.perf_counter()
        client.completions.create(model=model, prompt=text, max_tokens=1, temperature=0)
        out.append(round((time.perf_counter() - t0) * 1e3, 2))
    return out[warmup:], before, scrape(url)


@click.command(help=__doc__.split("\n\n")[0], context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--prompt-tokens", type=int, default=8192)
@click.option("--requests", type=int, default=7, help="timed requests per mode (after 2 warm-ups)")
@click.option("--layers", type=int, default=8)
@click.option("--hidden", type=int, default=2048)
@click.option("--heads", type=int, default=32)
@click.option("--kv-heads", type=int, default=8)
@click.option("--intermediate", type=int, default=8192)
@click.option("--transport", default="cuda_ipc")
@click.option("--cpu", is_flag=True, help="CPU cores and the shm transport (smoke test)")
@click.option("--max-share", type=float, default=0.02)
@click.option("--out", type=click.Path(path_type=Path))
@click.option("--log-dir", type=click.Path(path_type=Path))
def command(prompt_tokens: int, requests: int, layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int,
            transport: str, cpu: bool, max_share: float, out: Path | None, log_dir: Path | None) -> int:
    from appliance.model.tiny import write_tiny_model
    from tests.serve.appliance_proc import running_appliance

    shape = {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads,
             "intermediate": intermediate}
    work = Path(tempfile.mkdtemp(prefix="pdbox-ttft-check-"))
    model = write_tiny_model(work / "llama", seed=0, max_position=prompt_tokens + 64, **shape)
    kv_mb = "1024"
    common = ("--model", str(model), "--kv-cache-mb", kv_mb, "--no-monitor")
    if cpu:
        unified = ("--mode", "unified", "--cpus", "0", *common)
        disagg = ("--mode", "disagg", "--prefill-cpus", "0", "--decode-cpus", "0", "--transport", "shm", *common)
    else:
        common = (*common, "--dtype", "bfloat16", "--no-cuda-graphs")  # one-token answers: no decode to capture
        unified = ("--mode", "unified", "--gpus", "0", *common)
        disagg = ("--mode", "disagg", "--prefill-gpus", "0", "--decode-gpus", "0", "--transport", transport,
                  *common)
    warmup = 2
    texts = prompts(requests + warmup, prompt_tokens, seed=1)
    logs = log_dir or work
    try:
        with running_appliance(*unified, log_dir=logs / "unified") as url:
            uni, u0, u1 = run(url, texts, warmup)
        # NOTE: unified mode's figures now, in case the disaggregated run is cut off (a device check's timeout)
        partial = {"partial": "unified mode only", "prompt_tokens": prompt_tokens, "requests": requests,
                   "unified_ttft_ms": round(mean_ms(u0, u1, "pdbox_ttft_seconds"), 2),
                   "unified_engine_ttft_ms": round(mean_ms(u0, u1, "pdbox_ttft_seconds", "unified"), 2),
                   "unified_latency_ms": uni}
        print(f"unified: TTFT {partial['unified_ttft_ms']:.1f} ms (engine {partial['unified_engine_ttft_ms']:.1f})",
              flush=True)
        if out:
            out.write_text(json.dumps(partial, indent=1))
        with running_appliance(*disagg, log_dir=logs / "disagg") as url:
            dis, d0, d1 = run(url, texts, warmup)
    finally:
        shutil.rmtree(work if log_dir is None else work / "llama", ignore_errors=True)  # logs kept only if asked
    u_ttft, d_ttft = mean_ms(u0, u1, "pdbox_ttft_seconds"), mean_ms(d0, d1, "pdbox_ttft_seconds")
    tail = mean_ms(d0, d1, "pdbox_handoff_tail_seconds")
    share = tail / d_ttft
    report = Report(prompt_tokens, requests, shape, round(u_ttft, 2), round(d_ttft, 2), round(tail, 3),
                    round(share, 4), round(mean_ms(u0, u1, "pdbox_ttft_seconds", "unified"), 2),
                    *steps(u0, u1, "unified", requests), round(mean_ms(d0, d1, "pdbox_ttft_seconds", "prefill"), 2),
                    *steps(d0, d1, "prefill", requests), uni, dis, max_share, share <= max_share)
    text = json.dumps(asdict(report), indent=1)
    print(text)
    if out:
        out.write_text(text)
    print(f"{prompt_tokens}-token prompts, mean of {requests}: TTFT unified {u_ttft:.1f} ms, disagg "
          f"{d_ttft:.1f} ms; the handoff after prefill's first token {tail:.2f} ms = {100 * share:.2f}% of "
          f"disagg TTFT (target <= {100 * max_share:.0f}%)")
    print(f"engine TTFT unified {report.unified_engine_ttft_ms:.1f} ms ({report.unified_steps:g} steps, "
          f"{report.unified_step_ms:.1f} ms), prefill {report.prefill_engine_ttft_ms:.1f} ms "
          f"({report.prefill_steps:g} steps, {report.prefill_step_ms:.1f} ms)")
    return 0 if report.ok else TARGET_MISSED


def main(argv: list[str] | None = None) -> int:
    """The exit status of ``python3 scripts/ttft_check.py ARGS`` (2: a bad option)."""
    from appliance.cli_support import run_command

    return run_command(command, argv)


if __name__ == "__main__":
    sys.exit(main())
