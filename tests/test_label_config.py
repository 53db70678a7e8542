"""backend/core/label_config.py: which controls of a labeling config the backend reads, and the configs it refuses."""

from __future__ import annotations

import pytest

from backend.core.errors import BadRequest
from backend.core.label_config import parse_label_config

from .test_annotations import CONFIG

SMART = """
<View>
  <Image name="img" value="$url"/>
  <BrushLabels name="tag" toName="img"><Label value="cat"/></BrushLabels>
  <RectangleLabels name="smartbox" toName="img" smart="true"><Label value="cat"/></RectangleLabels>
  <KeyPointLabels name="kp" toName="img" smartOnly="true"><Label value="cat"/></KeyPointLabels>
  <BrushLabels name="elsewhere" toName="other"><Label value="dog"/></BrushLabels>
  <Image name="other" value="$second"/>
</View>
"""


def test_parse_config():
    """Every output control (brush, polygon, rectangle), their labels, the image key and the mask controls."""
    config = parse_label_config(CONFIG)
    assert [c.name for c in config.outputs if c.kind == "brush"] == ["tag"] and config.labels == ("car", "road", "sky")
    assert [c.name for c in config.outputs] == ["tag", "poly", "box"] and config.prompts == ()
    assert [c.name for c in config.outputs_for("car")] == ["tag", "poly"]
    assert config.image_name == "img" and config.image_key == "image"
    assert [c.kind for c in config.mask_controls] == ["brush", "polygon", "rectangle"]


@pytest.mark.parametrize(
    "xml,message",
    [
        ("", "empty"),
        ("<View><Image", "not valid XML"),
        ('<View><Image name="i" value="$image"/><Choices name="c" toName="i"/></View>', "no <BrushLabels>"),
        ('<View><BrushLabels name="t" toName="i"><Label value="a"/></BrushLabels></View>', "no <BrushLabels>"),
        ('<View><Image name="i" value="$image"/><BrushLabels name="t" toName="i"/></View>', "no <Label"),
        ('<View><Image name="i" value="image"/><BrushLabels name="t" toName="i"><Label value="a"/></BrushLabels></View>', "value=\"\\$key\""),
    ],
    ids=["empty", "bad-xml", "no-brush", "no-image", "no-labels", "bad-value"],
)
def test_bad_configs(xml, message):
    """Configs this backend cannot serve raise BadRequest saying why."""
    with pytest.raises(BadRequest, match=message):
        parse_label_config(xml)


def test_smart_tools_are_prompts_not_outputs():
    """A smart rectangle and a keypoint tool prompt; predictions go to the brush on the first image only."""
    config = parse_label_config(SMART)
    assert [c.name for c in config.outputs] == ["tag"] and config.labels == ("cat",) and config.image_key == "url"
    assert [(c.name, c.kind, c.smart) for c in config.prompts] == [("smartbox", "rectangle", True), ("kp", "keypoint", True)]
    assert [c.name for c in config.mask_controls] == ["tag", "smartbox"]


def test_a_config_with_a_dtd_is_refused_before_parsing():
    xml = '<!DOCTYPE v [<!ENTITY e "x">]>' + CONFIG.strip()
    with pytest.raises(BadRequest, match="not valid XML"):
        parse_label_config(xml)
