"""DiffewS: Stable Diffusion 2.1 as a one-step few-shot segmenter with KV-fusion self-attention.

The names below load on first use (PEP 562), so torch-free modules of this package (errors,
version_file) can be imported by processes that never load torch, such as the web process.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "CheckpointNotFoundError": "errors",
    "DiffewSError": "errors",
    "InvalidCheckpointError": "errors",
    "InvalidInputError": "errors",
    "SupportNotSetError": "errors",
    "DiffewSConfig": "config",
    "DiffewS": "pipeline",
    "QueryBatch": "pipeline",
    "SegmentationOutput": "pipeline",
    "SupportMemory": "support",
    "VersionInfo": "version_file",
}

__all__ = [
    "CheckpointNotFoundError", "DiffewS", "DiffewSConfig", "DiffewSError", "InvalidCheckpointError", "InvalidInputError",
    "QueryBatch", "SegmentationOutput", "SupportMemory", "SupportNotSetError", "VersionInfo",
]

if TYPE_CHECKING:
    from .config import DiffewSConfig
    from .errors import CheckpointNotFoundError, DiffewSError, InvalidCheckpointError, InvalidInputError, SupportNotSetError
    from .pipeline import DiffewS, QueryBatch, SegmentationOutput
    from .support import SupportMemory
    from .version_file import VersionInfo


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
