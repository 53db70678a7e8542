"""Edges a hostile or unlucky caller reaches: bounded smart-tool work, hostile numbers, job ids, training retries
under the lock, failures of workers with other settings, oversized masks and webhooks."""

from __future__ import annotations

import time

import numpy as np
import pytest

from backend.core.errors import DeadlinePassed
from backend.core.prompts import LabelPrompt
from backend.core.queues import queue_lengths
from backend.worker.refine import refine
from backend.worker.regions import MaskTooFragmented, bounded, runs

from bench.synthetic import CONFIG_XML, annotation_event, png_data_uri, square_scene

SMART_XML = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="square"/></BrushLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="square"/></RectangleLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="square"/></KeyPointLabels>
</View>"""


def _smart(client, regions: list[dict]):
    image, _ = square_scene(5)
    return client.post("/predict", json={"project": "1.1", "label_config": SMART_XML,
                                         "tasks": [{"id": 300, "data": {"image": png_data_uri(image)}}],
                                         "params": {"context": {"result": regions}}})


def _box(x, y, w, h) -> dict:
    return {"type": "rectanglelabels", "value": {"x": x, "y": y, "width": w, "height": h, "rectanglelabels": ["square"]}}


def test_too_many_prompts_are_refused_before_anything_is_queued(client, redis):
    """600 boxes in one smart-tool request: 400 naming MAX_PROMPTS, and no job was queued."""
    client.post("/setup", json={"project": "1.1", "schema": SMART_XML})
    r = _smart(client, [_box(1, 1, 5, 5)] * 600)
    assert r.status_code == 400 and "MAX_PROMPTS=32" in r.json["error"]
    assert sum(queue_lengths(redis).values()) == 0


@pytest.mark.parametrize("value, field", [
    ({"x": 2**80, "y": 1, "width": 5, "height": 5}, "value.x"),
    ({"x": float("inf"), "y": 1, "width": 5, "height": 5}, "value.x"),  # JSON 1e400 parses to infinity
    ({"x": 1, "y": 1.7e308, "width": 5, "height": 5}, "value.y"),
    ({"x": 1, "y": 1, "width": -3, "height": 5}, "value.width"),
    ({"x": 90, "y": 1, "width": 20, "height": 5}, "ends outside the image"),
    ({"x": "1", "y": 1, "width": 5, "height": 5}, "value.x"),
])
def test_hostile_numbers_are_400_naming_the_field(client, redis, value, field):
    """Coordinates out of 0..100, non-numbers and boxes beyond the image: 400 from the web, nothing queued."""
    client.post("/setup", json={"project": "1.1", "schema": SMART_XML})
    r = _smart(client, [{"type": "rectanglelabels", "value": {**value, "rectanglelabels": ["square"]}}])
    assert r.status_code == 400 and field in r.json["error"], r.json
    assert sum(queue_lengths(redis).values()) == 0


def test_job_ids_rq_refuses_are_400(client):
    assert client.get("/jobs/a.b").status_code == 400
    assert "letters, digits" in client.post("/jobs/a.b/retry").json["error"]
    assert client.get("/jobs/no-such-job").status_code == 404


def test_a_smart_tool_job_stops_between_passes_once_its_deadline_passed(tiny_model, scenes):
    """refine asks before each model pass; after the deadline the remaining boxes are not run."""
    images, masks = zip(*scenes[:2])
    memory = tiny_model.encode_support(list(images), list(masks))
    asked = []

    def expired() -> bool:
        asked.append(1)
        return len(asked) > 1  # the deadline passes after the first pass

    prompt = LabelPrompt(boxes=[(0, 0, 50, 50), (50, 50, 50, 50), (0, 50, 50, 50)])
    with pytest.raises(DeadlinePassed, match="after 1 of 3 boxes"):
        refine(tiny_model, scenes[2][0], memory, prompt, expired)
    assert len(asked) == 2


def test_fragmented_masks_are_smoothed_or_refused_quickly():
    """A noisy mask over MAX_MASK_RUNS is smoothed; a 1-pixel comb at 4000x3000 (89 MB of RLE) is refused."""
    comb = np.zeros((3000, 4000), bool)
    comb[:, ::2] = True
    with pytest.raises(MaskTooFragmented, match="too fragmented"):
        bounded(comb)
    noisy = np.zeros((3000, 4000), bool)
    noisy[500:2500, 1000:3000] = True
    noisy[::2, ::2] |= np.random.default_rng(0).random((1500, 2000)) > 0.5
    smooth = bounded(noisy)
    assert runs(noisy) > 1_000_000 >= runs(smooth)
    assert smooth[600:2400, 1100:2900].all(), "the object itself is kept"
    square = np.zeros((60, 80), bool)
    square[10:30, 10:40] = True
    assert bounded(square) is square


def test_retrying_a_failed_training_job_takes_the_training_lock(client, redis, settings):
    """POST /jobs/<id>/retry of a failed training run while another run is live: 409, and one run at a time."""
    from rq.job import Job

    from backend.core.registry import TRAIN_LOCK_KEY

    client.post("/setup", json={"project": "1.1", "schema": CONFIG_XML})
    first = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).json
    job = Job.fetch(first["job"], connection=redis)
    job.set_status("failed")  # as if it had failed: its lock released, another run queued meanwhile
    redis.delete(TRAIN_LOCK_KEY.format(pid=1))
    time.sleep(0.01)
    second = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).json
    assert second["status"] == "queued" and second["job"] != first["job"]
    r = client.post(f"/jobs/{first['job']}/retry")
    assert r.status_code == 409 and second["job"] in r.json["error"]
    assert redis.get(TRAIN_LOCK_KEY.format(pid=1)).decode() == second["job"]


def test_failures_of_a_worker_with_other_settings_reach_status(client, worker, redis, settings):
    """The web knows a Label Studio the worker has no credential for: /prelabel answers queued, and the job's
    failure, with why, shows in /status."""
    from backend.web.app import create_app

    web = create_app(settings.replace(label_studio_url="http://ls-elsewhere:8080", label_studio_api_key="k"),
                     redis).test_client()
    assert web.post("/setup", json={"project": "1.1", "schema": CONFIG_XML}).status_code == 200
    assert web.post("/prelabel/1").status_code == 202
    deadline = time.monotonic() + 30
    while not web.get("/status/1").json["job_failures"] and time.monotonic() < deadline:
        time.sleep(0.1)
    failures = web.get("/status/1").json["job_failures"]
    assert failures and all("no credential for Label Studio at http://ls-elsewhere:8080" in f["error"] for f in failures)
    assert {f["kind"] for f in failures} <= {"list-tasks", "backfill", "review-view"}


def test_a_webhook_too_large_to_ingest_inline_is_answered_at_once(client, worker, redis, settings):
    """A 200,000-point polygon annotation: 202 before any parsing, then ingested by a job like any webhook."""
    client.post("/setup", json={"project": "1.1", "schema": CONFIG_XML.replace(
        '</View>', '<PolygonLabels name="poly" toName="image"><Label value="square"/></PolygonLabels></View>')})
    angle = np.linspace(0, 2 * np.pi, 200_000)
    points = np.stack([50 + 30 * np.cos(angle), 50 + 30 * np.sin(angle)], 1).round(4).tolist()
    event = annotation_event(10, 100, *square_scene(0))
    event["annotation"]["result"] = [{"from_name": "poly", "to_name": "image", "type": "polygonlabels",
                                      "original_width": 64, "original_height": 48,
                                      "value": {"points": points, "polygonlabels": ["square"]}}]
    del event["project"]["label_config"]
    r = client.post("/webhook", json=event)
    assert r.status_code == 202 and r.json["bytes"] > settings.webhook_inline_bytes
    deadline = time.monotonic() + 30
    while client.get("/status/1").json["examples"] != {"square": 1} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.get("/status/1").json["examples"] == {"square": 1}
    assert redis.keys("dws:webhook-body:*") == [], "the body is dropped once ingested"
