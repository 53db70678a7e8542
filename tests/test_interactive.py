"""Smart tools through /predict: a box or keypoints of a label return that label's refined regions only."""

from __future__ import annotations

import numpy as np
import pytest

from backend.core.prompts import parse_prompts
from backend.core.label_config import parse_label_config
from backend.worker.regions import polygons
from backend.core.rle import rle_to_mask

from bench.synthetic import annotation_event, png_data_uri, square_scene

SMART_XML = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="square"/><Label value="other"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="square"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="square"/></RectangleLabels>
</View>"""
POLYGON_XML = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image"><Label value="square"/></PolygonLabels>
</View>"""
SIZE = (60, 80)


def _event(annotation_id: int, task_id: int, image, mask, config: str) -> dict:
    event = annotation_event(annotation_id, task_id, image, mask)
    event["project"]["label_config"] = config
    if "PolygonLabels" in config:  # the support examples are polygons too
        h, w = mask.shape
        event["annotation"]["result"] = [
            {"id": f"p{i}", "from_name": "poly", "to_name": "image", "type": "polygonlabels", "original_width": w,
             "original_height": h, "value": {"points": points, "polygonlabels": ["square"]}}
            for i, points in enumerate(polygons(mask))]
    return event


def _project(client, config: str) -> None:
    client.post("/setup", json={"project": "1.1", "schema": config, "hostname": "http://localhost:8080",
                                "access_token": "abc", "extra_params": None})
    for i in range(2):
        image, mask = square_scene(i, SIZE)
        assert client.post("/webhook", json=_event(10 + i, 100 + i, image, mask, config)).status_code == 200


def _predict(client, config: str, image, context) -> object:
    return client.post("/predict", json={"tasks": [{"id": 300, "data": {"image": png_data_uri(image)}}],
                                         "project": "1.1", "label_config": config, "params": {"context": context}})


def _keypoint(x: float, y: float, positive: bool = True) -> dict:
    return {"type": "keypointlabels", "is_positive": positive, "original_width": SIZE[1], "original_height": SIZE[0],
            "value": {"x": x, "y": y, "width": 1, "keypointlabels": ["square"]}}


def _box(x: float, y: float, w: float, h: float) -> dict:
    return {"type": "rectanglelabels", "original_width": SIZE[1], "original_height": SIZE[0],
            "value": {"x": x, "y": y, "width": w, "height": h, "rectanglelabels": ["square"]}}


def _masks(prediction: dict) -> list[np.ndarray]:
    return [rle_to_mask(r["value"]["rle"], r["original_width"], r["original_height"]) for r in prediction["result"]]


def test_config_lists_smart_tools_apart_from_outputs():
    config = parse_label_config(SMART_XML)
    assert [c.name for c in config.outputs] == ["tag"] and [(c.name, c.kind) for c in config.prompts] == [
        ("kp", "keypoint"), ("box", "rectangle")]


def test_rectangle_segments_inside_the_box_only(client, worker):
    _project(client, SMART_XML)
    image, mask = square_scene(5, SIZE)
    r = _predict(client, SMART_XML, image, {"result": [_box(0, 0, 50, 50)]})
    assert r.status_code == 200, r.json
    [prediction] = r.json["results"]
    assert prediction["model_version"] == r.json["model_version"]
    assert prediction["result"], "the box found the square inside it"
    for region_mask in _masks(prediction):
        assert region_mask.shape == SIZE and not region_mask[30:, :].any() and not region_mask[:, 40:].any()
    assert all(reg["type"] == "brushlabels" and reg["value"]["brushlabels"] == ["square"] for reg in prediction["result"])


def test_keypoints_keep_and_remove_components(client, worker, tiny_model):
    _project(client, SMART_XML)
    image, mask = square_scene(5, SIZE)
    whole = _predict(client, SMART_XML, image, None).json["results"][0]
    [full] = _masks(whole) or [np.zeros(SIZE, bool)]
    rows, cols = np.nonzero(full) if full.any() else np.nonzero(mask)
    x, y = 100 * (cols[0] + 0.5) / SIZE[1], 100 * (rows[0] + 0.5) / SIZE[0]
    kept = _predict(client, SMART_XML, image, {"result": [_keypoint(x, y)]}).json["results"][0]
    kept_masks = _masks(kept)
    assert kept_masks and kept_masks[0][rows[0], cols[0]] and kept_masks[0].sum() <= max(full.sum(), kept_masks[0].sum())
    removed = _predict(client, SMART_XML, image, {"result": [_keypoint(x, y), _keypoint(x, y, positive=False)]})
    assert removed.status_code == 200 and removed.json["results"][0]["result"] == []


def test_smart_requests_are_never_recorded_or_posted(client, worker, redis):
    """An interactive answer is the editor's business: no ledger entry, so a later click still predicts."""
    _project(client, SMART_XML)
    image, _ = square_scene(5, SIZE)
    assert _predict(client, SMART_XML, image, {"result": [_box(0, 0, 60, 60)]}).status_code == 200
    assert not [k for k in redis.keys("dws:ledger:*")]
    assert client.get("/status/1").json["deliveries"]["delivered"] == 0


@pytest.mark.parametrize("context,message", [
    ({"result": "x"}, "params.context.result must be a list"),
    ({"result": [{"type": "choices", "value": {}}]}, "is not a smart tool"),
    ({"result": [{"type": "keypointlabels", "value": {"x": 1, "y": 2, "keypointlabels": ["cat"]}}]},
     "label 'cat' is not one this project predicts (square, other)"),
    ({"result": [{"type": "keypointlabels", "value": {"x": "a", "y": 2, "keypointlabels": ["square"]}}]},
     "value.x must be a number"),
    ({"result": [{"type": "rectanglelabels", "value": {"x": 1, "y": 2, "width": 0, "height": 3,
                                                       "rectanglelabels": ["square"]}}]}, "positive width"),
], ids=["not-a-list", "not-smart", "unknown-label", "bad-number", "empty-box"])
def test_bad_prompts_are_400_naming_the_field(client, context, message):
    image, _ = square_scene(5, SIZE)
    r = _predict(client, SMART_XML, image, context)
    assert r.status_code == 400 and message in r.json["error"]


def test_unseen_project_or_label_without_examples_is_a_clear_422(client, worker):
    """No /setup, no examples (Label Studio sends none before a smart call): the answer says what to do, with the
    status a click without examples gets (422)."""
    image, _ = square_scene(5, SIZE)
    r = _predict(client, SMART_XML, image, {"result": [_box(0, 0, 50, 50)]})
    assert r.status_code == 422 and "no usable support examples of 'square'" in r.json["error"]
    click = client.post("/predict", json={"tasks": [{"id": 301, "data": {"image": png_data_uri(image)}}],
                                          "project": "1.1", "label_config": SMART_XML})
    assert click.status_code == 422 and "no support examples yet" in click.json["error"]
    two = client.post("/predict", json={"tasks": [{"id": 1, "data": {}}, {"id": 2, "data": {}}], "project": "1.1",
                                        "label_config": SMART_XML, "params": {"context": {"result": [_box(0, 0, 5, 5)]}}})
    assert two.status_code == 400 and "exactly one task" in two.json["error"]


def test_interactive_reuses_the_support_memory(client, worker, tiny_model):
    """A second interaction on the same task encodes no support set: the label's memory comes from the cache."""
    _project(client, SMART_XML)
    image, _ = square_scene(5, SIZE)
    _predict(client, SMART_XML, image, {"result": [_box(0, 0, 50, 50)]})
    hits, encoded = tiny_model.support_cache.hits, []
    original = tiny_model.encode_support
    tiny_model.encode_support = lambda *a, **k: encoded.append(1) or original(*a, **k)  # this instance only
    try:
        assert _predict(client, SMART_XML, image, {"result": [_box(10, 10, 80, 80)]}).status_code == 200
    finally:
        del tiny_model.encode_support
    # An ingest job of the examples may hit the cache meanwhile too; nothing is encoded again.
    assert tiny_model.support_cache.hits >= hits + 1 and encoded == []


def test_polygon_project_gets_polygons(client, worker):
    """A PolygonLabels project (examples drawn as polygons) gets polygon predictions in percent."""
    _project(client, POLYGON_XML)
    assert client.get("/status/1").json["examples"] == {"square": 2}
    image, _ = square_scene(5, SIZE)
    [prediction] = _predict(client, POLYGON_XML, image, None).json["results"]
    assert prediction["result"], prediction
    for region in prediction["result"]:
        assert region["type"] == "polygonlabels" and region["from_name"] == "poly"
        assert len(region["value"]["points"]) >= 3
        assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in region["value"]["points"])


def test_prompt_parsing_groups_by_label():
    prompts = parse_prompts([_box(1, 2, 3, 4), _keypoint(5, 6), _keypoint(7, 8, positive=False)],
                            parse_label_config(SMART_XML))
    assert list(prompts) == ["square"]
    assert prompts["square"].boxes == [(1, 2, 3, 4)] and prompts["square"].points == [(5, 6, True), (7, 8, False)]


@pytest.mark.parametrize("raised,status", [
    ("VersionUnavailable", 503), ("LabelStudioUnavailable", 503), ("LabelStudioRefused", 502), ("MediaError", 422),
])
def test_a_worker_error_reaches_label_studio_with_the_workers_status(client, worker, monkeypatch, raised, status):
    """A smart-tool or click job that fails with a typed error: the web answers with that error's status and
    message, not a 400 or a generic 503 (errors cross the queue as class, status and message)."""
    from backend.core import errors
    from backend.worker import ls_client
    from backend.worker.segmenter import FewShotSegmenter

    made = {"VersionUnavailable": lambda: errors.VersionUnavailable("model version 'v9' cannot be loaded"),
            "LabelStudioUnavailable": lambda: ls_client.LabelStudioUnavailable("Label Studio answered 503"),
            "LabelStudioRefused": lambda: ls_client.LabelStudioRefused("Label Studio refused the call", 400),
            "MediaError": lambda: errors.MediaError("task 300 image does not decode")}[raised]

    def fail(*args, **kwargs):
        raise made()

    monkeypatch.setattr(FewShotSegmenter, "predict_interactive", fail)
    monkeypatch.setattr(FewShotSegmenter, "predict", fail)
    image, _ = square_scene(5, SIZE)
    r = _predict(client, SMART_XML, image, {"result": [_box(0, 0, 50, 50)]})
    assert r.status_code == status and r.json["error"] == made().message
    click = client.post("/predict", json={"tasks": [{"id": 301, "data": {"image": png_data_uri(image)}}],
                                          "project": "1.1", "label_config": SMART_XML})  # a click: the same answer
    assert click.status_code == status and click.json["error"] == made().message


def test_error_records_round_trip_to_the_same_class():
    """error_from_record gives back the worker's class where the web knows it, else a RelayedError with its status."""
    from backend.core.errors import (MediaError, NoExamplesYet, RelayedError, VersionUnavailable, error_from_record,
                                     error_record)

    for exc in (MediaError("m"), NoExamplesYet("n"), VersionUnavailable("v")):
        back = error_from_record(error_record(exc))
        assert type(back) is type(exc) and back.status == exc.status and back.message == exc.message
    unknown = error_from_record({"kind": "SomethingElse", "status": 502, "error": "x"})
    assert isinstance(unknown, RelayedError) and unknown.status == 502
