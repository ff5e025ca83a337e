"""Serving check of the GPU device check: a disaggregated `pdbox up` answers the openai client with the
same greedy answers as unified mode, on a random-weight Llama-shaped model written here from a seed
(the SmolLM2 GGUF cannot travel to a lent machine).

    python3 scripts/serve_check.py --prefill-gpus 0 --decode-gpus 0 --transport cuda_ipc --out r.json

``--cpu`` runs the same comparison on CPU cores with the shm transport (a local smoke test of this
script). Exit 0 when every answer matches, 1 otherwise; the JSON report names each answer pair.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ("The quick brown fox", "In a distant galaxy, long ago,", "1, 2, 3, 4,", "Paris is the capital of")


@dataclass(frozen=True)
class Report:
    transport: str
    disagg_flags: tuple[str, ...]
    unified_flags: tuple[str, ...]
    unified: tuple[str, ...]
    disagg: tuple[str, ...]
    matches: tuple[bool, ...]       # per prompt (TP 2 against a TP 1 baseline may differ in the last bits)
    equal: bool
    seconds: float


def answers(url: str, max_tokens: int) -> tuple[str, ...]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60)
    model = client.models.list().data[0].id
    out = []
    for prompt in PROMPTS:  # one at a time: both modes see the same batches
        r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        out.append(r.choices[0].text)
    return tuple(out)


@click.command(help=__doc__.split("\n\n")[0], context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--prefill-gpus", default="0")
@click.option("--decode-gpus", default="0")
@click.option("--prefill-tp", type=int, default=1)
@click.option("--transport", default="cuda_ipc")
@click.option("--cpu", is_flag=True, help="CPU cores and the given CPU transport (smoke test)")
@click.option("--max-tokens", type=int, default=16)
@click.option("--out", type=click.Path(path_type=Path))
@click.option("--log-dir", type=click.Path(path_type=Path))
def command(prefill_gpus: str, decode_gpus: str, prefill_tp: int, transport: str, cpu: bool, max_tokens: int,
            out: Path | None, log_dir: Path | None) -> int:
    from appliance.model.tiny import write_tiny_model
    from tests.serve.appliance_proc import running_appliance

    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="pdbox-serve-check-"))
    model = write_tiny_model(work / "llama-seed0", seed=0, layers=4, hidden=256, heads=4, kv_heads=2,
                             intermediate=512)  # head_dim 64, as the Llama family
    common = ("--model", str(model), "--dtype", "float32", "--kv-cache-mb", "64", "--no-monitor")
    if cpu:
        unified = ("--mode", "unified", "--cpus", "0", *common)
        disagg = ("--mode", "disagg", "--prefill-cpus", "0", "--decode-cpus", "0", "--transport", transport,
                  *common)
    else:
        unified = ("--mode", "unified", "--gpus", prefill_gpus.split(",")[0].split("-")[0], *common)
        disagg = ("--mode", "disagg", "--prefill-gpus", prefill_gpus, "--decode-gpus", decode_gpus,
                  "--prefill-tp", str(prefill_tp), "--transport", transport, *common)
    logs = log_dir or work
    try:
        with running_appliance(*unified, log_dir=logs / "unified") as url:
            want = answers(url, max_tokens)
        if out:  # NOTE: unified mode's answers now, in case the disaggregated run is cut off
            out.write_text(json.dumps({"partial": "unified mode only", "unified": unified, "want": want}, indent=1))
        with running_appliance(*disagg, log_dir=logs / "disagg") as url:
            got = answers(url, max_tokens)
    finally:
        shutil.rmtree(work if log_dir else work / "llama-seed0", ignore_errors=True)  # keep logs made here
    report = Report(transport, disagg, unified, want, got, tuple(a == b for a, b in zip(want, got)), want == got,
                    round(time.monotonic() - t0, 1))
    text = json.dumps(asdict(report), indent=1)
    print(text)
    if out:
        out.write_text(text)
    return 0 if report.equal else 1


def main(argv: list[str] | None = None) -> int:
    """The exit status of ``python3 scripts/serve_check.py ARGS`` (2: a bad option)."""
    from appliance.cli_support import run_command

    return run_command(command, argv)


if __name__ == "__main__":
    sys.exit(main())
