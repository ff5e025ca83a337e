"""What the KV handoff adds to time-to-first-token: long prompts through unified and disaggregated
`pdbox up` on the same GPU, one at a time, on a random-weight Llama-shaped model written here.

    python3 scripts/ttft_check.py --prompt-tokens 8192 --out ttft.json          # on a GPU (cuda_ipc)
    python3 scripts/ttft_check.py --cpu --prompt-tokens 256 --layers 2 --hidden 128   # CPU smoke test

Each request is a fresh prompt (a distinct number leads it, so no prefix-cache hit) asking for one
token. Figures come from the router's own histograms, diffed over the timed requests (means):
``pdbox_ttft_seconds`` in both modes, and in disaggregated mode ``pdbox_handoff_tail_seconds``, from
prefill's first token (which the client gets at once) to decode's, i.e. the part of the KV handoff
not hidden behind the prefill: the last layer's copy, the completion signal, decode taking it in.
The handoff's share is that tail over disaggregated TTFT. Exit 0 when it is at most ``--max-share``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass(frozen=True)
class Report:
    prompt_tokens: int
    requests: int
    model: dict
    unified_ttft_ms: float
    disagg_ttft_ms: float
    handoff_tail_ms: float
    handoff_share: float
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


def mean_ms(before, after, name: str) -> float:
    """Mean of histogram ``name`` (the router's series) over the requests between two scrapes, in ms."""
    h = after.histogram(name, role="router").minus(before.histogram(name, role="router"))
    if h.count <= 0:
        raise RuntimeError(f"the router recorded no {name} over the timed requests")
    return h.total / h.count * 1e3


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-tokens", type=int, default=8192)
    p.add_argument("--requests", type=int, default=7, help="timed requests per mode (after 2 warm-ups)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--transport", default="cuda_ipc")
    p.add_argument("--cpu", action="store_true", help="CPU cores and the shm transport (smoke test)")
    p.add_argument("--max-share", type=float, default=0.02)
    p.add_argument("--out", type=Path)
    p.add_argument("--log-dir", type=Path)
    args = p.parse_args(argv)

    from appliance.model.tiny import write_tiny_model
    from tests.serve.appliance_proc import running_appliance

    shape = {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "kv_heads": args.kv_heads,
             "intermediate": args.intermediate}
    work = Path(tempfile.mkdtemp(prefix="pdbox-ttft-check-"))
    model = write_tiny_model(work / "llama", seed=0, max_position=args.prompt_tokens + 64, **shape)
    kv_mb = "1024"
    common = ("--model", str(model), "--kv-cache-mb", kv_mb, "--no-monitor")
    if args.cpu:
        unified = ("--mode", "unified", "--cpus", "0", *common)
        disagg = ("--mode", "disagg", "--prefill-cpus", "0", "--decode-cpus", "0", "--transport", "shm", *common)
    else:
        common = (*common, "--dtype", "bfloat16", "--no-cuda-graphs")  # one-token answers: no decode to capture
        unified = ("--mode", "unified", "--gpus", "0", *common)
        disagg = ("--mode", "disagg", "--prefill-gpus", "0", "--decode-gpus", "0", "--transport", args.transport,
                  *common)
    warmup = 2
    texts = prompts(args.requests + warmup, args.prompt_tokens, seed=1)
    logs = args.log_dir or work
    try:
        with running_appliance(*unified, log_dir=logs / "unified") as url:
            uni, u0, u1 = run(url, texts, warmup)
        with running_appliance(*disagg, log_dir=logs / "disagg") as url:
            dis, d0, d1 = run(url, texts, warmup)
    finally:
        shutil.rmtree(work / "llama", ignore_errors=True)
    u_ttft, d_ttft = mean_ms(u0, u1, "pdbox_ttft_seconds"), mean_ms(d0, d1, "pdbox_ttft_seconds")
    tail = mean_ms(d0, d1, "pdbox_handoff_tail_seconds")
    share = tail / d_ttft
    report = Report(args.prompt_tokens, args.requests, shape, round(u_ttft, 2), round(d_ttft, 2), round(tail, 3),
                    round(share, 4), uni, dis, args.max_share, share <= args.max_share)
    text = json.dumps(asdict(report), indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    print(f"{args.prompt_tokens}-token prompts, mean of {args.requests}: TTFT unified {u_ttft:.1f} ms, disagg "
          f"{d_ttft:.1f} ms; the handoff after prefill's first token {tail:.2f} ms = {100 * share:.2f}% of "
          f"disagg TTFT (target <= {100 * args.max_share:.0f}%)")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
