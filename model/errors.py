"""Typed errors raised by the DiffewS library."""

from __future__ import annotations


class DiffewSError(Exception):
    """Base class of every error this library raises on purpose."""


class CheckpointNotFoundError(DiffewSError, FileNotFoundError):
    """A model spec names a folder, file or hub id that cannot be found."""


class InvalidCheckpointError(DiffewSError, ValueError):
    """A folder exists but is not a checkpoint of the expected layout, or its files disagree."""


class InvalidInputError(DiffewSError, ValueError):
    """An image, mask or argument handed to the model is unusable; the message says which and why."""


class SupportNotSetError(DiffewSError, RuntimeError):
    """A query was run without a support memory, or with one that was released."""
