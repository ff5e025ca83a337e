"""Benchmark workloads: seeded request lengths and real-text prompts cut to length with the tokenizer.

Lengths are tokens of the served model, drawn uniformly (both ends included) within each range:

| workload | prompt tokens | answer tokens | shape                                   |
|----------|---------------|---------------|-----------------------------------------|
| chat     | 64-256        | 100-300       | short prompt, long answer               |
| rag      | 1024-2048     | 16-64         | long prompt, short answer               |
| code     | 512-1536      | 64-256        | medium prompt, medium answer            |
| long     | 4096-6144     | 32-128        | long-context prompt, short answer       |
| mixed    | chat + rag    | chat + rag    | exactly round(0.7 n) chat, rest rag,    |
|          |               |               | interleaved in an order set by the seed |
| shift    | chat + rag    | chat + rag    | first half 90% chat, second half 60% rag|
|          |               |               | (a mid-run traffic shift)               |

Prompts are windows of the bundled English corpus (`bench/corpus/*.txt`), so prefix caching sees real
text. Each prompt starts with a line unique to (seed, index), so two requests never share a prefix by
accident; `shared_prefix_len` N prepends one system-prompt-like block of N tokens to every prompt, and the
prompt's total length is then N plus the drawn length. The answer length is enforced by the client with
`max_completion_tokens`/`max_tokens` plus `ignore_eos`.
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

# Independent random streams under one user seed, so changing one draw never shifts another.
_LENGTH_STREAM = 1
_OFFSET_STREAM = 2
_DATASET_STREAM = 3
_WARMUP_SEED = 2**32 - 1  # NOTE: a seed no sweep derives, so warm-up text never prefixes a measured prompt

_PREFIX_INTRO = (
    "You are a careful assistant for a team of engineers and writers. Read the reference notes below "
    "before you answer, quote them when they help, and say so when they do not cover the question.\n\n"
)


@dataclass(frozen=True)
class LengthRange:
    """An inclusive range of token counts, sampled uniformly."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not 1 <= self.lo <= self.hi:
            raise ValueError(f"a length range needs 1 <= lo <= hi, got {self.lo}-{self.hi}")

    def sample(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.lo, self.hi + 1))

    def __contains__(self, n: object) -> bool:
        return isinstance(n, int) and self.lo <= n <= self.hi


@dataclass(frozen=True)
class LengthProfile:
    """One request shape: a prompt range and an answer range, in tokens."""

    name: str
    prompt: LengthRange
    answer: LengthRange


@dataclass(frozen=True)
class WorkloadSpec:
    """A named blend of length profiles; the weights are exact shares of the request count."""

    name: str
    parts: tuple[tuple[LengthProfile, float], ...]
    # Optional phases, in order: (share of the requests, blend of that phase). `parts` is then the
    # whole-run blend for reference only; each phase's requests are drawn from its own blend.
    phases: tuple[tuple[float, tuple[tuple[LengthProfile, float], ...]], ...] = ()

    def __post_init__(self) -> None:
        if not self.parts or any(w <= 0 for _, w in self.parts):
            raise ValueError(f"workload {self.name!r} needs at least one part, all with positive weight")


CHAT = LengthProfile("chat", LengthRange(64, 256), LengthRange(100, 300))
RAG = LengthProfile("rag", LengthRange(1024, 2048), LengthRange(16, 64))
CODE = LengthProfile("code", LengthRange(512, 1536), LengthRange(64, 256))
LONG = LengthProfile("long", LengthRange(4096, 6144), LengthRange(32, 128))

WORKLOADS: Mapping[str, WorkloadSpec] = MappingProxyType(
    {
        "chat": WorkloadSpec("chat", ((CHAT, 1.0),)),
        "rag": WorkloadSpec("rag", ((RAG, 1.0),)),
        "code": WorkloadSpec("code", ((CODE, 1.0),)),
        "long": WorkloadSpec("long", ((LONG, 1.0),)),
        "mixed": WorkloadSpec("mixed", ((CHAT, 0.7), (RAG, 0.3))),
        # mixed with a mid-run shift: a chat-heavy first half, a RAG-heavy second half
        "shift": WorkloadSpec("shift", ((CHAT, 0.65), (RAG, 0.35)),
                              phases=((0.5, ((CHAT, 0.9), (RAG, 0.1))), (0.5, ((CHAT, 0.4), (RAG, 0.6))))),
    }
)


def get_workload(name: str) -> WorkloadSpec:
    """The named workload; an unknown name raises ValueError listing the known ones."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
    return WORKLOADS[name]


@dataclass(frozen=True)
class LengthSample:
    """The drawn shape of one request: `prompt_len` excludes any shared prefix."""

    kind: str
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class BenchRequest:
    """One request to send. `prompt_len` is the measured token count of `prompt` (shared prefix included)."""

    prompt: str
    prompt_len: int
    output_len: int
    kind: str


@dataclass(frozen=True)
class TextCodec:
    """The served model's tokenizer, as two functions."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    name: str = "custom"
    vocab_size: int | None = None  # ids 0..vocab_size-1 (random prompts need it); None when unknown


def load_codec(gguf_path: str | Path | None = None) -> TextCodec:
    """The tokenizer of a GGUF model (default: pdbox's embedded model) via pdbox's own loader.

    Imported lazily: the loader pulls in the model code, which the rest of the bench does not need.
    """
    from appliance.model.loader import default_model_path
    from appliance.model.tokenizer import Tokenizer

    path = Path(gguf_path) if gguf_path is not None else default_model_path()
    tokenizer = Tokenizer.from_gguf(path)
    return TextCodec(encode=tokenizer.encode, decode=tokenizer.decode, name=str(path), vocab_size=tokenizer.vocab_size)


def corpus_text() -> str:
    """The bundled corpus: every `bench/corpus/*.txt`, in name order, separated by blank lines."""
    root = importlib.resources.files("bench") / "corpus"
    files = sorted((p for p in root.iterdir() if p.name.endswith(".txt")), key=lambda p: p.name)
    if not files:
        raise ValueError("bench/corpus holds no .txt files; the package data did not ship")
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in files) + "\n\n"


class Corpus:
    """The corpus as one token stream, read cyclically so any window length is available."""

    def __init__(self, text: str, codec: TextCodec) -> None:
        self.ids: tuple[int, ...] = tuple(codec.encode(text))
        if len(self.ids) < 16:
            raise ValueError("the corpus is too short to cut prompts from")

    def window(self, start: int, length: int) -> list[int]:
        """`length` token ids from position `start`, wrapping around the end of the corpus."""
        out: list[int] = []
        start %= len(self.ids)
        while len(out) < length:
            out.extend(self.ids[start : start + length - len(out)])
            start = 0
        return out


def fit_to_length(
    make_text: Callable[[int], str], target: int, encode: Callable[[str], list[int]], guess: int
) -> tuple[str, int]:
    """Find n so that `make_text(n)` encodes to `target` tokens; return the text and its true length.

    Decoding a token window and encoding it again need not give back the same count (tokens merge at
    the seams), so n is corrected by the miss and, once the target is bracketed, by bisection. When no
    n hits the target exactly the closest text wins, the shorter on a tie (real BPE: at most a token off).
    """
    short: tuple[int, str, int] | None = None  # the largest n found too short: (n, text, length)
    long: tuple[int, str, int] | None = None  # the smallest n found too long
    seen: set[int] = set()
    n = max(guess, 0)
    for _ in range(16):
        seen.add(n)
        text = make_text(n)
        length = len(encode(text))
        if length == target:
            return text, length
        if length < target and (short is None or n > short[0]):
            short = (n, text, length)
        if length > target and (long is None or n < long[0]):
            long = (n, text, length)
        step = n + target - length
        if short is not None and long is not None and not short[0] < step < long[0]:
            step = (short[0] + long[0]) // 2
        n = max(step, 0)
        if n in seen:
            break
    found = [c for c in (short, long) if c is not None]
    best = min(found, key=lambda c: (abs(c[2] - target), c[2] > target))
    return best[1], best[2]


def _split_counts(weights: Sequence[float], n: int) -> list[int]:
    """Exact integer shares of n by weight (largest remainder), e.g. 0.7/0.3 of 10 -> 7/3."""
    total = sum(weights)
    raw = [w / total * n for w in weights]
    counts = [int(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def sample_lengths(spec: WorkloadSpec, num_requests: int, seed: int) -> list[LengthSample]:
    """Draw each request's profile and lengths; the same (spec, n, seed) always gives the same list."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be at least 1, got {num_requests}")
    rng = np.random.default_rng([seed, _LENGTH_STREAM])
    phases = spec.phases or ((1.0, spec.parts),)
    sizes = _split_counts([share for share, _ in phases], num_requests)
    samples = []
    for (_, parts), size in zip(phases, sizes):
        if size == 0:
            continue
        counts = _split_counts([w for _, w in parts], size)
        order = rng.permutation(np.repeat(np.arange(len(parts)), counts))
        for part in order:
            profile = parts[int(part)][0]
            samples.append(LengthSample(profile.name, profile.prompt.sample(rng), profile.answer.sample(rng)))
    return samples


class PromptBuilder:
    """Turns length samples into real-text prompts of those token lengths."""

    def __init__(self, codec: TextCodec, corpus: Corpus | None = None, shared_prefix_len: int = 0) -> None:
        if shared_prefix_len < 0:
            raise ValueError(f"shared_prefix_len must be >= 0, got {shared_prefix_len}")
        self.codec = codec
        self.corpus = corpus if corpus is not None else Corpus(corpus_text(), codec)
        self.prefix = self._shared_prefix(shared_prefix_len) if shared_prefix_len else ""
        self.prefix_len = len(codec.encode(self.prefix)) if self.prefix else 0

    def _shared_prefix(self, length: int) -> str:
        source = list(self.codec.encode(_PREFIX_INTRO)) + self.corpus.window(0, length)
        text, _ = fit_to_length(lambda n: self.codec.decode(source[:n]) + "\n\n", length, self.codec.encode, length)
        return text

    def build(self, samples: Sequence[LengthSample], seed: int) -> list[BenchRequest]:
        """One request per sample; text windows start at seeded offsets, after a unique header line."""
        rng = np.random.default_rng([seed, _OFFSET_STREAM])
        requests = []
        for i, sample in enumerate(samples):
            header = self.codec.encode(f"Document {seed}-{i}.\n")
            offset = int(rng.integers(0, len(self.corpus.ids)))
            source = header + self.corpus.window(offset, sample.prompt_len * 5 // 4 + 64)
            target = self.prefix_len + sample.prompt_len
            text, length = fit_to_length(
                lambda n, src=source: self.prefix + self.codec.decode(src[:n]),
                target,
                self.codec.encode,
                sample.prompt_len,
            )
            requests.append(BenchRequest(text, length, sample.output_len, sample.kind))
        return requests

    def wrap(self, prompt: str, output_len: int, kind: str) -> BenchRequest:
        """A request for a given prompt text (e.g. from a dataset), with the shared prefix in front."""
        text = self.prefix + prompt
        return BenchRequest(text, len(self.codec.encode(text)), output_len, kind)


def synthesize(spec: WorkloadSpec, num_requests: int, seed: int, builder: PromptBuilder) -> list[BenchRequest]:
    """The seeded requests of a synthetic workload."""
    return builder.build(sample_lengths(spec, num_requests, seed), seed)


def load_sharegpt(
    path: str | Path,
    num_requests: int,
    seed: int,
    builder: PromptBuilder,
    max_prompt_len: int = 1024,
    max_total_len: int = 2048,
) -> list[BenchRequest]:
    """Requests from a ShareGPT-format JSON file, sampled as `vllm bench serve` does.

    Each conversation's first turn is the prompt and its second the reference answer, whose token count
    is the output length. Pairs with a prompt or answer under 4 tokens, a prompt over `max_prompt_len`
    or a total over `max_total_len` are skipped (vLLM's defaults). The order is shuffled by the seed.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of {{'conversations': [...]}} entries")
    pairs = [
        (turns[0]["value"], turns[1]["value"])
        for entry in data
        if isinstance(entry, dict) and isinstance(turns := entry.get("conversations"), list) and len(turns) >= 2
    ]
    order = np.random.default_rng([seed, _DATASET_STREAM]).permutation(len(pairs))
    requests: list[BenchRequest] = []
    for index in order:
        prompt, answer = pairs[int(index)]
        prompt_len = len(builder.codec.encode(prompt))
        output_len = len(builder.codec.encode(answer))
        if prompt_len < 4 or output_len < 4 or prompt_len > max_prompt_len:
            continue
        if prompt_len + output_len > max_total_len:
            continue
        requests.append(builder.wrap(prompt, output_len, "sharegpt"))
        if len(requests) == num_requests:
            return requests
    raise ValueError(f"{path} has only {len(requests)} usable conversations, fewer than {num_requests}")


def warmup_requests(builder: PromptBuilder, count: int) -> list[BenchRequest]:
    """Short requests to send before timing starts; their text shares no prefix with measured prompts."""
    samples = [LengthSample("warmup", 32, 8)] * count
    return builder.build(samples, seed=_WARMUP_SEED)


@dataclass(frozen=True)
class RequestSource:
    """Where a run's requests come from: a named synthetic workload, or a ShareGPT file when given."""

    workload: str = "chat"
    num_requests: int = 100
    dataset: Path | None = None

    def __post_init__(self) -> None:
        if self.dataset is None:
            get_workload(self.workload)
        if self.num_requests < 1:
            raise ValueError(f"--num-requests must be at least 1, got {self.num_requests}")

    @property
    def label(self) -> str:
        return f"sharegpt:{self.dataset.name}" if self.dataset is not None else self.workload

    def make(self, builder: PromptBuilder, seed: int) -> list[BenchRequest]:
        if self.dataset is not None:
            return load_sharegpt(self.dataset, self.num_requests, seed, builder)
        return synthesize(get_workload(self.workload), self.num_requests, seed, builder)
