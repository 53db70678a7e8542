"""Few-shot segmenters: DiffewS (Stable Diffusion 2.1 as a one-step segmenter with KV-fusion self-attention) and
the matcher (nearest-neighbour matching of frozen pretrained features), behind one contract.

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
    "Matcher": "matcher",
    "MatcherConfig": "matcher_config",
    "QueryBatch": "outputs",
    "SegmentationOutput": "outputs",
    "parse_dtype": "pipeline",
    "SupportMemory": "support",
    "compose": "support",
    "most_similar": "similarity",
    "VersionInfo": "version_file",
    "is_version_folder": "version_file",
    "check_version_name": "version_file",
    "to_rgb": "images",
    "make_sample": "data",
    "evaluate_episodes": "evaluate",
    "episode_ious": "evaluate",
    "check_labels": "label_checks",
    "RELEASE_ID": "release",
    "MODELSCOPE_BASE": "release",
    "MODELSCOPE_DEFAULT_UNET": "release",
    "LabelCheck": "label_checks",
    "TrainConfig": "train",
    "finetune": "train",
    "attach_version": "versions",
    "load_version": "versions",
    "save_version": "versions",
    "trainable_copy": "versions",
    "remove_adapter": "adapters",
    "Box": "prompts",
    "Point": "prompts",
    "segment_box": "prompts",
    "segment_points": "prompts",
    "select_components": "prompts",
}
"""Public name -> the module of this package that defines it (imported on first use)."""
_RENAMED = {"evaluate_episodes": "evaluate"}
"""Exports named apart from their function: `model.evaluate` is the submodule (python -m model.evaluate)."""

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .errors import CheckpointNotFoundError, DiffewSError, InvalidCheckpointError, InvalidInputError, SupportNotSetError
    from .config import DiffewSConfig
    from .pipeline import DiffewS, parse_dtype
    from .matcher import Matcher
    from .matcher_config import MatcherConfig
    from .outputs import QueryBatch, SegmentationOutput
    from .support import SupportMemory, compose
    from .similarity import most_similar
    from .version_file import VersionInfo, check_version_name, is_version_folder
    from .images import to_rgb
    from .data import make_sample
    from .evaluate import episode_ious, evaluate as evaluate_episodes
    from .label_checks import LabelCheck, check_labels
    from .release import MODELSCOPE_BASE, MODELSCOPE_DEFAULT_UNET, RELEASE_ID
    from .train import TrainConfig, finetune
    from .versions import attach_version, load_version, save_version, trainable_copy
    from .adapters import remove_adapter
    from .prompts import Box, Point, segment_box, segment_points, select_components

def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), _RENAMED.get(name, name))
