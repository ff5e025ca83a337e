"""Errors raised while loading a model; each message names the problem and the file."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """The model file or folder is missing, corrupt or of an unsupported kind."""
