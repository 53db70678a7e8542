"""DiffewS: Stable Diffusion 2.1 as a one-step few-shot segmenter with KV-fusion self-attention."""

from .config import DiffewSConfig
from .errors import CheckpointNotFoundError, DiffewSError, InvalidCheckpointError, InvalidInputError, SupportNotSetError
from .pipeline import DiffewS, QueryBatch, SegmentationOutput
from .support import SupportMemory

__all__ = [
    "CheckpointNotFoundError",
    "DiffewS",
    "DiffewSConfig",
    "DiffewSError",
    "InvalidCheckpointError",
    "InvalidInputError",
    "QueryBatch",
    "SegmentationOutput",
    "SupportMemory",
    "SupportNotSetError",
]
