"""Worker-side client of the router's registry (`slurm.registry`). Blocking and stdlib-only, so a
worker can call it before its event loop starts and from a signal handler while shutting down; async
code can wrap it in `asyncio.to_thread`.

    info = WorkerInfo(role="decode", url=f"http://{node}:{port}", rank=0, tp=1, job_id=..., node=..., pid=...)
    register(router_url, token, info)            # retries until `deadline_s`, then RegistrationError
    ...
    deregister(router_url, token, url=info.url)  # best effort: False when the router did not confirm
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import msgspec

from appliance.serve.internal_error import error_message
from slurm.messages import Deregister, WorkerInfo, WorkerRole


class RegistrationError(RuntimeError):
    """The router refused the registration or could not be reached before the deadline."""


def _post(url: str, token: str, body: bytes, timeout_s: float) -> bytes:
    req = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return resp.read()


def register(
    router_url: str,
    token: str,
    info: WorkerInfo,
    *,
    timeout_s: float = 2.0,
    deadline_s: float = 60.0,
    backoff_s: float = 0.2,
) -> None:
    """Register `info` with the router at `router_url` (e.g. http://host:port), retrying connection
    errors and 5xx answers with exponential backoff (capped at 2 s) for up to `deadline_s` seconds.
    A 4xx answer (wrong token, bad fields) fails at once."""
    url = router_url.rstrip("/") + "/internal/register"
    body = msgspec.json.encode(info)
    end = time.monotonic() + deadline_s
    delay = backoff_s
    while True:
        try:
            _post(url, token, body, timeout_s)
            return
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500:
                detail = error_message(e.read())
                raise RegistrationError(f"router {router_url} refused the registration ({e.code}): {detail}") from e
            error: Exception = e
        except (urllib.error.URLError, OSError) as e:
            error = e
        if time.monotonic() + delay > end:
            raise RegistrationError(
                f"could not register with the router at {router_url} within {deadline_s:.0f}s: {error}"
            ) from error
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def deregister(
    router_url: str,
    token: str,
    *,
    url: str = "",
    role: WorkerRole | None = None,
    job_id: str = "",
    rank: int = -1,
    timeout_s: float = 1.0,
    attempts: int = 2,
) -> bool:
    """Remove a worker by its `url`, or by `role`, `job_id` and `rank`. Never raises: a worker that is
    shutting down must not hang on a dead router (the router's health checks drop it anyway)."""
    if not url and (role is None or not job_id or rank < 0):
        raise ValueError("deregister needs url=..., or role=, job_id= and rank=")
    body = msgspec.json.encode(Deregister(url=url, role=role, job_id=job_id, rank=rank))
    endpoint = router_url.rstrip("/") + "/internal/deregister"
    for attempt in range(attempts):
        try:
            _post(endpoint, token, body, timeout_s)
            return True
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500:
                return False
        except (urllib.error.URLError, OSError):
            pass
        if attempt + 1 < attempts:
            time.sleep(0.1)
    return False
