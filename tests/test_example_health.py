"""Examples that cannot be used: skipped without another fetch until their next try (backing off), counted apart."""

from __future__ import annotations

import json

import pytest

from backend.core.example_health import RETRY_S, ExampleHealth
from backend.core.label_config import parse_label_config
from backend.core.store import Example, SupportStore
from backend.worker.example_files import ExampleFiles
from backend.worker.media import MediaFetcher
from backend.worker.segmenter import FewShotSegmenter

from bench.synthetic import CONFIG_XML, annotation_event, png_data_uri, square_scene

CONFIG = parse_label_config(CONFIG_XML)


def _example(aid: int, url: str | None = None) -> Example:
    event = annotation_event(aid, 100 + aid, *square_scene(aid))
    if url is not None:
        event["task"]["data"]["image"] = url
    return Example.from_annotation(event["annotation"], event["task"], CONFIG)


def test_backoff_grows_and_success_or_an_edit_forgets(redis, settings):
    store = SupportStore(redis, settings.model_dir)
    store.register_project(1, CONFIG_XML)
    store.upsert(1, _example(1))
    store.upsert(1, _example(2))
    health = ExampleHealth(redis)
    waits = [health.failed(1, 1, ["square"], "HTTP 404") for _ in range(5)]
    assert waits == [*RETRY_S, RETRY_S[-1]]
    assert health.blocked(1, 1).startswith("HTTP 404 (next try in ")
    assert health.usable_counts(store.label_counts(1), 1) == {"square": 1}
    health.recovered(1, 1)
    assert health.blocked(1, 1) is None and health.usable_counts(store.label_counts(1), 1) == {"square": 2}
    health.failed(1, 2, ["square"], "HTTP 404")
    edited = _example(2)
    edited.regions[0]["rle"] = list(reversed(edited.regions[0]["rle"]))  # new content: tried afresh
    assert store.upsert(1, edited)
    assert health.unusable(1) == {}
    health.failed(1, 2, ["square"], "HTTP 404")
    store.remove(1, [2])
    assert health.unusable(1) == {}


def test_a_missing_image_is_fetched_once_then_skipped_and_counted_apart(redis, settings, tiny_model, client,
                                                                       monkeypatch):
    """Three clicks: one fetch of the missing image, not three; /status counts 2 usable examples and names the third."""
    store = SupportStore(redis, settings.model_dir)
    client.post("/setup", json={"project": "1", "schema": CONFIG_XML, "hostname": "", "access_token": ""})
    store.upsert(1, _example(1))
    store.upsert(1, _example(2))
    store.upsert(1, _example(3, "http://127.0.0.1:9/gone.png"))
    fetcher = MediaFetcher(settings, None)
    fetched = []
    original = fetcher.fetch
    monkeypatch.setattr(fetcher, "fetch", lambda url, task_id: fetched.append(url) or original(url, task_id))
    segmenter = FewShotSegmenter(settings, store, tiny_model, "v1", ExampleFiles(store, fetcher))
    task = {"id": 9, "data": {"image": png_data_uri(square_scene(9)[0])}}
    for _ in range(3):
        segmenter.sets._current.clear()  # as a new support set would: every click selects again
        assert 9 in segmenter.predict(1, [task], CONFIG).predictions
    assert fetched.count("http://127.0.0.1:9/gone.png") == 1
    status = client.get("/status/1").json
    assert status["examples"] == {"square": 2}
    assert status["unusable_examples"]["3"]["labels"] == ["square"] and "skipped when predicting" in \
        status["annotation_errors"]["3"]


@pytest.mark.parametrize("tries", [1, 3])
def test_a_due_example_is_tried_again(redis, settings, tries):
    """Once its next try is due (Redis's clock), the example may be fetched again."""
    health = ExampleHealth(redis)
    for _ in range(tries):
        health.failed(1, 7, ["square"], "timeout")
    key = "dws:unusable:1"
    record = json.loads(redis.hget(key, "7"))
    record["retry_at"] -= RETRY_S[tries - 1] + 1
    redis.hset(key, "7", json.dumps(record))
    assert health.blocked(1, 7) is None
