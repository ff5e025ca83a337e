"""Bearer-token checks shared by the router (API key) and the workers (cluster token)."""

from __future__ import annotations

import hmac
from collections.abc import Mapping


def bearer_ok(headers: Mapping[str, str], secret: str) -> bool:
    """``Authorization: Bearer <secret>``, compared in constant time.

    NOTE: compared as bytes (surrogateescape), so a non-ASCII header is a plain mismatch, not a 500.
    An empty secret never matches.
    """
    got = headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    return bool(secret) and hmac.compare_digest(got, f"Bearer {secret}".encode())
