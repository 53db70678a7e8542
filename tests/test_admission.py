"""Admission control: clicks that cannot be answered in time get 503 + Retry-After at once, not a late 504."""

from __future__ import annotations

import threading
import time

import pytest

from backend.core.admission import (
    CLICK_SECONDS_KEY,
    admit_click,
    click_ended,
    click_started,
    expected_wait_s,
    record_click_seconds,
)
from backend.core.errors import Overloaded

from bench.synthetic import CONFIG_XML, annotation_event, png_data_uri, square_scene

SETUP = {"project": "1.1", "schema": CONFIG_XML}


def _click(client, task_id: int = 300):
    query, _ = square_scene(5)
    return client.post("/predict", json={"project": "1.1", "label_config": CONFIG_XML,
                                         "tasks": [{"id": task_id, "data": {"image": png_data_uri(query)}}]})


def test_more_pending_clicks_than_the_workers_can_answer_are_refused(redis, settings):
    """Five pending clicks at 10 s each for one worker: a new one would wait 60 s > 30 s, refused with Retry-After."""
    redis.set(CLICK_SECONDS_KEY, 10)
    now = 1000.0
    for i in range(2):
        click_started(redis, f"c{i}", deadline=now + 30)
    admit_click(redis, settings, workers=1, now=now)  # (2 + 1) * 10 = 30 s: just within
    for i in range(2, 5):
        click_started(redis, f"c{i}", deadline=now + 30)
    click_started(redis, "stale", deadline=now - 1)  # past its deadline: no longer counts
    with pytest.raises(Overloaded) as refused:
        admit_click(redis, settings, workers=1, now=now)
    assert refused.value.retry_after == 30 and "5 model passes are pending for 1 worker" in refused.value.message
    admit_click(redis, settings, workers=2, now=now)  # two workers work it off in 30 s
    click_ended(redis, "c0")
    assert expected_wait_s(redis, 1, now) == (50.0, 4, 10.0)
    admit_click(redis, settings.replace(admission_control=False), workers=1, now=now)  # off: never refuses
    assert redis.hlen("dws:clicks:cost") == 4, "the stale click's cost went with it"


def test_a_smart_tool_request_counts_its_model_passes(redis, settings):
    """A request with 4 boxes costs 4 passes: admitted alone in 30 s, refused behind another such request."""
    redis.set(CLICK_SECONDS_KEY, 7)
    now = 1000.0
    admit_click(redis, settings, workers=1, now=now, cost=4)  # 4 * 7 = 28 s
    click_started(redis, "boxes", deadline=now + 30, cost=4)
    with pytest.raises(Overloaded, match=r"4 model passes are pending .* this request \(4 passes\)"):
        admit_click(redis, settings, workers=1, now=now, cost=4)
    click_ended(redis, "boxes")
    admit_click(redis, settings, workers=1, now=now, cost=4)  # the passes ahead are done


def test_click_seconds_are_a_moving_average(redis):
    """The first measurement sets the average; later ones move it by a fifth."""
    record_click_seconds(redis, 2.0)
    record_click_seconds(redis, 7.0)
    assert float(redis.get(CLICK_SECONDS_KEY)) == pytest.approx(3.0)


def test_overloaded_click_gets_503_with_retry_after(client, worker, redis):
    """When recent clicks took longer than PREDICT_WAIT_S, /predict says so at once (503, Retry-After)."""
    client.post("/setup", json=SETUP)
    client.post("/webhook", json=annotation_event(10, 100, *square_scene(0)))
    redis.set(CLICK_SECONDS_KEY, 100)
    started = time.monotonic()
    r = _click(client)
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1 and "PREDICT_WAIT_S" in r.json["error"]
    assert time.monotonic() - started < 2
    redis.delete(CLICK_SECONDS_KEY)
    assert _click(client).status_code == 200


def test_waiting_clicks_per_process_are_bounded(redis, settings, tiny_model):
    """PREDICT_CONCURRENCY=1: while one click waits, a second is refused at once; the first is answered."""
    from backend.web.app import create_app

    from .conftest import LiveBackend
    from .test_delivery import SlowModel

    configured = settings.replace(predict_concurrency=1)
    backend = LiveBackend(configured, redis, SlowModel(tiny_model, 2.0))
    try:
        client = create_app(configured, redis).test_client()
        client.post("/setup", json=SETUP)
        client.post("/webhook", json=annotation_event(10, 100, *square_scene(0)))
        first = {}
        thread = threading.Thread(target=lambda: first.setdefault("r", _click(client, 301)))
        thread.start()
        time.sleep(0.5)
        started = time.monotonic()
        second = _click(client, 302)
        assert second.status_code == 503 and "PREDICT_CONCURRENCY=1" in second.json["error"]
        assert time.monotonic() - started < 1 and second.headers["Retry-After"] == "2"
        thread.join(30)
        assert first["r"].status_code == 200
    finally:
        backend.stop()
