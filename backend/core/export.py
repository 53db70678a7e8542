"""Convert a Label Studio JSON export with brush labels into the label-map dataset layout (for model.evaluate)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .annotations import label_masks, mask_regions
from .errors import BadRequest
from .label_config import Control, LabelConfig

KINDS = {"brushlabels": "brush", "polygonlabels": "polygon", "rectanglelabels": "rectangle"}
UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")
"""Label Studio prefixes uploaded file names with 8 hex digits and a dash."""


def _config_from_results(tasks: list[dict]) -> LabelConfig:
    """A LabelConfig read off the export's own regions (no XML needed): every mask control and label seen."""
    controls: dict[str, tuple[str, str, set]] = {}
    for task in tasks:
        for ann in task.get("annotations") or []:
            for region in ann.get("result") or []:
                kind = KINDS.get(region.get("type", ""))
                if kind:
                    entry = controls.setdefault(region["from_name"], (kind, region.get("to_name", "image"), set()))
                    entry[2].update((region.get("value") or {}).get(region["type"], []))
    if not any(kind == "brush" for kind, _, _ in controls.values()):
        raise BadRequest("the export has no brushlabels regions")
    made = [Control(name, kind, to, tuple(sorted(labels))) for name, (kind, to, labels) in controls.items()]
    brush = next(c for c in made if c.kind == "brush")
    labels = tuple(sorted({lb for c in made for lb in c.labels}))
    brush = Control(brush.name, "brush", brush.to_name, labels)
    return LabelConfig(outputs=(brush,), image_name=brush.to_name, image_key="", mask_controls=tuple(made))


def _find_image(url: str, images: Path) -> Path:
    name = Path(url.split("?d=")[-1]).name
    for candidate in (name, UPLOAD_PREFIX.sub("", name)):
        if (images / candidate).is_file():
            return images / candidate
    raise BadRequest(f"image {name!r} of the export is not in {images}")


def export_to_label_map(export: Path, images: Path, out: Path, split: str = "val") -> dict:
    """Write classes.txt ("background" first), <split>/images and <split>/labels (uint8 ids) from an export.

    Uses each task's first non-cancelled annotation; where labels overlap, the later region wins.
    """
    tasks = json.loads(Path(export).read_text())
    if not isinstance(tasks, list):
        raise BadRequest(f"{export}: expected a Label Studio JSON export (a list of tasks)")
    config = _config_from_results(tasks)
    classes = ["background", *config.labels]
    (out / split / "images").mkdir(parents=True, exist_ok=True)
    (out / split / "labels").mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    written = 0
    for task in tasks:
        annotation = next((a for a in task.get("annotations") or [] if not a.get("was_cancelled")), None)
        if annotation is None:
            continue
        regions = mask_regions(annotation.get("result") or [], config)
        if not regions:
            continue
        url = next(iter((task.get("data") or {}).values()), "")
        source = _find_image(str(url), images)
        label_map = np.zeros((regions[0]["height"], regions[0]["width"]), np.uint8)
        for label, mask in label_masks(regions).items():
            label_map[mask] = classes.index(label)
        stem = f"task{task['id']}"
        shutil.copyfile(source, out / split / "images" / f"{stem}{source.suffix.lower()}")
        Image.fromarray(label_map).save(out / split / "labels" / f"{stem}.png")
        written += 1
    return {"tasks": written, "classes": classes}
