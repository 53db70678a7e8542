"""What a segmenter returns for one query and label, shared by DiffewS and the matcher."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from .scoring import margin_score, share_agreement, sharpness_score
from .similarity import DESCRIPTOR_GRID, latent_descriptor


@dataclass
class QueryBatch:
    """Encoded query images: [B, C, h, w] maps on the model's device (DiffewS: VAE latents at R/8; the matcher:
    backbone features) and original (H, W) sizes; the matcher adds [B, 1, R, R] grey guides for its edges."""

    latents: torch.Tensor
    sizes: list[tuple[int, int]]
    guides: torch.Tensor | None = None
    grid: int = DESCRIPTOR_GRID
    """Cells per side of the pooled layout the descriptors keep (model.similarity)."""

    @property
    def descriptors(self) -> torch.Tensor:
        """[B, D] image descriptors (model.similarity) of the queries, from their maps."""
        return latent_descriptor(self.latents, self.grid)

    def select(self, keep: list[int]) -> QueryBatch:
        """The queries at indices `keep`, in that order."""
        guides = self.guides[keep] if self.guides is not None else None
        return replace(self, latents=self.latents[keep], sizes=[self.sizes[i] for i in keep], guides=guides)

    def __len__(self) -> int:
        return len(self.sizes)


@dataclass
class SegmentationOutput:
    """One predicted mask.

    mask: [H, W] bool at the query's original size (after EXIF orientation).
    score: confidence in [0, 1], 0 for an empty or full mask; DiffewS: how far the map rises above the threshold
        inside the mask, on average, as a share of the room above it (scoring.margin_score), times how close the
        mask's area is to its supports' mean area (scoring.share_agreement); the matcher: the share of the mask
        drawn sharply (scoring.sharpness_score). Low scores are the predictions most worth a reviewer's look
        (model.evaluate --score-ranking compares the candidates; each family's is the best it measured).
    probability: [R, R] float32 in [0, 1], the model's map at the working resolution R.
    threshold: the absolute threshold applied to `probability`.
    """

    mask: np.ndarray
    score: float
    probability: np.ndarray
    threshold: float


MASK_SCORES = ("margin x area", "sharpness")
"""How a mask is scored (chosen per model family by model.evaluate --score-ranking, within-label ranking first):
margin x area for DiffewS, sharpness for the matcher."""


def mask_output(prob: torch.Tensor, threshold: float, size: tuple[int, int], support_share: float | None = None,
                score: str = "margin x area") -> SegmentationOutput:
    """Threshold a [R, R] map, resize the mask to `size` (nearest) and score it: "margin x area" is margin_score
    times the mask area's agreement with its supports' (share_agreement; margin alone without support shares),
    "sharpness" the share of the mask's pixels whose map is not within 0.05 of the threshold."""
    small = prob > threshold  # [R, R] bool
    # Nearest resizing commutes with a pointwise threshold, so resizing the bool mask is the same as
    # resizing the map first and cheaper for large originals.
    full = F.interpolate(small[None, None].to(torch.uint8), size=size, mode="nearest-exact")[0, 0].bool()
    probability, small_np = prob.float().cpu().numpy(), small.cpu().numpy()
    inside = int(small_np.sum())
    if inside in (0, small_np.size):
        value = 0.0
    elif score == "sharpness":
        value = sharpness_score(probability, threshold, small_np)
    else:
        value = margin_score(probability, threshold, small_np)
        if support_share is not None:
            value *= share_agreement(inside / small_np.size, support_share)
    return SegmentationOutput(mask=full.cpu().numpy(), score=value, probability=probability, threshold=threshold)
