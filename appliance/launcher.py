"""`pdbox up`: start the workers and the router on one node, supervise them, stop them cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from appliance.cpu_load import busy_cores_line, worker_cpus
from appliance.engine.core_share import make_board, mark_idle
from appliance.engine_flags import EngineFlags, engine_argv
from appliance.gpu_peers import PeerAccess, choose_transport, handoff_pairs, peer_access
from appliance.gpu_plan import PEER_DEVICES_ENV, RANK_DEVICES_ENV, GpuGroup, parse_visible, plan_gpus
from appliance.nvshmem_job import plan_job
from appliance.serve.router_config import AutoConfig, RouterConfig
from appliance.topology import available_cpus, format_ids, parse_ids, split_groups

READY_TIMEOUT_S = 300.0
CRASH_WINDOW_S = 30.0   # a worker that exits sooner than this after its start counts as crash-looping
MAX_BACKOFF_S = 30.0
# A worker whose process has not answered /health for this long (SIGSTOP, a frozen host) is killed, then
# restarted as if it had exited. NOTE: with the probe's interval and timeout (1 s each) it stays under the
# decode side's HANDOFF_QUIET_MAX_S (10 s, appliance/serve/engine_loop.py): by then a decode pool reuses a
# failed room's pages even if a writer never said it stopped, and a prefill frozen mid-write (before it read
# the room's Cancel), its copies one-sided, would write into them on waking. Long enough that a worker
# marked down for silence (3 s) and woken at once comes back as it was. An NVSHMEM PE is left alone (a job
# cannot take a PE back).
HUNG_KILL_S = 7.0


@dataclass(frozen=True)
class UpConfig:
    """`pdbox up`'s settings; ``engine``: the engine flags every worker gets (`appliance.engine_flags`); the
    router's settings default as in `RouterConfig`; ``auto``: the adaptive router's (``--mode auto``)."""

    mode: str = "disagg"
    model: str | None = None
    served_model_name: str = ""  # "": the model's name
    host: str = RouterConfig.host
    port: int = RouterConfig.port
    prefill_gpus: str = ""
    decode_gpus: str = ""
    prefill_tp: int = 1
    decode_tp: int = 1
    gpus: str = ""
    tp: int = 1
    prefill_cpus: str = ""
    decode_cpus: str = ""
    cpus: str = ""
    cores_per_engine: int = 0  # unified on CPU: cores (torch threads) of each engine; 0: 1, or --tp
    share_cores: bool = True  # CPU, TP 1: engines 0+1, 2+3 … borrow each other's cores while the other idles
    transport: str = "auto"
    api_key: str = RouterConfig.api_key
    engine: EngineFlags = field(default_factory=EngineFlags)
    prefill_policy: str = RouterConfig.prefill_policy
    decode_policy: str = RouterConfig.decode_policy
    lease_s: float = RouterConfig.lease_s
    log_dir: str = ""
    max_inflight: int = RouterConfig.max_inflight
    responses_store: int = RouterConfig.responses_store
    auto: AutoConfig = AutoConfig()  # --mode auto's settings (pdbox up's options from its flagged fields)
    monitor: bool = True  # on a TTY: start-up progress, then the live dashboard

    def __post_init__(self) -> None:
        if self.mode not in ("disagg", "unified", "auto"):
            raise ValueError(f"--mode must be disagg, unified or auto, got {self.mode!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        if self.cores_per_engine < 0 or (self.cores_per_engine and self.cores_per_engine % self.tp):
            raise ValueError(f"--cores-per-engine must be a multiple of --tp ({self.tp}), got {self.cores_per_engine}")
        # NOTE: here, not in each worker: a worker refusing its TP size would crash, be restarted, and crash again
        if self.decode_tp != 1:
            raise ValueError(f"--decode-tp must be 1, got {self.decode_tp}: a decode engine runs one rank "
                             "(use more decode GPUs for more decode engines; prefill may use any --prefill-tp)")
        if self.mode == "auto" and self.prefill_tp != 1:
            raise ValueError(f"--mode auto needs --prefill-tp 1, got {self.prefill_tp}: every engine of auto mode "
                             "decodes too, on one rank (--mode disagg takes a larger --prefill-tp)")


@dataclass
class WorkerSpec:
    name: str
    role: str
    argv: list[str]
    env: dict[str, str]
    devices: str
    port: int
    proc: subprocess.Popen | None = None
    restarts: int = 0
    log_path: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


# One node: NVSHMEM's unique-id bootstrap listens on loopback (not an interface the other PEs may not reach,
# such as a container bridge) and probes no InfiniBand; peers on one node use P2P regardless.
SINGLE_NODE_NVSHMEM = {"NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "lo", "NVSHMEM_REMOTE_TRANSPORT": "none"}


def plan_workers(cfg: UpConfig, token: str, run_id: str, run_dir: Path | None = None,
                 ask_peers: PeerAccess | None = None, say: Callable[[str], None] | None = None
                 ) -> tuple[list[WorkerSpec], str]:
    """Turn device flags into worker specs. Returns the specs and the transport chosen. ``run_dir``
    (the run's log folder) holds the NVSHMEM unique id when the transport is nvshmem. ``ask_peers``
    (`appliance.gpu_peers.peer_access`; None: not asked) checks that GPUs handing KV to each other have
    peer access for a GPU transport; ``say`` gets the line when that changes the transport."""
    from appliance.engine.tp import free_port

    gpu_flags = cfg.prefill_gpus or cfg.decode_gpus or cfg.gpus
    use_gpu = bool(gpu_flags) or _cuda_count() > 0
    groups: list[tuple[str, list[int], int]] = []  # (role, ids, tp)
    if use_gpu:
        n = _cuda_count()
        if cfg.mode == "unified":
            ids = parse_ids(cfg.gpus) if cfg.gpus else list(range(n))
            groups = [("unified", g, cfg.tp) for g in split_groups(ids, cfg.tp, "--gpus")]
        else:
            pre = parse_ids(cfg.prefill_gpus) if cfg.prefill_gpus else []
            dec = parse_ids(cfg.decode_gpus) if cfg.decode_gpus else []
            if not (pre or dec):  # the first half prefills, the rest decodes (one GPU: both on it)
                half = max(1, n // 2)
                pre, dec = list(range(half)), list(range(half, n)) or list(range(half))
            elif not dec:  # one side named: the other takes the GPUs it left (all of them shared when none)
                dec = [i for i in range(n) if i not in pre] or pre
            elif not pre:
                pre = [i for i in range(n) if i not in dec] or dec
            groups = [("prefill", g, cfg.prefill_tp) for g in split_groups(pre, cfg.prefill_tp, "--prefill-gpus")]
            groups += [("decode", g, cfg.decode_tp) for g in split_groups(dec, cfg.decode_tp, "--decode-gpus")]
    else:
        cores = available_cpus()
        if cfg.mode == "unified":
            ids = parse_ids(cfg.cpus) if cfg.cpus else cores
            size = cfg.cores_per_engine or (cfg.tp if cfg.cpus or cfg.tp > 1 else 1)
            groups = [("unified", g, cfg.tp) for g in split_groups(ids, size, "--cpus")]
        else:
            half = max(1, len(cores) // 2)
            pre = parse_ids(cfg.prefill_cpus) if cfg.prefill_cpus else cores[:half]
            dec = parse_ids(cfg.decode_cpus) if cfg.decode_cpus else (cores[half:] or cores[:1])
            groups = [("prefill", pre, cfg.prefill_tp), ("decode", dec, cfg.decode_tp)]
    transport = cfg.transport
    if cfg.mode in ("disagg", "auto") and transport == "auto":
        from nvshmem_kv import probe

        transport = probe("cuda" if use_gpu else "cpu").backend
    specs = []
    counts: dict[str, int] = {}
    names = []
    for leaning, _, _ in groups:
        k = counts.get(leaning, 0)
        counts[leaning] = k + 1
        names.append(f"{leaning}-{k}")
    gpu_groups = [GpuGroup(n, leaning, tuple(ids)) for n, (leaning, ids, _) in zip(names, groups)]
    if use_gpu and ask_peers is not None and cfg.mode != "unified":
        transport, line = choose_transport(transport, cfg.transport != "auto", handoff_pairs(cfg.mode, gpu_groups),
                                           ask_peers)
        if line and say is not None:
            say(line)
    gpu_plans = plan_gpus(gpu_groups, cfg.mode, parse_visible(os.environ.get("CUDA_VISIBLE_DEVICES"))) \
        if use_gpu else ()
    partners = core_partners(cfg, groups, run_dir) if not use_gpu else {}
    pe_jobs = {}
    if transport == "nvshmem" and cfg.mode != "unified":   # every prefill and decode rank is a PE
        if run_dir is None:
            raise ValueError("the nvshmem transport needs the run's folder for its unique id")
        pe_jobs = plan_job([(n, tp) for n, (_, _, tp) in zip(names, groups)], run_dir, run_id,
                           cfg.engine["kv_cache_mb"] << 20)
    for i, (leaning, ids, tp) in enumerate(groups):
        name = names[i]
        role = "auto" if cfg.mode == "auto" else leaning  # auto: every engine can prefill, decode, hand over
        port = free_port()
        argv = [sys.executable, "-m", "appliance.serve.worker", "--role", role, "--name", name, "--port", str(port),
                "--tp", str(tp), "--run-id", run_id, *engine_argv(cfg.engine)]
        if cfg.model:
            argv += ["--model", str(cfg.model)]
        if role != "unified":
            argv += ["--transport", transport]
        env = dict(os.environ, PDBOX_CLUSTER_TOKEN=token)
        if name in pe_jobs:
            env.update(pe_jobs[name].to_env())
            for key, value in SINGLE_NODE_NVSHMEM.items():  # the user's own settings win
                env.setdefault(key, value)
        extra: dict = {"leaning": leaning, "nvshmem_pe": name in pe_jobs}
        if use_gpu:
            view = gpu_plans[i]  # own GPUs first (rank r on local r), then the pools it pushes into
            env["CUDA_VISIBLE_DEVICES"] = view.cuda_visible_devices
            env[RANK_DEVICES_ENV] = ",".join(map(str, view.rank_devices))
            env[PEER_DEVICES_ENV] = view.peer_env()
            argv += ["--device", "cuda", "--devices", format_ids(ids)]
            devices = "gpu:" + format_ids(ids)
        else:
            argv += ["--cpus", format_ids(ids)]
            devices = "cpu:" + format_ids(ids)
            if i in partners:
                board, j = partners[i]
                argv += ["--core-board", str(board), "--core-slot", str(i), "--partner-slot", str(j),
                         "--partner-cpus", format_ids(groups[j][1])]
                extra["core_slot"] = (board, i)  # cleared when the process is gone (see supervise)
        specs.append(WorkerSpec(name=name, role=role, argv=argv, env=env, devices=devices, port=port, extra=extra))
    return specs, transport


def core_partners(cfg: UpConfig, groups: list[tuple[str, list[int], int]],
                  run_dir: Path | None) -> dict[int, tuple[Path, int]]:
    """CPU engines paired in order (0 with 1, 2 with 3 …): engine -> (the board file, its partner's index).
    Empty when sharing is off, some engine runs TP (its ranks are processes of their own), or one engine
    holds every core; a pair that shares a core (a one-core machine's prefill and decode) is left out.
    Writes the board (every engine idle) into the run's folder."""
    if not cfg.share_cores or len(groups) < 2 or any(tp > 1 for _, _, tp in groups):
        return {}
    if run_dir is None:
        raise ValueError("core sharing needs the run's folder for its board (or --no-share-cores)")
    board = run_dir / "cores.board"
    make_board(board, len(groups))
    return {i: (board, i ^ 1) for i in range(len(groups))
            if i ^ 1 < len(groups) and not set(groups[i][1]) & set(groups[i ^ 1][1])}  # one core: nothing to lend


class Launcher:
    """Owns the worker processes and the in-process router."""

    def __init__(self, cfg: UpConfig, out=sys.stdout, err=sys.stderr) -> None:
        self.cfg = cfg
        self.out, self.err = out, err
        self.run_id = f"pdbox-{os.getpid()}-{secrets.token_hex(3)}"
        self.token = secrets.token_urlsafe(24)
        self.log_dir = Path(cfg.log_dir) if cfg.log_dir else Path(tempfile.mkdtemp(prefix=f"{self.run_id}-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.specs, self.transport = plan_workers(cfg, self.token, self.run_id, self.log_dir, peer_access, self.say)
        self.stopping = False
        self.fatal: str | None = None  # why the appliance stopped itself (`serve` raises it at the end)
        self.router = None

    def say(self, msg: str) -> None:
        print(msg, file=self.err, flush=True)

    def start(self, spec: WorkerSpec) -> None:
        spec.extra["started_at"] = time.monotonic()
        spec.log_path = self.log_dir / f"{spec.name}.log"
        log = open(spec.log_path, "ab")
        spec.proc = subprocess.Popen(spec.argv, env=spec.env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()

    def tail(self, spec: WorkerSpec, n: int = 15) -> str:
        try:
            lines = spec.log_path.read_text(errors="replace").splitlines() if spec.log_path else []
        except OSError:
            return ""
        return "\n".join("    " + ln for ln in lines[-n:])

    async def wait_healthy(self, specs: list[WorkerSpec], timeout_s: float) -> None:
        import aiohttp

        deadline = time.monotonic() + timeout_s
        pending = list(specs)
        async with aiohttp.ClientSession() as s:
            while pending:
                for spec in list(pending):
                    if spec.proc is not None and spec.proc.poll() is not None:
                        raise RuntimeError(f"worker {spec.name} exited with code {spec.proc.returncode} while "
                                           f"starting; its log ({spec.log_path}):\n{self.tail(spec)}")
                    try:
                        async with s.get(spec.url + "/health", timeout=aiohttp.ClientTimeout(total=1.0)) as r:
                            if r.status == 200:
                                pending.remove(spec)
                    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                        pass
                if time.monotonic() > deadline:
                    names = ", ".join(s.name for s in pending)
                    raise RuntimeError(f"workers not healthy after {timeout_s:.0f} s: {names}")
                if pending:
                    await asyncio.sleep(0.25)

    async def warmup_line(self) -> str:
        """How long each engine's start-up warm-up took (read from its ``/load``); '' on CPU."""
        import aiohttp

        from appliance.serve.load_report import decode_load, warmup_summary

        reports = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as s:
            for spec in self.specs:
                try:
                    async with s.get(spec.url + "/load") as r:
                        reports.append(decode_load(await r.read()))
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
                    pass  # the line is informative only: an engine that does not answer is left out
        return warmup_summary(reports)

    def build_router(self):
        from appliance.model.loader import load_generation_defaults, load_tokenizer
        from appliance.serve.policies import WorkerHandle
        from appliance.serve.router import Router

        tok, vocab, name = load_tokenizer(self.cfg.model)
        rcfg = RouterConfig(mode=self.cfg.mode, served_model_name=self.cfg.served_model_name or name,
                            host=self.cfg.host, port=self.cfg.port, api_key=self.cfg.api_key,
                            cluster_token=self.token, prefill_policy=self.cfg.prefill_policy,
                            decode_policy=self.cfg.decode_policy, lease_s=self.cfg.lease_s,
                            page_size=self.cfg.engine["page_size"], max_inflight=self.cfg.max_inflight,
                            responses_store=self.cfg.responses_store,
                            generation=load_generation_defaults(self.cfg.model))
        prefill = tuple(s.name for s in self.specs if s.extra.get("leaning") == "prefill")  # they start so
        auto = replace(self.cfg.auto, initial_prefill=prefill) if self.cfg.mode == "auto" else None
        router = Router(rcfg, tok, vocab, auto=auto)
        for spec in self.specs:
            router.pool.add(WorkerHandle(name=spec.name, role=spec.role, url=spec.url, devices=spec.devices,
                                         transport=self.transport if spec.role != "unified" else ""))
        return router

    async def supervise(self, stop: asyncio.Event | None = None) -> None:
        """Restart workers that exit, and kill (to restart) those frozen for ``HUNG_KILL_S``. One that keeps
        dying within ``CRASH_WINDOW_S`` of its start waits 1, 2, 4 … (at most ``MAX_BACKOFF_S``) seconds
        before the next start, instead of spinning.
        An NVSHMEM PE is not restarted: a running job cannot take a PE back (a new one would wait in the
        collective start-up forever, and the others hold the dead one's heap): every worker stops, and
        ``stop`` is set with `fatal` saying why."""
        while not self.stopping:
            now = time.monotonic()
            for spec in self.specs:
                if self.stopping or spec.proc is None:
                    continue
                if spec.proc.poll() is None:
                    self._kill_if_frozen(spec, now)
                    continue
                due = spec.extra.get("restart_at")
                if due is None and spec.extra.get("nvshmem_pe"):
                    self.fatal = (f"worker {spec.name} (an NVSHMEM PE) exited with code {spec.proc.returncode}: a "
                                  "running NVSHMEM job cannot take a PE back, so every worker stops; start pdbox "
                                  "up again (or use --transport cuda_ipc, whose workers restart alone)")
                    self.say(self.fatal)
                    self.stopping = True
                    if stop is not None:
                        stop.set()
                    return
                if due is None:
                    code = spec.proc.returncode
                    quick = now - spec.extra.get("started_at", now) < CRASH_WINDOW_S
                    crashes = spec.extra["crashes"] = spec.extra.get("crashes", 0) + 1 if quick else 0
                    delay = min(MAX_BACKOFF_S, 2.0 ** (crashes - 1)) if crashes else 0.0
                    self.say(f"worker {spec.name} (pid {spec.proc.pid}) exited with code {code}; "
                             f"its requests fail; restarting it" + (f" in {delay:.0f} s" if delay else ""))
                    w = self.router.pool.workers.get(spec.name) if self.router else None
                    if w is not None:
                        self.router.pool.mark_down(spec.name, f"process exited with code {code}")  # fails its requests
                        w.restarts += 1
                    spec.restarts += 1
                    if "core_slot" in spec.extra:  # a process that died busy would keep its partner off its cores
                        mark_idle(*spec.extra["core_slot"])
                    due = spec.extra["restart_at"] = now + delay
                if now >= due:
                    del spec.extra["restart_at"]
                    self.start(spec)
            await asyncio.sleep(0.3)

    def _kill_if_frozen(self, spec: WorkerSpec, now: float) -> None:
        """SIGKILL ``spec``'s process when it has answered nothing to /health for ``HUNG_KILL_S`` since it was
        last heard (a process not heard since its start is loading, not frozen); `supervise` restarts it."""
        w = self.router.pool.workers.get(spec.name) if self.router else None
        if w is None or w.healthy or spec.extra.get("nvshmem_pe") or spec.proc is None:
            return
        heard = max(w.last_heard, w.last_seen)
        if heard <= spec.extra.get("started_at", now) or now - heard < HUNG_KILL_S:
            return
        self.say(f"worker {spec.name} (pid {spec.proc.pid}) has answered nothing for {now - heard:.0f} s: killing "
                 "it (a frozen prefill could wake and write KV pages decode has given to other requests)")
        spec.proc.kill()

    async def serve(self, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> None:
        from aiohttp import web

        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        runner = None
        sup = None
        fg = None
        if self.cfg.monitor and self.out.isatty():
            from appliance.monitor.live import Foreground

            fg = Foreground(self)
        logs = self._router_logging()
        try:
            self.say(f"pdbox: mode={self.cfg.mode} transport={self.transport if self.cfg.mode != 'unified' else '-'} "
                     f"workers={', '.join(f'{s.name}[{s.devices}]' for s in self.specs)} logs={self.log_dir}")
            if line := await asyncio.to_thread(busy_cores_line, worker_cpus([s.devices for s in self.specs])):
                self.say(line)  # before the engines start: only other work is counted
            for spec in self.specs:
                self.start(spec)
            if fg is not None:
                fg.start()
            waiter = asyncio.create_task(self.wait_healthy(self.specs, READY_TIMEOUT_S))
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                waiter.cancel()
                return
            stopper.cancel()
            waiter.result()
            if line := await self.warmup_line():
                self.say(line)
            self.router = self.build_router()
            runner = web.AppRunner(self.router.app(), handler_cancellation=True, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, self.cfg.host, self.cfg.port)
            await site.start()
            print(f"ready: http://{self.cfg.host}:{self.cfg.port}", file=self.out, flush=True)
            if ready is not None:
                ready.set()
            if fg is not None:
                fg.ready()
            sup = asyncio.create_task(self.supervise(stop))
            await stop.wait()
        finally:
            if fg is not None:
                await fg.close()
            self.stopping = True
            if sup is not None:
                sup.cancel()
            if runner is not None:
                await runner.cleanup()
            await asyncio.to_thread(self.stop_workers)
            logs()
        if self.fatal:
            raise RuntimeError(self.fatal)

    def _router_logging(self):
        """The router's own lines (decisions, role switches, moves, retries) go to ``router.log`` in the
        log folder, warnings to stderr as before; returns the undo."""
        root = logging.getLogger("pdbox")
        to_file = logging.FileHandler(self.log_dir / "router.log")
        to_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        to_err = logging.StreamHandler(sys.stderr)
        to_err.setLevel(logging.WARNING)
        level = root.level
        root.addHandler(to_file)
        root.addHandler(to_err)
        root.setLevel(logging.INFO)

        def undo() -> None:
            for h in (to_file, to_err):
                root.removeHandler(h)
                h.close()
            root.setLevel(level)

        return undo

    def stop_workers(self, grace_s: float = 8.0) -> None:
        self.stopping = True
        procs = [s.proc for s in self.specs if s.proc is not None and s.proc.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
