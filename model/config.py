"""Per-checkpoint DiffewS settings, saved next to the weights as `diffews_config.json`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TypeVar

from .errors import InvalidCheckpointError

T = TypeVar("T")

CONFIG_NAME = "diffews_config.json"
EMBEDS_NAME = "empty_prompt_embeds.safetensors"


@dataclass(frozen=True)
class DiffewSConfig:
    """Defaults that travel with a checkpoint; call-time `None` means "use these"."""

    resolution: int = 512
    """Working resolution: every image and mask is resized straight to resolution x resolution."""
    threshold_ratio: float = 0.25
    """Relative threshold tau_r: foreground where the decoded map exceeds ratio * its maximum."""
    support_token_shots: int | None = None
    """If set, support K/V tokens are randomly subsampled to this many shots' worth (paper Tab. 6)."""
    trained: bool = True
    """False for models not trained as segmenters (the tiny demo, a plain SD folder) until fine-tuned on labels."""
    name: str = "diffews"
    """Human-readable model name, reported as part of model versions."""
    family: str = "sd"
    """The architecture the weights belong to: "sd" (Stable Diffusion 2.x) or "tiny"; picks fine-tuning's
    default learning rate (independent of `trained`)."""

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution % 8:
            raise InvalidCheckpointError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if not 0.0 < self.threshold_ratio < 1.0:
            raise InvalidCheckpointError(f"threshold_ratio must be in (0, 1), got {self.threshold_ratio}")
        if self.family not in ("sd", "tiny"):
            raise InvalidCheckpointError(f"family must be 'sd' or 'tiny', got {self.family!r}")
        if self.support_token_shots is not None and self.support_token_shots < 1:
            raise InvalidCheckpointError(f"support_token_shots must be >= 1 or null, got {self.support_token_shots}")

    def save(self, folder: Path) -> None:
        """Write `diffews_config.json` into `folder`."""
        (folder / CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> DiffewSConfig:
        """Read `diffews_config.json` from `folder`, rejecting unknown or mistyped keys."""
        return read_config(cls, folder / CONFIG_NAME)


def read_config(cls: type[T], path: Path) -> T:
    """The dataclass `cls` from a JSON object file; InvalidCheckpointError naming the file for an unreadable one,
    unknown keys or values the class refuses."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidCheckpointError(f"{path}: cannot read ({exc})") from None
    known = {f.name for f in fields(cls)}
    if not isinstance(data, dict) or set(data) - known:
        raise InvalidCheckpointError(f"{path}: expected an object with keys among {sorted(known)}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise InvalidCheckpointError(f"{path}: {exc}") from None
