"""Smart-tool prompts turned into masks: boxes segmented inside themselves, points choosing components."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from model import Box, Point, segment_box, segment_points, select_components

from ..core.errors import DeadlinePassed
from ..core.prompts import LabelPrompt


def refine(model, rgb: np.ndarray, memory, prompt: LabelPrompt,
           expired: Callable[[], bool] = lambda: False) -> tuple[np.ndarray, float]:
    """One label's mask from its prompt: the union over boxes (each segmented inside itself), then points.

    `expired` is asked before each model pass: DeadlinePassed once nobody waits for the answer.
    """
    h, w = rgb.shape[:2]
    scores, mask = [], np.zeros((h, w), dtype=bool)
    for i, (x, y, bw, bh) in enumerate(prompt.boxes):
        if expired():
            raise DeadlinePassed(f"deadline passed after {i} of {len(prompt.boxes)} boxes")
        box = Box.clipped(x / 100 * w, y / 100 * h, (x + bw) / 100 * w, (y + bh) / 100 * h, (h, w))
        part, score = segment_box(model, rgb, memory, box)
        mask |= part
        scores.append(score)
    points = [Point(px / 100 * w, py / 100 * h, positive) for px, py, positive in prompt.points]
    if points:
        if expired():
            raise DeadlinePassed("deadline passed before the keypoints' pass")
        if prompt.boxes:  # points then choose among the boxed parts
            mask = select_components(mask, points) if mask.any() else mask
        else:
            mask, score = segment_points(model, rgb, memory, points)
            scores.append(score)
    return mask, min(scores, default=0.0)
