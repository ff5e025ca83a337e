"""bench.engine on CPU: every figure of a small run, the prompt prefilled whole or in chunks, bad options named."""

from __future__ import annotations

import pytest

from appliance.model.loader import load_tokenizer
from bench.engine import main, prompt_tokens, run


@pytest.mark.parametrize("chunk", [0, 32])
def test_a_small_run_gives_every_figure(chunk: int) -> None:
    got = run(None, threads=1, dtype="auto", steps=2, prefill_len=96, long_batch=2, prefill_chunk=chunk)
    assert got["prefill_tokens"] == 96 and got["prefill_chunk"] == (chunk or 96)
    assert got["prefill_tok_s"] > 0 and got["prefill_floor_tok_s"] > 0
    assert got["decode_ms_per_token_b1"] > 0 and got["decode_ms_per_step_b16"] > 0
    assert got["decode_ms_per_step_b2_ctx96"] > 0


def test_the_prompt_grows_with_the_prefill_length() -> None:
    """The bench's text is long enough for a 4K prompt (it once stopped at ~3.3K tokens)."""
    tok = load_tokenizer(None)[0]
    assert len(prompt_tokens(tok, 4096)) == 4096
    assert prompt_tokens(tok, 1024) == prompt_tokens(tok, 4096)[:1024]  # the 1K figure's prompt is unchanged


def test_a_negative_chunk_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--prefill-chunk", "-1"]) == 2
    assert "--prefill-chunk" in capsys.readouterr().err
