"""Stand-in for a pdbox worker rank in the Slurm tests: serves GET /health (and GET /info, its
registration as JSON) on a free port, registers with the router named by $PDBOX_ROUTER_URL, and on
SIGTERM / SIGUSR2 / SIGINT deregisters and exits 0. Run as a script: python standin_worker.py
"""

from __future__ import annotations

import http.server
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `slurm`

import msgspec  # noqa: E402

from slurm.messages import WorkerInfo  # noqa: E402
from slurm.register import deregister, register  # noqa: E402


def main() -> None:
    env = os.environ
    info_box: list[bytes] = [b"{}"]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = b"ok\n" if self.path == "/health" else info_box[0] if self.path == "/info" else None
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, fmt: str, *args: object) -> None:  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Handler)
    node = env.get("PDBOX_NODE", "localhost")
    info = WorkerInfo(
        role=env["PDBOX_ROLE"],  # type: ignore[arg-type]
        url=f"http://{node}:{server.server_address[1]}",
        rank=int(env.get("PDBOX_RANK", "0")),
        tp=int(env.get("PDBOX_TP", "1")),
        job_id=env.get("PDBOX_JOB_ID", ""),
        node=node,
        pid=os.getpid(),
        devices=env.get("CUDA_VISIBLE_DEVICES", ""),
        restart=int(env.get("PDBOX_RESTART", "0")),
    )
    info_box[0] = msgspec.json.encode(info)
    router, token = env["PDBOX_ROUTER_URL"], env["PDBOX_CLUSTER_TOKEN"]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    register(router, token, info)
    print(f"standin {info.role} rank {info.rank} registered at {info.url}", flush=True)
    while not stop.wait(1.0):
        pass
    deregister(router, token, url=info.url)
    print(f"standin {info.role} rank {info.rank} deregistered", flush=True)
    server.shutdown()


if __name__ == "__main__":
    main()
