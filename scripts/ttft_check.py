"""What the KV handoff adds to time-to-first-token: long prompts through unified and disaggregated
`pdbox up` on the same GPU, one at a time, on a random-weight Llama-shaped model written here.

    python3 scripts/ttft_check.py --prompt-tokens 8192 --out ttft.json          # on a GPU (cuda_ipc)
    python3 scripts/ttft_check.py --cpu --prompt-tokens 256 --layers 2 --hidden 128   # CPU smoke test

Each request is a fresh prompt (a distinct number leads it, so no prefix-cache hit) asking for one
token; its latency is its TTFT. Both modes see the same prompts in the same order after the same
warm-up. The handoff's share of TTFT is (disagg - unified) / disagg of the medians: everything the
two-engine path adds (the KV copy that is not hidden behind the prefill, the completion signal, the
extra hop through the decode engine). Exit 0 when the share is at most ``--max-share``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
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
    unified_ttft_ms: list[float]
    disagg_ttft_ms: list[float]
    unified_p50_ms: float
    disagg_p50_ms: float
    handoff_share: float
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


def ttfts(url: str, texts: list[str]) -> list[float]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120)
    model = client.models.list().data[0].id
    out = []
    for text in texts:
        t0 = time.perf_counter()
        client.completions.create(model=model, prompt=text, max_tokens=1, temperature=0)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


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
        common = (*common, "--dtype", "bfloat16")
        unified = ("--mode", "unified", "--gpus", "0", *common)
        disagg = ("--mode", "disagg", "--prefill-gpus", "0", "--decode-gpus", "0", "--transport", args.transport,
                  *common)
    texts = prompts(args.requests + 2, args.prompt_tokens, seed=1)
    logs = args.log_dir or work
    try:
        with running_appliance(*unified, log_dir=logs / "unified") as url:
            uni = ttfts(url, texts)[2:]
        with running_appliance(*disagg, log_dir=logs / "disagg") as url:
            dis = ttfts(url, texts)[2:]
    finally:
        shutil.rmtree(work / "llama", ignore_errors=True)
    u50, d50 = statistics.median(uni), statistics.median(dis)
    share = (d50 - u50) / d50
    report = Report(args.prompt_tokens, args.requests, shape, [round(x, 2) for x in uni], [round(x, 2) for x in dis],
                    round(u50, 2), round(d50, 2), round(share, 4), args.max_share, share <= args.max_share)
    text = json.dumps(asdict(report), indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    print(f"TTFT p50 for {args.prompt_tokens}-token prompts: unified {u50:.1f} ms, disagg {d50:.1f} ms; "
          f"the two-engine path adds {100 * share:.2f}% (target <= {100 * args.max_share:.0f}%)")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
