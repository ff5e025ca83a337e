"""The `pdbox` command line."""

from __future__ import annotations

import sys

import click

from appliance.cli_support import CliError, LazyGroup
from appliance.engine_flags import EngineFlags, config_options, engine_options, flagged_fields
from appliance.serve.router_config import AutoConfig, RouterConfig


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]},
             lazy={"bench": "bench.cli:bench", "monitor": "appliance.monitor.cli:monitor", "slurm": "slurm.cli:slurm"})
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
@engine_options(only=("dtype", "attention_backend"))
@click.option("--threads", default=0, help="Torch threads (0 = torch's default).")
@click.option("--raw", is_flag=True, help="Do not apply the chat template.")
def generate(engine: EngineFlags, prompt: str, max_tokens: int, temperature: float, top_p: float, top_k: int,
             seed: int | None, model: str | None, tp: int, threads: int, raw: bool) -> None:
    """Generate a completion for PROMPT and print only its text."""
    try:
        from appliance.engine.request import SamplingParams
        from appliance.engine_flags import engine_config
        from appliance.llm import LLM

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed)
        cfg = engine_config(engine, tp_size=tp, threads=threads)
        with LLM(model, cfg) as llm:
            if raw:
                out = llm.generate(prompt, params)
            else:
                out = llm.chat([{"role": "user", "content": prompt}], params)
    except (ValueError, OSError) as exc:
        raise CliError(str(exc)) from None
    sys.stdout.write(out[0].text + "\n")


@main.command()
@click.option("--mode", default="auto", show_default=True, type=click.Choice(["disagg", "unified", "auto"]),
              help="auto: every engine can prefill and decode; the router decides per request and rebalances.")
@click.option("--model", default=None, help="GGUF file or Hugging Face folder (default: embedded SmolLM2-135M).")
@config_options(RouterConfig, ("served_model_name", "host", "port"))
@click.option("--prefill-gpus", default="", help='GPU ids for prefill engines, e.g. "0-3".')
@click.option("--decode-gpus", default="", help='GPU ids for decode engines, e.g. "4-7".')
@click.option("--prefill-tp", default=1, show_default=True,
              help="TP size of each prefill engine (--mode disagg: auto mode's engines decode too, on one rank).")
@click.option("--decode-tp", default=1, show_default=True, help="TP size of each decode engine: 1 (one rank).")
@click.option("--gpus", default="", help="GPU ids for unified engines.")
@click.option("--tp", default=1, show_default=True, help="TP size of each unified engine.")
@click.option("--prefill-cpus", default="", help="CPU cores for the prefill worker (CPU mode).")
@click.option("--decode-cpus", default="", help="CPU cores for the decode worker (CPU mode).")
@click.option("--cpus", default="", help="CPU cores for unified engines (CPU mode).")
@click.option("--cores-per-engine", default=0, help="Unified on CPU: cores (threads) of each engine; 0: one engine "
              "per core (per --tp cores with --tp). `--cpus 0-1 --cores-per-engine 2`: one engine on both cores.")
@click.option("--share-cores/--no-share-cores", default=True, show_default=True,
              help="CPU: engines pair up (0+1, 2+3 …) and each borrows the other's cores while it has no work.")
@click.option("--transport", default="auto", show_default=True,
              type=click.Choice(["auto", "nvshmem", "cuda_ipc", "shm", "tcp"]))
@config_options(RouterConfig, ("api_key",))
@engine_options()
@config_options(RouterConfig, ("prefill_policy", "decode_policy", "lease_s", "max_inflight", "responses_store"))
@click.option("--log-dir", default="", help="Where worker logs go (default: a new temp folder).")
@click.option("--monitor/--no-monitor", default=True, show_default=True,
              help="On a terminal, show start-up progress and then the live dashboard.")
@config_options(AutoConfig)  # the auto-mode options
def up(**kw) -> None:
    """Serve an OpenAI-compatible endpoint with prefill and decode on separate devices."""
    import asyncio

    from appliance.launcher import Launcher, UpConfig

    try:
        auto = AutoConfig(**{name: kw.pop(name) for name in flagged_fields(AutoConfig)})  # names a bad option
        launcher = Launcher(UpConfig(auto=auto, **kw))
        asyncio.run(launcher.serve())
    except (ValueError, RuntimeError, OSError) as exc:
        raise CliError(str(exc)) from None


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def doctor(as_json: bool) -> None:
    """Devices, KV transports and kernels available here, and why any was passed over."""
    import json

    from appliance.doctor import render, report

    rep = report()
    click.echo(json.dumps(rep, indent=1) if as_json else render(rep))


if __name__ == "__main__":
    main()
