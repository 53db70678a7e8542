"""Label Studio's smart tools: a keypoint or a box in `params.context` says where, the label's supports say what.

A rectangle of label L segments L inside the box only; positive keypoints keep the components of L's mask
under them, negative ones remove components. The answer is one prediction with the refined regions only.
Coordinates arrive in percent of the image; they are turned into pixels of the image as loaded (EXIF applied).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import BadRequest
from .label_config import LabelConfig


@dataclass
class LabelPrompt:
    """What the annotator gave for one label: boxes (percent x, y, width, height) and points (percent)."""

    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    points: list[tuple[float, float, bool]] = field(default_factory=list)


def interactive_regions(body: dict) -> list[dict] | None:
    """The regions of `params.context.result` when the request is an interactive one, else None."""
    params = body.get("params")
    context = params.get("context") if isinstance(params, dict) else None
    if not isinstance(context, dict) or not context.get("result"):
        return None
    regions = context["result"]
    if not isinstance(regions, list):
        raise BadRequest("params.context.result must be a list of keypoint or rectangle regions")
    return regions


def _number(value: dict, key: str, where: str) -> float:
    number = value.get(key)
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not np.isfinite(number):
        raise BadRequest(f"{where}: value.{key} must be a number (percent of the image), got {number!r}")
    return float(number)


def parse_prompts(regions: list[dict], config: LabelConfig) -> dict[str, LabelPrompt]:
    """Prompts per label from smart keypoint/rectangle regions; BadRequest naming what is wrong."""
    prompts: dict[str, LabelPrompt] = {}
    for i, region in enumerate(regions):
        where = f"params.context.result[{i}]"
        if not isinstance(region, dict) or not isinstance(region.get("value"), dict):
            raise BadRequest(f"{where} must be a region object with a value")
        kind, value = region.get("type"), region["value"]
        if kind not in ("keypointlabels", "rectanglelabels"):
            raise BadRequest(f"{where}: type {kind!r} is not a smart tool (keypointlabels or rectanglelabels)")
        labels = value.get(kind)
        if not isinstance(labels, list) or not labels or not all(isinstance(lb, str) for lb in labels):
            raise BadRequest(f"{where}: value.{kind} must name the label to segment")
        unknown = [lb for lb in labels if lb not in config.labels]
        if unknown:
            raise BadRequest(f"{where}: label {unknown[0]!r} is not one this project predicts "
                             f"({', '.join(config.labels)}); name the smart tool's labels like the output's")
        x, y = _number(value, "x", where), _number(value, "y", where)
        for label in labels:
            prompt = prompts.setdefault(label, LabelPrompt())
            if kind == "rectanglelabels":
                w, h = _number(value, "width", where), _number(value, "height", where)
                if w <= 0 or h <= 0:
                    raise BadRequest(f"{where}: a box needs a positive width and height")
                prompt.boxes.append((x, y, w, h))
            else:
                prompt.points.append((x, y, region.get("is_positive", True) is not False))
    return prompts
