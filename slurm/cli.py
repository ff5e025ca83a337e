"""`pdbox slurm ...`: run the appliance on a Slurm cluster.

    pdbox slurm up --model M --prefill-nodes 1 --decode-nodes 1 --gpus-per-node 8   # prints "ready: URL"
    pdbox slurm up --prefill-nodes 1 --decode-nodes 1 --cpu      # the embedded model on CPU engines
    pdbox slurm status [--run ID]
    pdbox slurm down [--run ID]
    pdbox slurm script --model M ... > pdbox.sbatch && sbatch pdbox.sbatch

`up` starts the router (`appliance.serve.router_main`) on this machine, submits the prefill pool and
the decode pool as two submitit jobs (one `appliance.serve.worker` engine per Slurm rank, KV over tcp
between nodes), waits until every rank registered and the router routes to both roles, and returns
(the router keeps running detached; `down` stops it and cancels the jobs). Mount into the main CLI with
`main.add_command(slurm.cli.slurm)`; `python -m slurm.cli` runs it alone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import msgspec

from appliance.engine_flags import EngineFlags, engine_options
from slurm import commands, jobs, runstate
from slurm.jobs import PoolSpec
from slurm.messages import WorkerStatus
from slurm.registry import TOKEN_ENV


def _pool_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--model", default="", help="GGUF file or Hugging Face folder, on a path every node sees  "
                                                 "[default: the embedded SmolLM2-135M]"),
        click.option("--cpu", is_flag=True, help="CPU engines: no GPUs asked for, nothing pinned, each pool's "
                                                 "nodes allocated whole (--exclusive)"),
        click.option("--prefill-nodes", type=int, default=1, show_default=True),
        click.option("--decode-nodes", type=int, default=1, show_default=True),
        click.option("--gpus-per-node", type=int, default=0, show_default=True),
        click.option("--tasks-per-node", type=int, default=None,
                     help="ranks per node  [default: one per GPU, or 1]"),
        click.option("--cpus-per-task", type=int, default=1, show_default=True),
        click.option("--tp", type=int, default=None,
                     help="Slurm ranks per engine (only for --worker-cmd workers; the pdbox worker is one engine "
                          "per rank, with TP over the rank's GPUs)  [default: all ranks of a pool]"),
        click.option("--partition", default=None),
        click.option("--time", "time_min", type=int, default=24 * 60, show_default=True,
                     help="time limit in minutes"),
        click.option("--env", "env_pairs", multiple=True, metavar="KEY=VALUE", help="extra worker env"),
        click.option("--worker-cmd", envvar=commands.WORKER_CMD_ENV, default=None,
                     help="worker command template with {role} {model} {router} {python}  "
                          f"[default: slurm.commands.worker_argv; env ${commands.WORKER_CMD_ENV}]"),
    ]
    for option in reversed(options):
        f = option(f)
    return engine_options()(f)  # the pdbox worker's engine flags (not passed to a --worker-cmd worker)


def _specs(prefill_nodes: int, decode_nodes: int, gpus_per_node: int, tasks_per_node: int | None,
           cpus_per_task: int, tp: int | None, partition: str | None, time_min: int,
           env_pairs: tuple[str, ...], exclusive: bool = False) -> tuple[PoolSpec, PoolSpec]:
    env = {}
    for pair in env_pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--env")
        env[key] = value
    tasks = tasks_per_node or max(gpus_per_node, 1)
    try:
        return tuple(  # type: ignore[return-value]
            PoolSpec(name=role, role=role, nodes=nodes, tasks_per_node=tasks, gpus_per_node=gpus_per_node,
                     cpus_per_task=cpus_per_task, partition=partition, time_min=time_min, env=env, tp=tp,
                     sbatch={"exclusive": True} if exclusive else {})
            for role, nodes in (("prefill", prefill_nodes), ("decode", decode_nodes))
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from e


def _check_worker(template: str | None, cpu: bool, gpus_per_node: int, tp: int | None) -> int | None:
    """Validate the device options for the pdbox worker; returns the pool `tp` to use (1: one engine
    per Slurm rank) or `tp` unchanged for a --worker-cmd worker."""
    if template:
        return tp
    if cpu and gpus_per_node:
        raise click.UsageError("--cpu and --gpus-per-node exclude each other")
    if not cpu and not gpus_per_node:
        raise click.UsageError("give --gpus-per-node N (GPU engines) or --cpu (CPU engines)")
    if tp not in (None, 1):
        raise click.UsageError("--tp > 1 needs an engine spanning several Slurm ranks, which the pdbox worker does "
                               "not do: it runs TP over the GPUs of its own rank (set --tasks-per-node)")
    return 1


def _worker_argv(template: str | None, spec: PoolSpec, model: str, router_url: str, cpu: bool,
                 engine: EngineFlags) -> list[str]:
    if template:
        try:
            return commands.from_template(template, role=spec.role, model=model, router=router_url,
                                          python=sys.executable)
        except ValueError as e:
            raise click.UsageError(str(e)) from e
    gpus = spec.gpus_per_task or spec.gpus_per_node
    if spec.role == "decode" and gpus > 1:
        raise click.UsageError(f"a decode engine runs on one GPU, but each decode rank would see {gpus}: "
                               "give --tasks-per-node equal to --gpus-per-node")
    return commands.worker_argv(spec.role, model, router_url, cpu=cpu, gpus=gpus, engine=engine)


# ---- router process --------------------------------------------------------------------------------

def _proc_start(pid: int) -> int:
    """The kernel start time of `pid` (to tell it from a later process with the same pid); 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return 0 if fields[0] == "Z" else int(fields[19])


def _start_router(run_dir: Path, argv: list[str], token: str, timeout_s: float = 30.0) -> tuple[int, int]:
    """Start the router detached; returns (pid, bound port) once it wrote its port file."""
    port_file = run_dir / "router.port"
    with open(run_dir / "router.log", "ab") as out:
        proc = subprocess.Popen(argv, env={**os.environ, TOKEN_ENV: token}, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise click.ClickException(f"the router did not start: {' '.join(argv)}\n{_tail(run_dir / 'router.log')}")
        time.sleep(0.05)
    return proc.pid, int(port_file.read_text())


def _stop_router(state: runstate.RunState, started: int) -> None:
    pid = state.router_pid
    if not pid or not started or _proc_start(pid) != started:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _proc_start(pid) == started and time.monotonic() < deadline:
        time.sleep(0.05)
    if _proc_start(pid) == started:
        os.kill(pid, signal.SIGKILL)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} is missing)"


def _statuses(router_url: str, token: str) -> list[WorkerStatus]:
    req = urllib.request.Request(router_url + "/internal/workers", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=2) as resp:
        return msgspec.json.decode(resp.read(), type=list[WorkerStatus])


def _router_healthy(router_url: str) -> bool:
    """The router's GET /health answers 200: it routes to at least one engine of every role."""
    try:
        with urllib.request.urlopen(router_url + "/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _teardown(run_dir: Path, state: runstate.RunState, timeout_s: float = 60.0) -> runstate.RunState:
    """Cancel the run's jobs, wait until squeue no longer lists them, stop the router. The router goes
    last so that the workers can still deregister on their way out."""
    jobs.cancel(state.job_ids)
    deadline = time.monotonic() + timeout_s
    left = jobs.queued(state.job_ids)
    while left and time.monotonic() < deadline:
        time.sleep(0.3)
        left = jobs.queued(state.job_ids)
    _stop_router(state, _router_started(run_dir))
    if left:
        raise click.ClickException(f"jobs {', '.join(left)} still in the queue after {timeout_s:.0f}s")
    state = msgspec.structs.replace(state, status="down")
    runstate.save(run_dir, state)
    return state


def _router_started(run_dir: Path) -> int:
    try:
        return int((run_dir / "router.started").read_text())
    except (OSError, ValueError):
        return 0


# ---- commands --------------------------------------------------------------------------------------

@click.group()
def slurm() -> None:
    """Run pdbox on a Slurm cluster (router here, prefill and decode pools as Slurm jobs)."""


@slurm.command()
@_pool_options
@click.option("--host", default=None, help="address the workers reach the router at  [default: hostname]")
@click.option("--router-port", type=int, default=0, show_default=True, help="0: any free port")
@click.option("--router-cmd", envvar=commands.ROUTER_CMD_ENV, default=None,
              help="router command template with {host} {port} {port_file} {python}  "
                   f"[default: slurm.commands.router_argv; env ${commands.ROUTER_CMD_ENV}]")
@click.option("--timeout", "timeout_s", type=float, default=900, show_default=True,
              help="seconds to wait for every rank to register and be healthy")
@click.option("--run-root", type=click.Path(path_type=Path), default=None,
              help=f"shared directory for run state  [default: ${runstate.RUN_ROOT_ENV} or ~/.pdbox/runs]")
@click.option("--keep-on-failure", is_flag=True, help="leave jobs and router running when up fails")
def up(engine: EngineFlags, model: str, cpu: bool, prefill_nodes: int, decode_nodes: int, gpus_per_node: int,
       tasks_per_node: int | None, cpus_per_task: int, tp: int | None, partition: str | None, time_min: int,
       env_pairs: tuple[str, ...], worker_cmd: str | None, host: str | None, router_port: int,
       router_cmd: str | None, timeout_s: float, run_root: Path | None, keep_on_failure: bool) -> None:
    """Start the router, submit the prefill and decode pools, wait until all ranks serve."""
    tp = _check_worker(worker_cmd, cpu, gpus_per_node, tp)
    # NOTE: a CPU engine uses every core of its node (nothing is pinned), so with --cpu each pool takes
    # its nodes whole; that also keeps prefill and decode on different nodes.
    specs = _specs(prefill_nodes, decode_nodes, gpus_per_node, tasks_per_node, cpus_per_task, tp,
                   partition, time_min, env_pairs, exclusive=cpu and not worker_cmd)
    for spec in specs:  # usage errors before anything starts
        _worker_argv(worker_cmd, spec, model, "", cpu, engine)
    host = host or socket.gethostname()
    run_dir = runstate.new_run_dir(run_root)
    token = runstate.write_token(run_dir)
    state = runstate.RunState(run_id=run_dir.name, created=time.time())
    runstate.save(run_dir, state)
    click.echo(f"run {run_dir.name}: {run_dir}")
    try:
        port_file = str(run_dir / "router.port")
        argv = (commands.from_template(router_cmd, host="0.0.0.0", port=str(router_port), port_file=port_file,
                                       python=sys.executable) if router_cmd
                else commands.router_argv("0.0.0.0", router_port, port_file, model=model,
                                          page_size=engine["page_size"]))
        pid, port = _start_router(run_dir, argv, token)
        (run_dir / "router.started").write_text(str(_proc_start(pid)))
        router_url = f"http://{host}:{port}"
        state = msgspec.structs.replace(state, router_url=router_url, router_pid=pid)
        runstate.save(run_dir, state)
        click.echo(f"router: {router_url} (pid {pid})")
        for spec in specs:
            job = jobs.submit_pool(spec, _worker_argv(worker_cmd, spec, model, router_url, cpu, engine), run_dir,
                                   router_url=router_url, token=token)
            record = runstate.JobRecord(pool=spec.name, role=spec.role, job_id=str(job.job_id),
                                        num_tasks=spec.num_tasks)
            state = msgspec.structs.replace(state, jobs=(*state.jobs, record))
            runstate.save(run_dir, state)  # after every submit: `down` must find every job
            click.echo(f"{spec.role}: job {job.job_id} ({spec.nodes} node(s) x {spec.tasks_per_node} rank(s))")
        _wait_ready(run_dir, state, token, timeout_s)
    except (Exception, KeyboardInterrupt) as e:
        state = msgspec.structs.replace(runstate.load(run_dir), status="failed")
        runstate.save(run_dir, state)
        if not keep_on_failure:
            click.echo("up failed: cancelling the jobs and stopping the router", err=True)
            _teardown(run_dir, state)
            runstate.save(run_dir, msgspec.structs.replace(state, status="failed"))
        if isinstance(e, click.ClickException | KeyboardInterrupt):
            raise
        raise click.ClickException(f"{type(e).__name__}: {e}") from e
    runstate.save(run_dir, msgspec.structs.replace(state, status="ready"))
    click.echo(f"ready: {state.router_url}")


def _wait_ready(run_dir: Path, state: runstate.RunState, token: str, timeout_s: float) -> None:
    want = {j.role: j.num_tasks for j in state.jobs}
    deadline = time.monotonic() + timeout_s
    next_job_check = 0.0
    last = ""
    while True:
        try:
            statuses = _statuses(state.router_url, token)
        except OSError:
            statuses = []
        have = {role: sum(1 for s in statuses if s.healthy and s.info.role == role) for role in want}
        progress = ", ".join(f"{role} {have[role]}/{n}" for role, n in want.items())
        if progress != last:
            click.echo(f"healthy ranks: {progress}")
            last = progress
        if have == want and _router_healthy(state.router_url):
            return
        if time.monotonic() >= next_job_check:
            next_job_check = time.monotonic() + 2.0
            for record in state.jobs:
                js = jobs.job_states([record.job_id])[record.job_id]
                if not js.live and js.state != "UNKNOWN":
                    log = run_dir / "submitit" / record.pool / f"{record.job_id}_0_log.err"
                    raise click.ClickException(
                        f"{record.role} job {record.job_id} is {js.state}; {log}:\n{_tail(log)}")
        if time.monotonic() >= deadline:
            raise click.ClickException(f"not every rank is healthy after {timeout_s:.0f}s ({progress})")
        time.sleep(0.3)


_run_option = click.option("--run", default=None, help="run id or directory  [default: the latest run]")
_root_option = click.option("--run-root", type=click.Path(path_type=Path), default=None)


@slurm.command()
@_run_option
@_root_option
def down(run: str | None, run_root: Path | None) -> None:
    """Cancel the run's jobs and stop its router."""
    try:
        run_dir = runstate.resolve_run_dir(run, run_root)
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from e
    state = runstate.load(run_dir)
    _teardown(run_dir, state)
    click.echo(f"down: run {state.run_id} (jobs {', '.join(state.job_ids) or 'none'} cancelled)")


@slurm.command()
@_run_option
@_root_option
def status(run: str | None, run_root: Path | None) -> None:
    """Show the run's router, jobs and registered workers."""
    try:
        run_dir = runstate.resolve_run_dir(run, run_root)
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from e
    state = runstate.load(run_dir)
    router_alive = bool(state.router_pid) and _proc_start(state.router_pid) == _router_started(run_dir)
    click.echo(f"run {state.run_id}: {state.status}  ({run_dir})")
    click.echo(f"router {state.router_url or '-'}: {'running' if router_alive else 'stopped'}")
    for record, js in zip(state.jobs, jobs.job_states(state.job_ids).values(), strict=True):
        click.echo(f"  {record.role:8} job {record.job_id:>8}  {js.state:11} {js.nodes or js.reason}")
    if router_alive:
        try:
            statuses = _statuses(state.router_url, runstate.read_token(run_dir))
        except OSError as e:
            click.echo(f"workers: router did not answer ({e})")
            return
        click.echo(f"workers: {len(statuses)}")
        for s in statuses:
            i = s.info
            click.echo(f"  {i.role:8} rank {i.rank} job {i.job_id} on {i.node} {i.url} "
                       f"{'healthy' if s.healthy else 'UNHEALTHY'} restart={i.restart} gpus={i.devices or '-'}")


@slurm.command()
@_pool_options
@click.option("--run-root", default=None, help="shared directory for the job's files  [default: ~/.pdbox/runs]")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
def script(engine: EngineFlags, model: str, cpu: bool, prefill_nodes: int, decode_nodes: int, gpus_per_node: int,
           tasks_per_node: int | None, cpus_per_task: int, tp: int | None, partition: str | None, time_min: int,
           env_pairs: tuple[str, ...], worker_cmd: str | None, run_root: str | None, output: Path | None) -> None:
    """Print an sbatch script that runs router, prefill and decode in one allocation."""
    from slurm.script import ROUTER_URL, render_sbatch

    tp = _check_worker(worker_cmd, cpu, gpus_per_node, tp)
    prefill, decode = _specs(prefill_nodes, decode_nodes, gpus_per_node, tasks_per_node, cpus_per_task, tp,
                             partition, time_min, env_pairs)
    root = Path(run_root or runstate.runs_root()).absolute()
    root.mkdir(parents=True, exist_ok=True)  # Slurm does not create the directory of --output
    text = render_sbatch(
        prefill, decode,
        prefill_argv=_worker_argv(worker_cmd, prefill, model, ROUTER_URL, cpu, engine),
        decode_argv=_worker_argv(worker_cmd, decode, model, ROUTER_URL, cpu, engine),
        run_root=str(root),
        router_cmd=commands.router_argv("0.0.0.0", 0, "$RUN_DIR/router.port", model=model,
                                        page_size=engine["page_size"]),
    )
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
        click.echo(f"wrote {output}; submit with: sbatch {output}")


if __name__ == "__main__":
    slurm()
