"""Read a Label Studio labeling config with label-studio-sdk's LabelInterface: controls, targets, labels, smart tools."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from xml.etree.ElementTree import ParseError

from defusedxml import DefusedXmlException, ElementTree
from label_studio_sdk.label_interface import LabelInterface

from .errors import BadRequest

MASK_CONTROLS = {"brushlabels": "brush", "polygonlabels": "polygon", "rectanglelabels": "rectangle"}
"""Controls whose regions can be turned into masks (support examples) and that predictions can be written to."""
PROMPT_CONTROLS = {"keypointlabels": "keypoint", "rectanglelabels": "rectangle"}
"""Controls that, with smart="true", are Label Studio's interactive tools: they say where to segment."""


@dataclass(frozen=True)
class Control:
    """One labeling control attached to an image."""

    name: str
    kind: str  # "brush", "polygon", "rectangle" or "keypoint"
    to_name: str
    labels: tuple[str, ...]
    smart: bool = False
    """smart="true" or smartOnly="true": an interactive tool (a prompt), not where predictions go."""


@dataclass(frozen=True)
class LabelConfig:
    """The parts of a labeling config this backend uses."""

    outputs: tuple[Control, ...]
    """The brush, polygon and rectangle controls (not smart tools) that predictions are written to."""
    image_name: str
    """The <Image name=...> they label."""
    image_key: str
    """The task data key of that image (`value="$image"` -> "image")."""
    mask_controls: tuple[Control, ...]
    """Every brush/polygon/rectangle control on that image (sources of support masks)."""
    prompts: tuple[Control, ...] = ()
    """The smart keypoint and rectangle tools on that image (interactive prompts)."""

    @property
    def labels(self) -> tuple[str, ...]:
        """The labels predictions can carry (those of the output controls), in config order."""
        return tuple(dict.fromkeys(label for c in self.outputs for label in c.labels))

    def outputs_for(self, label: str) -> list[Control]:
        """The output controls that carry `label`."""
        return [c for c in self.outputs if label in c.labels]


def _is_smart(attrs: dict) -> bool:
    return any(str(attrs.get(attr) or "").lower() == "true" for attr in ("smart", "smartOnly"))


@lru_cache(maxsize=256)
def parse_label_config(xml: str) -> LabelConfig:
    """Parse a labeling config; BadRequest if no brush, polygon or rectangle control labels an <Image>.

    Cached by the XML text: a project's config is parsed once per process, not once per request.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise BadRequest("label config is empty: expected the project's XML labeling config")
    try:
        # defusedxml first: LabelInterface parses with lxml's defaults, which accept DTDs and entity
        # definitions; a config has no use for either.
        ElementTree.fromstring(xml, forbid_dtd=True)
    except (ParseError, ValueError, DefusedXmlException) as exc:
        raise BadRequest(f"label config is not valid XML ({exc})") from None
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # its own error classes live in the SDK's private _legacy module
        raise BadRequest(f"label config is not one Label Studio reads ({type(exc).__name__}: {exc})") from None
    images = {o.name: o.value or "" for o in interface.objects if o.tag.lower() == "image" and o.name}
    controls, prompts = [], []
    for tag in interface.controls:
        kind = tag.tag.lower()
        target = next((name for name in tag.to_name or [] if name in images), None)
        if target is None or kind not in (*MASK_CONTROLS, *PROMPT_CONTROLS):
            continue
        labels = tuple(label for label in tag.labels or [] if label)
        smart = _is_smart(tag.attr or {})
        if kind in MASK_CONTROLS:
            controls.append(Control(tag.name or "", MASK_CONTROLS[kind], target, labels, smart))
        if kind in PROMPT_CONTROLS and (smart or kind == "keypointlabels"):
            prompts.append(Control(tag.name or "", PROMPT_CONTROLS[kind], target, labels, True))
    outputs = [c for c in controls if not c.smart]
    if not outputs:
        raise BadRequest("label config has no <BrushLabels>, <PolygonLabels> or <RectangleLabels> control (other than "
                         "smart tools) attached to an <Image>: this backend predicts masks, polygons or boxes there")
    image = outputs[0].to_name
    outputs = [c for c in outputs if c.to_name == image]
    for control in outputs:
        if not control.labels:
            raise BadRequest(f"<{control.kind.capitalize()}Labels name={control.name!r}> has no <Label value=...> children")
    value = images[image]
    if not value.startswith("$") or len(value) < 2:
        raise BadRequest(f"<Image name={image!r}> needs value=\"$key\" naming a task data field, got {value!r}")
    return LabelConfig(outputs=tuple(outputs), image_name=image, image_key=value[1:],
                       mask_controls=tuple(c for c in controls if c.to_name == image),
                       prompts=tuple(p for p in prompts if p.to_name == image))
