"""A checkpoint's generation settings: its ``generation_config.json`` (end-of-sequence ids, sampling defaults).

The sampling defaults apply to what a request leaves unset, as vLLM does with ``--generation-config auto``:
the stated ``temperature``, ``top_p``, ``top_k`` and ``repetition_penalty`` are taken whatever ``do_sample``
says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.engine.request import REPETITION_PENALTY_RANGE
from appliance.model.errors import ModelLoadError

FALLBACK_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0}  # SamplingParams'



@dataclass(frozen=True)
class GenerationDefaults:
    """What ``generation_config.json`` states; ``None``: it does not say."""

    eos_token_ids: tuple[int, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None

    def sampling(self, **request: Any) -> dict[str, Any]:
        """``temperature``, ``top_p``, ``top_k``, ``repetition_penalty`` for a request: its own values where
        set (not None), else the checkpoint's, else pdbox's fallbacks."""
        out = {}
        for name, fallback in FALLBACK_SAMPLING.items():
            value = request.get(name)
            if value is None:
                value = getattr(self, name)
            out[name] = fallback if value is None else value
        if out["top_k"] == 0:  # transformers' "off"
            out["top_k"] = -1
        return out


def eos_ids(value: Any, source: str) -> tuple[int, ...]:
    """``eos_token_id`` as a tuple: an int, a list of ints, or absent."""
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ModelLoadError(f"{source}: eos_token_id must be an integer or a list of integers, got {value!r}")
    return tuple(values)


def read_generation_config(folder: str | Path) -> GenerationDefaults:
    """``folder/generation_config.json``, or empty defaults when the folder has none."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return GenerationDefaults()
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: invalid JSON ({exc})") from exc

    def number(key: str, kind: type) -> Any:
        v = raw.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ModelLoadError(f"{path}: {key} must be a number, got {v!r}")
        return kind(v)

    penalty = number("repetition_penalty", float)
    lo, hi = REPETITION_PENALTY_RANGE
    if penalty is not None and not lo <= penalty <= hi:
        raise ModelLoadError(f"{path}: repetition_penalty must be in [{lo:g}, {hi:g}], got {penalty}")
    return GenerationDefaults(eos_token_ids=eos_ids(raw.get("eos_token_id"), str(path)),
                              temperature=number("temperature", float), top_p=number("top_p", float),
                              top_k=number("top_k", int), repetition_penalty=penalty)


def merge_ids(*groups: tuple[int, ...]) -> tuple[int, ...]:
    """The ids of every group, first-seen order, no repeats."""
    return tuple(dict.fromkeys(i for g in groups for i in g))
