"""Read a Label Studio labeling config: which brush control paints which image, with which labels."""

from __future__ import annotations

from dataclasses import dataclass
from xml.etree.ElementTree import ParseError

from defusedxml import ElementTree

from .errors import BadRequest

MASK_CONTROLS = {"brushlabels": "brush", "polygonlabels": "polygon", "rectanglelabels": "rectangle"}
"""Controls whose regions can be turned into masks (support examples); only brushes are predicted."""


@dataclass(frozen=True)
class Control:
    """One labeling control attached to an image."""

    name: str
    kind: str  # "brush", "polygon" or "rectangle"
    to_name: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class LabelConfig:
    """The parts of a labeling config this backend uses."""

    brush: Control
    """The BrushLabels control predictions are written to."""
    image_name: str
    """The <Image name=...> the brush paints on."""
    image_key: str
    """The task data key of that image (`value="$image"` -> "image")."""
    mask_controls: tuple[Control, ...]
    """Every brush/polygon/rectangle control on that image (sources of support masks)."""

    @property
    def labels(self) -> tuple[str, ...]:
        """The brush labels, in config order."""
        return self.brush.labels


def parse_label_config(xml: str) -> LabelConfig:
    """Parse a labeling config; BadRequest if it has no <BrushLabels> on an <Image>."""
    if not isinstance(xml, str) or not xml.strip():
        raise BadRequest("label config is empty: expected the project's XML labeling config")
    try:
        root = ElementTree.fromstring(xml)
    except (ParseError, ValueError) as exc:
        raise BadRequest(f"label config is not valid XML ({exc})") from None
    images = {
        el.get("name"): el.get("value", "")
        for el in root.iter()
        if el.tag.lower() == "image" and el.get("name")
    }
    controls = []
    for el in root.iter():
        kind = MASK_CONTROLS.get(el.tag.lower())
        if kind is None or el.get("toName") not in images:
            continue
        labels = tuple(c.get("value") for c in el if c.tag.lower() == "label" and c.get("value"))
        controls.append(Control(el.get("name", ""), kind, el.get("toName"), labels))
    brushes = [c for c in controls if c.kind == "brush"]
    if not brushes:
        raise BadRequest(
            "label config has no <BrushLabels> control attached to an <Image>: this backend predicts brush masks"
        )
    brush = brushes[0]
    if not brush.labels:
        raise BadRequest(f"<BrushLabels name={brush.name!r}> has no <Label value=...> children")
    value = images[brush.to_name]
    if not value.startswith("$") or len(value) < 2:
        raise BadRequest(f"<Image name={brush.to_name!r}> needs value=\"$key\" naming a task data field, got {value!r}")
    on_image = tuple(c for c in controls if c.to_name == brush.to_name)
    return LabelConfig(brush=brush, image_name=brush.to_name, image_key=value[1:], mask_controls=on_image)
