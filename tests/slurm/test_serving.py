"""`pdbox slurm up --cpu` with the real worker and router against a real Slurm (see conftest.py): one
prefill engine on n1 and one decode engine on n2, KV over tcp, the embedded model. The module brings
the appliance up once; its last test takes it down."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import openai
import pytest

from slurm.messages import RegistryEvent, WorkerInfo, WorkerStatus
from tests.slurm.test_cluster import REPO, _alive, _queue
from tests.waiting import wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"
PARIS = [{"role": "user", "content": "What is the capital of France?"}]


def _pdbox(*args: str, timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli", "slurm", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s)


@dataclass
class Run:
    root: Path
    dir: Path
    router: str
    token: str
    jobs: dict[str, str]  # role -> job id
    router_pid: int
    up_s: float
    seen_pids: set[int] = field(default_factory=set)  # every worker pid registered during the module

    def get(self, path: str) -> bytes:
        req = urllib.request.Request(self.router + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.read()

    def workers(self) -> list[WorkerStatus]:
        statuses = msgspec.json.decode(self.get("/internal/workers"), type=list[WorkerStatus])
        self.seen_pids.update(s.info.pid for s in statuses)
        return statuses

    def events(self) -> list[RegistryEvent]:
        return msgspec.json.decode(self.get("/internal/events"), type=list[RegistryEvent])

    def routed(self) -> list[dict]:
        """The router's own view (GET /workers): the handles it routes to."""
        return json.loads(self.get("/workers"))["workers"]

    def healthy(self) -> bool:
        try:
            return urllib.request.urlopen(self.router + "/health", timeout=5).status == 200
        except OSError:
            return False

    def chat(self, messages: list[dict], max_tokens: int = 20) -> str:
        client = openai.OpenAI(base_url=self.router + "/v1", api_key="none", max_retries=0, timeout=120)
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content or ""


@pytest.fixture(scope="module")
def run(slurm_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    root = tmp_path_factory.mktemp("runs")
    t0 = time.monotonic()
    up = _pdbox("up", "--prefill-nodes", "1", "--decode-nodes", "1", "--cpu", "--timeout", "180",
                "--run-root", str(root))
    up_s = time.monotonic() - t0
    try:
        assert up.returncode == 0, f"up failed:\n{up.stdout}\n{up.stderr}"
        assert "ready: http://" in up.stdout
        run_dir = (root / "latest").resolve()
        state = json.loads((run_dir / "run.json").read_text())
        run = Run(root=root, dir=run_dir, router=state["router_url"], token=(run_dir / "token").read_text().strip(),
                  jobs={j["role"]: j["job_id"] for j in state["jobs"]}, router_pid=state["router_pid"], up_s=up_s)
        sys.stderr.write(f"\nslurm up --cpu (2 real workers): ready in {up_s:.1f}s\n")
        yield run
    finally:
        _pdbox("down", "--run-root", str(root))  # idempotent; test_down checks what it leaves


def test_chat_with_prefill_and_decode_on_two_nodes(run: Run) -> None:
    placed = {(s.info.role, s.info.node) for s in run.workers() if s.healthy}
    assert placed == {("prefill", "n1"), ("decode", "n2")}, placed
    routed = run.routed()
    assert {(w["role"], w["devices"], w["transport"]) for w in routed} == {
        ("prefill", "n1/cpu", "tcp"), ("decode", "n2/cpu", "tcp")}, routed

    t0 = time.monotonic()
    answer = run.chat(PARIS)
    sys.stderr.write(f"\nfirst chat across n1 -> n2: {time.monotonic() - t0:.2f}s: {answer!r}\n")
    assert "Paris" in answer


class Stream(threading.Thread):
    """A long streaming chat (ignore_eos) read in the background, chunk by chunk."""

    def __init__(self, router: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Count to ten thousand."}],
                                "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True})
        self.url = router + "/v1/chat/completions"
        self.chunks = 0
        self.flowing = threading.Event()
        self.finish_reason: str | None = None
        self.error: dict | None = None
        self.done = False
        self.exc: BaseException | None = None

    def run(self) -> None:
        req = urllib.request.Request(self.url, data=self.body.encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                for raw in resp:
                    line = raw.decode().strip()
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        self.done = True
                        break
                    obj = json.loads(line.removeprefix("data: "))
                    if "error" in obj:
                        self.error = obj["error"]
                        continue
                    choice = obj["choices"][0]
                    self.chunks += bool(choice["delta"].get("content"))
                    self.finish_reason = choice.get("finish_reason") or self.finish_reason
                    if self.chunks >= 5:
                        self.flowing.set()
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            self.exc = e
        finally:
            self.flowing.set()


def _post_status(run: Run) -> int:
    body = json.dumps({"model": MODEL, "messages": PARIS, "max_tokens": 4}).encode()
    req = urllib.request.Request(run.router + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_preempted_decode_fails_in_flight_requests_then_serves_again(run: Run) -> None:
    before = {s.info.role: s.info for s in run.workers()}
    old: WorkerInfo = before["decode"]

    stream = Stream(run.router, max_tokens=4000)
    stream.start()
    assert stream.flowing.wait(60) and stream.exc is None and stream.chunks >= 5, (stream.exc, stream.chunks)

    # real preemption: an `urgent` job wants the decode node whole; the decode job gets SIGUSR2, its worker
    # deregisters and stops, submitit requeues the job, and a fresh worker registers again.
    t0 = time.monotonic()
    subprocess.run(["sbatch", "-p", "urgent", "-w", old.node, "--exclusive", "-o", "/dev/null", "--wrap", "sleep 2"],
                   capture_output=True, check=True)
    wait_until(lambda: any(e.kind == "deregister" and e.info == old for e in run.events()), 20, 0.25,
               what="decode to deregister")
    deregister_s = time.monotonic() - t0
    assert not [w for w in run.routed() if w["role"] == "decode"], "the router still routes to the preempted decode"
    stream.join(30)
    assert not stream.is_alive(), "the in-flight stream hangs"
    assert stream.exc is None, stream.exc
    assert stream.error is not None and stream.done, (stream.error, stream.done, stream.finish_reason)
    assert "worker failed" in stream.error["message"] and stream.finish_reason is None
    assert _post_status(run) == 503, "with no decode engine a request must be refused at once"

    new = wait_until(lambda: next((s.info for s in run.workers()
                               if s.healthy and s.info.role == "decode" and s.info.restart >= 1), None), 120, 0.25,
                     what="the requeued decode worker to register again")
    wait_until(run.healthy, 30, 0.25, what="the router to route to the new decode worker")
    back_s = time.monotonic() - t0
    assert new.job_id == old.job_id and new.node == old.node and new.pid != old.pid and new.url != old.url
    assert [w["restarts"] for w in run.routed() if w["role"] == "decode"] == [1]
    assert "Paris" in run.chat(PARIS)
    assert [s.info.pid for s in run.workers() if s.info.role == "prefill"] == [before["prefill"].pid]
    assert not any(e.kind == "drop" for e in run.events()), "workers must deregister, not be dropped"
    sys.stderr.write(f"\npreemption: decode deregistered after {deregister_s:.1f}s, serving again after "
                     f"{back_s:.1f}s; the in-flight stream got {stream.chunks} chunks then a clean error\n")


def test_requeued_prefill_registers_again_and_serves(run: Run) -> None:
    old = next(s.info for s in run.workers() if s.info.role == "prefill")
    decode_pid = next(s.info.pid for s in run.workers() if s.info.role == "decode")
    t0 = time.monotonic()
    # admin requeue: SIGTERM to every task (no USR2); the worker deregisters on its way out
    subprocess.run(["scontrol", "requeue", run.jobs["prefill"]], check=True, capture_output=True)
    wait_until(lambda: any(e.kind == "deregister" and e.info == old for e in run.events()), 20, 0.25,
               what="prefill to deregister")
    assert _post_status(run) == 503, "with no prefill engine a request must be refused at once"
    new = wait_until(lambda: next((s.info for s in run.workers()
                               if s.healthy and s.info.role == "prefill" and s.info.pid != old.pid), None), 120, 0.25,
                     what="the requeued prefill worker to register again")
    wait_until(run.healthy, 30, 0.25, what="the router to route to the new prefill worker")
    assert new.node == old.node and new.restart > old.restart
    assert "Paris" in run.chat(PARIS)  # the new prefill engine pushes KV to the same decode engine
    assert [s.info.pid for s in run.workers() if s.info.role == "decode"] == [decode_pid]
    sys.stderr.write(f"\nscontrol requeue prefill -> serving again after {time.monotonic() - t0:.1f}s\n")


def _processes_naming(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes() and _alive(int(proc.name)):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def test_down_leaves_no_job_and_no_worker(run: Run) -> None:
    run.workers()
    assert _processes_naming(f"--register\0{run.router}"), "no worker process found before down"
    t0 = time.monotonic()
    down = _pdbox("down", "--run-root", str(run.root))
    down_s = time.monotonic() - t0
    assert down.returncode == 0, down.stderr
    assert not set(run.jobs.values()) & _queue()
    pids = [*run.seen_pids, run.router_pid]
    wait_until(lambda: not any(_alive(p) for p in pids), 15, 0.25, what="every worker and the router to exit")
    assert not _processes_naming(f"--register\0{run.router}"), "a worker of the run is still running"
    assert not _processes_naming(str(run.dir)), "a process of the run (submitit task, router) is still running"
    sys.stderr.write(f"\nslurm down: {down_s:.1f}s\n")

