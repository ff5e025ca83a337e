"""pdbox: a prefill/decode-disaggregated LLM serving appliance."""

from __future__ import annotations

from typing import Any

__all__ = ["LLM", "SamplingParams", "EngineConfig"]


def __getattr__(name: str) -> Any:  # lazy: `import appliance` must not import torch
    if name == "LLM":
        from appliance.llm import LLM

        return LLM
    if name == "SamplingParams":
        from appliance.engine.request import SamplingParams

        return SamplingParams
    if name == "EngineConfig":
        from appliance.config import EngineConfig

        return EngineConfig
    raise AttributeError(name)
