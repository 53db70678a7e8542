"""Label Studio's smart tools: a keypoint or a box in `params.context` says where, the label's supports say what.

A rectangle of label L segments L inside the box only; positive keypoints keep the components of L's mask
under them, negative ones remove components. The answer is one prediction with the refined regions only.
Coordinates arrive in percent of the image; they are turned into pixels of the image as loaded (EXIF applied).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import BadRequest
from .label_config import LabelConfig
from .ls_schema import PromptRegion, checked

MAX_PROMPTS = 32
"""Most boxes and points one smart-tool request may carry, unless told (the MAX_PROMPTS setting)."""


@dataclass
class LabelPrompt:
    """What the annotator gave for one label: boxes (percent x, y, width, height) and points (percent)."""

    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    points: list[tuple[float, float, bool]] = field(default_factory=list)


def interactive_regions(params: dict) -> list[dict] | None:
    """The regions of a /predict's `params.context.result` when the request is an interactive one, else None."""
    context = params.get("context")
    if not isinstance(context, dict) or not context.get("result"):
        return None
    regions = context["result"]
    if not isinstance(regions, list):
        raise BadRequest("params.context.result must be a list of keypoint or rectangle regions")
    return regions


def prompt_passes(prompts: dict[str, LabelPrompt]) -> int:
    """Model passes a request's prompts cost: one per box, one per label with points but no box."""
    return sum(len(p.boxes) + (1 if p.points and not p.boxes else 0) for p in prompts.values())


def parse_prompts(regions: list[dict], config: LabelConfig, limit: int = MAX_PROMPTS) -> dict[str, LabelPrompt]:
    """Prompts per label from smart keypoint/rectangle regions; BadRequest naming what is wrong.

    At most `limit` boxes and points in all (MAX_PROMPTS): each box is a model pass, and a click's work
    must stay bounded (an annotator places a handful).
    """
    if len(regions) > limit:
        raise BadRequest(f"params.context.result holds {len(regions)} boxes and points; at most MAX_PROMPTS={limit} "
                         "per request")
    prompts: dict[str, LabelPrompt] = {}
    for i, raw in enumerate(regions):
        where = f"params.context.result[{i}]"
        region = checked(PromptRegion, raw, where)
        kind, value = region.type, region.value
        labels = getattr(value, kind)
        if not labels:
            raise BadRequest(f"{where}: value.{kind} must name the label to segment")
        unknown = [lb for lb in labels if lb not in config.labels]
        if unknown:
            raise BadRequest(f"{where}: label {unknown[0]!r} is not one this project predicts "
                             f"({', '.join(config.labels)}); name the smart tool's labels like the output's")
        for label in labels:
            prompt = prompts.setdefault(label, LabelPrompt())
            if kind == "rectanglelabels":
                if value.width is None or value.height is None or value.width <= 0 or value.height <= 0:
                    raise BadRequest(f"{where}: a box needs a positive width and height")
                if value.x + value.width > 100.001 or value.y + value.height > 100.001:
                    raise BadRequest(f"{where}: the box ends outside the image (x + width and y + height are "
                                     "percent of the image, at most 100)")
                prompt.boxes.append((value.x, value.y, value.width, value.height))
            else:
                prompt.points.append((value.x, value.y, region.is_positive is not False))
    return prompts
