"""Exceptions raised by the KV transfer library."""

from __future__ import annotations


class TransportError(RuntimeError):
    """A KV transfer cannot proceed: incompatible pools, a dead peer, a bad message, a deadline."""


class BackendUnavailable(TransportError):
    """The backend cannot run on this machine; the message says why (missing package, no GPU …)."""


class ProtocolError(TransportError):
    """A peer sent bytes that do not follow the wire protocol; its connection is dropped."""
