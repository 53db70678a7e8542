"""Wrongly shaped bodies get a 400 naming the field; a bad example never breaks a project."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from backend.core.rle import mask_to_rle

from .waits import wait_idle
from bench.synthetic import CONFIG_XML, annotation_event, png_data_uri, square_scene

SETUP = {"project": "1.1795549122", "schema": CONFIG_XML, "hostname": "", "access_token": ""}
PREDICT = {"project": "1.1", "label_config": CONFIG_XML, "tasks": [{"id": 1, "data": {"image": "x"}}]}


def _deleted(value):
    return {"action": "ANNOTATIONS_DELETED", "project": {"id": 1}, "annotations": [{"id": value}]}


BODIES = [
    ("/setup", {**SETUP, "project": "²"}, "project"),
    ("/setup", {**SETUP, "project": ["1"]}, "project"),
    ("/setup", {**SETUP, "hostname": ["http://a"]}, "'hostname'"),
    ("/setup", {**SETUP, "hostname": {"a": 1}}, "'hostname'"),
    ("/setup", {**SETUP, "access_token": ["x"]}, "'access_token'"),
    ("/setup", {**SETUP, "access_token": {"x": 1}}, "'access_token'"),
    ("/setup", {**SETUP, "schema": ["<View/>"]}, "'schema'"),
    ("/predict", {**PREDICT, "tasks": [{"id": None}]}, "tasks[0]"),
    ("/predict", {**PREDICT, "tasks": [{"id": "abc"}]}, "tasks[0]"),
    ("/predict", {**PREDICT, "tasks": [{"id": [1]}]}, "tasks[0]"),
    ("/predict", {**PREDICT, "tasks": [{"id": "²"}]}, "tasks[0]"),
    ("/predict", {**PREDICT, "tasks": [{"id": 1, "data": "x"}]}, "tasks[0].data"),
    ("/predict", {**PREDICT, "tasks": [{"id": 1, "predictions": 3}]}, "tasks[0].predictions"),
    ("/predict", {**PREDICT, "tasks": "x"}, "'tasks'"),
    ("/predict", {**PREDICT, "project": "²"}, "project"),
    ("/predict", {**PREDICT, "label_config": {"x": 1}}, "'label_config'"),
    ("/webhook", _deleted("abc"), "annotations[0].id"),
    ("/webhook", _deleted(None), "annotations[0].id"),
    ("/webhook", {"action": "ANNOTATIONS_DELETED", "project": {"id": 1}, "annotations": "x"}, "'annotations' must be a list"),
    ("/webhook", {"action": ["ANNOTATION_CREATED"], "project": {"id": 1}}, "'action'"),
    ("/webhook", {"action": "ANNOTATION_CREATED", "project": {"id": "²"}}, "project"),
]


@pytest.mark.parametrize("route,body,field", BODIES, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(BODIES)])
def test_wrongly_shaped_body_is_a_400_naming_the_field(client, route, body, field):
    """Every wrongly shaped field: 400, the field named, nothing stored."""
    client.post("/setup", json=SETUP)
    response = client.post(route, json=body)
    assert response.status_code == 400, response.get_data(as_text=True)
    assert field in response.json["error"]
    assert client.get("/status/1").json["examples"] == {}


def test_a_body_over_the_limit_is_refused(redis, tmp_path):
    """Bodies over MAX_REQUEST_BYTES: 413 with the setting named."""
    from backend.web.app import create_app
    from backend.core.settings import Settings

    client = create_app(Settings(model_dir=tmp_path, max_request_bytes=1000), redis).test_client()
    response = client.post("/webhook", data=json.dumps({"action": "x", "pad": "a" * 2000}), content_type="application/json")
    assert response.status_code == 413 and "MAX_REQUEST_BYTES=1000" in response.json["error"]


def _truncated_event(annotation_id: int = 10) -> dict:
    event = annotation_event(annotation_id, 100 + annotation_id, *square_scene(0))
    value = event["annotation"]["result"][0]["value"]
    value["rle"] = value["rle"][: len(value["rle"]) // 2]  # the header still declares W*H*4 values
    return event


def test_truncated_rle_is_refused_at_the_door(client):
    """A brush RLE with a correct header and a truncated body: 400 saying so; nothing stored."""
    client.post("/setup", json=SETUP)
    response = client.post("/webhook", json=_truncated_event())
    assert response.status_code == 400 and "RLE ends early" in response.json["error"]
    assert client.get("/status/1").json["examples"] == {}
    assert "10" in client.get("/status/1").json["annotation_errors"]


def test_huge_declared_mask_is_refused_without_allocating(client):
    """A 32768x32767 brush region is refused by MAX_IMAGE_PIXELS before any decoding."""
    client.post("/setup", json=SETUP)
    event = annotation_event(10, 100, *square_scene(0))
    region = event["annotation"]["result"][0]
    region["original_width"], region["original_height"] = 32768, 32767
    region["value"]["rle"] = [255, 255, 255, 252] + region["value"]["rle"][4:]
    response = client.post("/webhook", json=event)
    assert response.status_code == 400 and "exceeds MAX_IMAGE_PIXELS" in response.json["error"]


def test_large_broken_rle_is_dropped_by_ingestion(client, worker):
    """An RLE too large to decode inline is checked by the ingestion job: broken, it is removed and reported."""
    client.post("/setup", json=SETUP)
    noisy = np.random.default_rng(0).random((600, 600)) > 0.5
    image = np.zeros((600, 600, 3), np.uint8)
    event = annotation_event(10, 100, image, noisy)
    rle = mask_to_rle(noisy)
    assert len(rle) > 256 << 10
    event["annotation"]["result"][0]["value"]["rle"] = rle[:-1000]
    r = client.post("/webhook", json=event)  # over WEBHOOK_INLINE_BYTES: answered at once, ingested by a job
    assert r.status_code == 202 and r.json["status"] == "queued"
    deadline = time.monotonic() + 30
    while client.get(f"/jobs/{r.json['job']}").json["status"] != "finished" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.get(f"/jobs/{r.json['job']}").json["meta"]["stored"] == 1
    deadline = time.monotonic() + 30
    while client.get("/status/1").json["examples"] and time.monotonic() < deadline:
        time.sleep(0.1)
    status = client.get("/status/1").json
    assert status["examples"] == {} and status["annotation_errors"]["10"].startswith("removed:")


def test_a_poisoned_stored_example_is_skipped_when_predicting(client, worker, redis, settings, tiny_model):
    """An example stored by an older backend with an undecodable mask: predictions still work, and it is reported."""
    from backend.core.store import SupportStore

    client.post("/setup", json=SETUP)
    for i in range(2):
        client.post("/webhook", json=annotation_event(10 + i, 100 + i, *square_scene(i)))
    wait_idle(client)  # ingestion jobs done: the poison below is not re-checked by them
    time.sleep(0.5)
    store = SupportStore(redis, settings.model_dir)
    bad = store.get(1, 11)
    bad.regions[0]["rle"] = bad.regions[0]["rle"][:20]
    redis.hset("dws:examples:1", "11", json.dumps(bad.__dict__))
    (settings.model_dir / "projects" / "1" / "masks").mkdir(parents=True, exist_ok=True)
    for path in (settings.model_dir / "projects" / "1" / "masks").glob("11-*"):
        path.unlink()
    tiny_model.support_cache.clear()  # a worker that starts now: the supports the ingest job encoded are not in it
    query, _ = square_scene(5)
    r = client.post("/predict", json={**PREDICT, "tasks": [{"id": 300, "data": {"image": png_data_uri(query)}}]})
    assert r.status_code == 200 and r.json["results"][0]["result"]
    assert "skipped when predicting" in client.get("/status/1").json["annotation_errors"]["11"]
