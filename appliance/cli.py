"""The `pdbox` command line."""

from __future__ import annotations

import sys

import click


class CliError(click.ClickException):
    """A one-line error for the user; no traceback."""

    def show(self, file=None) -> None:  # type: ignore[override]
        click.echo(f"error: {self.format_message()}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pdbox")
def main() -> None:
    """pdbox: a prefill/decode-disaggregated LLM serving appliance."""


@main.command()
@click.argument("prompt")
@click.option("--max-tokens", default=64, show_default=True, help="Tokens to generate at most.")
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--top-k", default=-1, show_default=True)
@click.option("--seed", default=None, type=int, help="Seed for sampling.")
@click.option("--model", default=None, help="GGUF file or Hugging Face folder (default: embedded SmolLM2-135M).")
@click.option("--tp", default=1, show_default=True, help="Tensor-parallel ranks (processes).")
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(["bfloat16", "float32", "float16"]))
@click.option("--threads", default=0, help="Torch threads (0 = torch's default).")
@click.option("--attention-backend", default="auto", type=click.Choice(["auto", "torch", "triton"]))
@click.option("--raw", is_flag=True, help="Do not apply the chat template.")
def generate(prompt: str, max_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None,
             model: str | None, tp: int, dtype: str, threads: int, attention_backend: str, raw: bool) -> None:
    """Generate a completion for PROMPT and print only its text."""
    try:
        from appliance.config import EngineConfig
        from appliance.engine.request import SamplingParams
        from appliance.llm import LLM

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed)
        cfg = EngineConfig(dtype=dtype, tp_size=tp, threads=threads, attention_backend=attention_backend)
        with LLM(model, cfg) as llm:
            if raw:
                out = llm.generate(prompt, params)
            else:
                out = llm.chat([{"role": "user", "content": prompt}], params)
    except (ValueError, OSError) as exc:
        raise CliError(str(exc)) from None
    sys.stdout.write(out[0].text + "\n")


if __name__ == "__main__":
    main()
