"""backend/core/ls_schema.py: Label Studio's bodies as pydantic models; a field that does not fit is named."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from backend.core.errors import BadRequest
from backend.core.ls_schema import (
    AnnotationsDeletedEvent,
    Prediction,
    PredictBody,
    PromptRegion,
    SetupBody,
    WebhookEvent,
    checked,
    int_id,
)


def _says(model, body, where=""):
    with pytest.raises(BadRequest) as caught:
        checked(model, body, where)
    assert caught.value.status == 400
    return caught.value.message


def test_setup_text_fields():
    body = checked(SetupBody, {"project": "1.2", "schema": "<View/>", "hostname": None, "extra": 1})
    assert (body.schema_xml, body.label_config, body.hostname, body.access_token) == ("<View/>", "", "", "")
    assert _says(SetupBody, {"schema": 3}) == "'schema' must be a string, got int"
    assert "'access_token' must be a string" in _says(SetupBody, {"access_token": ["x"]})


def test_predict_tasks_with_integer_ids_keep_their_other_fields():
    body = checked(PredictBody, {"tasks": [{"id": 5, "data": {"image": "x"}, "inner_id": 9}, {"id": "6", "data": None}]})
    assert [t.model_dump() for t in body.tasks] == [
        {"id": 5, "data": {"image": "x"}, "predictions": [], "annotations": [], "project": None, "inner_id": 9},
        {"id": 6, "data": {}, "predictions": [], "annotations": [], "project": None}]
    assert body.params == {} and body.label_config == ""


@pytest.mark.parametrize("body, says", [
    ({}, "'tasks' must be a non-empty list of task objects with an 'id'"),
    ({"tasks": []}, "'tasks' must be a non-empty list"),
    ({"tasks": {"id": 1}}, "'tasks' must be a non-empty list"),
    ({"tasks": [{"id": 1}, {"id": "x"}]}, "tasks[1].id must be an integer id, got 'x'"),
    ({"tasks": [{"id": True}]}, "tasks[0].id must be an integer id, got True"),
    ({"tasks": [{"id": -1}]}, "tasks[0].id must be an integer id"),
    ({"tasks": ["5"]}, "tasks[0] must be an object, got str"),
    ({"tasks": [{"data": {}}]}, "tasks[0].id is missing"),
    ({"tasks": [{"id": 1, "data": "image.png"}]}, "tasks[0].data must be an object, got str"),
    ({"tasks": [{"id": 1, "predictions": {"id": 2}}]}, "tasks[0].predictions must be a list, got dict"),
    ({"tasks": [{"id": 1}], "params": [1]}, "'params' must be an object, got list"),
    ({"tasks": [{"id": 1}], "label_config": {"x": 1}}, "'label_config' must be a string, got dict"),
])
def test_predict_bodies_name_the_bad_field(body, says):
    assert says in _says(PredictBody, body)


def test_webhook_events():
    assert checked(WebhookEvent, {"action": "ANNOTATION_CREATED", "project": {"id": 1}}).action == "ANNOTATION_CREATED"
    assert _says(WebhookEvent, {"action": ["x"]}) == "'action' must be the event's name as a string"
    assert [r.id for r in checked(AnnotationsDeletedEvent, {"action": "x", "annotations": [{"id": 3}, {"id": "4"}]})
            .annotations] == [3, 4]
    assert "'annotations' must be a list of" in _says(AnnotationsDeletedEvent, {"action": "x", "annotations": {"id": 3}})
    assert _says(AnnotationsDeletedEvent, {"action": "x", "annotations": [{"id": 3}, {"id": 2.5}]}) == \
        "annotations[1].id must be an integer id, got 2.5"


@pytest.mark.parametrize("region, says", [
    ("x", "params.context.result[0] must be an object, got str"),
    ({"type": "choices", "value": {"x": 1, "y": 1}}, "params.context.result[0].type is not a smart tool: got 'choices'"),
    ({"type": "keypointlabels"}, "params.context.result[0].value is missing"),
    ({"type": "keypointlabels", "value": {"x": "1", "y": 2}}, "value.x must be a number from 0 to 100"),
    ({"type": "keypointlabels", "value": {"x": 2**2000, "y": 2}}, "value.x must be a number from 0 to 100"),
    ({"type": "keypointlabels", "value": {"x": 1, "y": float("nan")}}, "value.y must be a number from 0 to 100"),
    ({"type": "keypointlabels", "value": {"x": 1, "y": True}}, "value.y must be a number"),
    ({"type": "rectanglelabels", "value": {"x": 1, "y": 1, "width": 101}}, "value.width must be a number"),
    ({"type": "keypointlabels", "value": {"x": 1, "y": 1, "keypointlabels": [3]}}, "value.keypointlabels[0] must be a string"),
])
def test_smart_tool_regions_name_the_bad_field(region, says):
    assert says in _says(PromptRegion, region, "params.context.result[0]")


def test_int_id():
    assert int_id(3) == 3 and int_id("42") == 42
    assert int_id(True) is None and int_id(-1) is None and int_id("²") is None and int_id(2.0) is None


def test_predictions_follow_the_schema_label_studio_stores():
    region = {"id": "a1", "from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": 4,
              "original_height": 3, "image_rotation": 0, "value": {"format": "rle", "rle": [0], "brushlabels": ["x"]},
              "score": 0.5, "readonly": False}
    Prediction.model_validate({"result": [region], "score": 0.5, "model_version": "v1"})
    for bad in ({"score": 1.5}, {"type": "choices"}, {"original_width": 0}):
        with pytest.raises(ValidationError):
            Prediction.model_validate({"result": [{**region, **bad}], "score": 0.5, "model_version": "v1"})
    with pytest.raises(ValidationError):
        Prediction.model_validate({"result": [], "score": 0.0, "model_version": ""})
