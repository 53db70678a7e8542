"""The matcher's per-version settings (torch-free: the web process reads them)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import read_config
from .errors import InvalidCheckpointError

MATCHER_CONFIG_NAME = "matcher_config.json"
HEAD_NAME = "matcher_head.safetensors"
BLOCKS_NAME = "matcher_blocks.safetensors"
DEFAULT_BACKBONE = "effnet-lite0"


@dataclass(frozen=True)
class MatcherConfig:
    """Per-version matcher settings, saved as `matcher_config.json`; call-time None means "use these"."""

    backbone: str = DEFAULT_BACKBONE
    resolution: int = 384
    """Working resolution: images and masks are resized straight to resolution x resolution."""
    max_vectors: int = 1024
    """Support feature vectors kept per example and side (foreground, background): bounds memory and time."""
    bias: float = 0.0
    """Foreground where (best foreground cosine - best background cosine) exceeds this."""
    temperature: float = 0.05
    """Width of the sigmoid that turns that difference into a probability."""
    guide_radius: int = 4
    """Radius in pixels of the guided filter that upsamples along edges, for a stride-8 backbone (scaled with the
    stride of others); 0: bilinear upsampling only."""
    guide_eps: float = 0.01
    head_dim: int | None = None
    """Output size of the trained projection head (None: no head, the training-free matcher)."""
    tuned_blocks: int = 0
    """The backbone's last blocks whose fine-tuned weights this version carries (matcher_blocks.safetensors);
    0: the backbone as installed."""
    trained: bool = True
    """The features are pretrained (ImageNet): the matcher segments real pictures without fine-tuning."""
    name: str = "matcher"

    def __post_init__(self) -> None:
        if self.resolution < 32 or self.resolution % 32:
            raise InvalidCheckpointError(f"matcher resolution must be a positive multiple of 32, got {self.resolution}")
        if self.tuned_blocks < 0:
            raise InvalidCheckpointError(f"tuned_blocks must be >= 0, got {self.tuned_blocks}")
        if self.max_vectors < 1:
            raise InvalidCheckpointError(f"max_vectors must be >= 1, got {self.max_vectors}")
        if not self.temperature > 0:
            raise InvalidCheckpointError(f"temperature must be > 0, got {self.temperature}")
        if self.guide_radius < 0 or not self.guide_eps > 0:
            raise InvalidCheckpointError(f"guide_radius must be >= 0 and guide_eps > 0, got {self.guide_radius}, "
                                         f"{self.guide_eps}")

    @property
    def threshold_ratio(self) -> float:
        """The probability threshold (0.5: where the difference equals the bias); named as DiffewS's config."""
        return 0.5

    def save(self, folder: Path) -> None:
        """Write `matcher_config.json` into `folder`."""
        (folder / MATCHER_CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> MatcherConfig:
        """Read `matcher_config.json` from `folder`, rejecting unknown or mistyped keys."""
        return read_config(cls, folder / MATCHER_CONFIG_NAME)


def is_matcher_folder(folder: str | os.PathLike) -> bool:
    """True if `folder` holds a matcher config (a saved matcher or matcher version)."""
    return (Path(folder) / MATCHER_CONFIG_NAME).is_file()
