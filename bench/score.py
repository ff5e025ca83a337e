"""Prompt scoring against a peer: the same texts scored by pdbox and by another OpenAI-compatible server.

    python -m bench.score --url http://127.0.0.1:8000 --peer-url http://127.0.0.1:8011 --out score.json

Each text (windows of the bench corpus, ``--tokens`` tokens each, as token ids so both servers see the
very same tokens) goes to both servers as lm-eval's loglikelihood requests go: /v1/completions with
``echo``, ``logprobs=1``, ``max_tokens=1``, ``temperature=0``, ``--batch`` texts per request. Reported:
how far apart the two servers' logprobs of the same prompt tokens are (mean, p99 and max of the
absolute difference), how often their likeliest alternative agrees, each server's perplexity over all
scored tokens, and the wall time per request of each (medians, the servers one after the other, the
peer first).
"""

from __future__ import annotations

import json
import math
import statistics
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from bench.client import normalize_base_url

CORPUS = Path(__file__).parent / "corpus"


@dataclass(frozen=True)
class Scored:
    """One server's answer for one text: each prompt token's logprob (the first is None) and the likeliest
    alternative at each position."""

    logprobs: list[float | None]
    top: list[str | None]


@dataclass(frozen=True)
class ScoreReport:
    texts: int
    tokens_per_text: int
    batch: int
    scored_tokens: int
    mean_abs_diff: float
    p99_abs_diff: float
    max_abs_diff: float
    top1_agreement: float
    perplexity: float
    peer_perplexity: float
    request_s: float  # median wall time of one request (``batch`` texts), pdbox
    peer_request_s: float
    urls: dict[str, str]


def windows(token_ids: list[int], size: int, count: int) -> list[list[int]]:
    """``count`` windows of ``size`` tokens, taken in order from ``token_ids`` (fewer if it runs out)."""
    return [token_ids[i:i + size] for i in range(0, len(token_ids) - size + 1, size)][:count]


def score(url: str, model: str, prompts: list[list[int]], timeout_s: float = 300.0) -> tuple[list[Scored], float]:
    """Score ``prompts`` (token ids) in one request; returns the answers and the request's wall seconds."""
    body = {"model": model, "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        answer = json.loads(r.read())
    took = time.perf_counter() - t0
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    out = []
    for c, ids in zip(choices, prompts, strict=True):
        lp = c["logprobs"]
        n = len(ids)  # the prompt's entries; the generated token's follows
        tops = [None if t is None else max(t, key=t.get) for t in lp["top_logprobs"][:n]]
        out.append(Scored(lp["token_logprobs"][:n], tops))
    return out, took


def model_of(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
        return json.loads(r.read())["data"][0]["id"]


def compare(ours: list[Scored], theirs: list[Scored]) -> tuple[list[float], float, float, float]:
    """|difference| per scored token, top-1 agreement, and each side's perplexity."""
    diffs, agree, total, sum_a, sum_b = [], 0, 0, 0.0, 0.0
    for a, b in zip(ours, theirs, strict=True):
        for la, lb, ta, tb in zip(a.logprobs[1:], b.logprobs[1:], a.top[1:], b.top[1:], strict=True):
            diffs.append(abs(la - lb))
            agree += ta == tb
            total += 1
            sum_a += la
            sum_b += lb
    return diffs, agree / max(total, 1), math.exp(-sum_a / max(total, 1)), math.exp(-sum_b / max(total, 1))


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--url", required=True, help="pdbox's root URL (what `pdbox up` prints)")
@click.option("--peer-url", required=True, help="the other server's root URL")
@click.option("--texts", type=int, default=16, show_default=True, help="texts scored")
@click.option("--tokens", type=int, default=256, show_default=True, help="tokens per text")
@click.option("--batch", type=int, default=4, show_default=True, help="texts per request")
@click.option("--out", type=click.Path(path_type=Path), help="write the report here as JSON")
def main(url: str, peer_url: str, texts: int, tokens: int, batch: int, out: Path | None) -> None:
    from appliance.model.loader import default_model_path
    from appliance.model.tokenizer import Tokenizer

    if texts < 1 or tokens < 2 or batch < 1:
        raise click.BadParameter("--texts and --batch must be >= 1, --tokens >= 2")
    url, peer_url = normalize_base_url(url), normalize_base_url(peer_url)
    tok = Tokenizer.from_gguf(default_model_path())
    ids = [t for f in sorted(CORPUS.glob("*.txt")) for t in tok.encode(f.read_text())]
    prompts = windows(ids, tokens, texts)
    if len(prompts) < texts:
        raise click.ClickException(f"the corpus holds only {len(prompts)} windows of {tokens} tokens")
    batches = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    results: dict[str, tuple[list[Scored], list[float]]] = {}
    for name, where in (("peer", peer_url), ("pdbox", url)):  # one after the other: the timings are their own
        model = model_of(where)
        score(where, model, batches[0][:1])  # warm-up
        answers, times = [], []
        for b in batches:
            got, took = score(where, model, b)
            answers += got
            times.append(took)
        results[name] = (answers, times)
    diffs, agree, ppl, peer_ppl = compare(results["pdbox"][0], results["peer"][0])
    diffs.sort()
    report = ScoreReport(
        texts=len(prompts), tokens_per_text=tokens, batch=batch, scored_tokens=len(diffs),
        mean_abs_diff=statistics.fmean(diffs), p99_abs_diff=diffs[min(len(diffs) - 1, int(0.99 * len(diffs)))],
        max_abs_diff=diffs[-1], top1_agreement=agree, perplexity=ppl, peer_perplexity=peer_ppl,
        request_s=statistics.median(results["pdbox"][1]), peer_request_s=statistics.median(results["peer"][1]),
        urls={"pdbox": url, "peer": peer_url})
    click.echo(f"{report.scored_tokens} prompt tokens ({report.texts} texts of {tokens}, {batch} a request): "
               f"|logprob difference| mean {report.mean_abs_diff:.4f}, p99 {report.p99_abs_diff:.4f}, "
               f"max {report.max_abs_diff:.4f}; likeliest alternative agrees {agree:.1%}; perplexity pdbox "
               f"{ppl:.3f}, peer {peer_ppl:.3f}; median request {report.request_s:.2f} s pdbox, "
               f"{report.peer_request_s:.2f} s peer ({report.request_s / report.peer_request_s:.2f}x)")
    if out is not None:
        out.write_text(json.dumps(asdict(report), indent=1) + "\n")


if __name__ == "__main__":
    main()
