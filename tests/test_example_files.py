"""The disk cache of support images and masks: keyed by image URL, cleaned up, never fatal when the disk is."""

from __future__ import annotations

import time

from .waits import wait_idle
from bench.synthetic import CONFIG_XML, annotation_event, png_data_uri, square_scene

SETUP = {"project": "1.1", "schema": CONFIG_XML}


def _drain(client) -> None:
    wait_idle(client)
    time.sleep(0.3)


def _click(client):
    query, _ = square_scene(5)
    return client.post("/predict", json={"project": "1.1", "label_config": CONFIG_XML,
                                         "tasks": [{"id": 300, "data": {"image": png_data_uri(query)}}]})


def test_unwritable_model_dir_does_not_stop_predictions(client, worker, settings):
    """The image and mask caches cannot be written (a file where their folder should be): predictions still work."""
    images = settings.model_dir / "projects" / "1"
    images.mkdir(parents=True)
    (images / "images").write_text("not a folder")
    (images / "masks").write_text("not a folder")
    client.post("/setup", json=SETUP)
    client.post("/webhook", json=annotation_event(10, 100, *square_scene(0)))
    _drain(client)
    r = _click(client)
    assert r.status_code == 200 and r.json["results"][0]["result"]


def test_cache_follows_the_image_url_and_is_cleaned_up(client, worker, settings, redis):
    """A task whose image changes gets the new image cached (the old one dropped); deleting the annotation
    removes its image and masks."""
    from backend.core.store import SupportStore

    store = SupportStore(redis, settings.model_dir)
    client.post("/setup", json=SETUP)
    first = annotation_event(10, 100, *square_scene(0))
    client.post("/webhook", json=first)
    _drain(client)
    old_image = store.image_path(1, 100, first["task"]["data"]["image"])
    assert old_image.is_file()
    moved = annotation_event(10, 100, *square_scene(1), action="ANNOTATION_UPDATED")
    client.post("/webhook", json=moved)
    _drain(client)
    new_image = store.image_path(1, 100, moved["task"]["data"]["image"])
    assert new_image.is_file() and not old_image.exists()
    masks = list((settings.model_dir / "projects" / "1" / "masks").iterdir())
    assert masks
    client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "project": {"id": 1}, "annotations": [{"id": 10}]})
    assert not new_image.exists() and not any(m.exists() for m in masks)


def test_replaced_support_sets_leave_the_cache(client, settings, redis):
    """A project's support set changes: the memory of the old one is evicted, not kept until the cache is full."""
    import threading

    from model import DiffewS

    from backend.core.store import SupportStore
    from backend.worker.rq_worker import InProcessWorker
    from backend.worker.runtime import WorkerContext, set_context

    context = WorkerContext(settings, redis, SupportStore(redis, settings.model_dir))
    context.models.base = model = DiffewS.tiny(resolution=64)
    set_context(context)
    w = InProcessWorker(["predict-high", "ingest"], connection=redis)
    thread = threading.Thread(target=w.work, daemon=True)
    thread.start()
    try:
        client.post("/setup", json=SETUP)
        client.post("/webhook", json=annotation_event(10, 100, *square_scene(0)))
        assert _click(client).status_code == 200 and len(model.support_cache) == 1
        client.post("/webhook", json=annotation_event(11, 101, *square_scene(1)))
        assert _click(client).status_code == 200 and len(model.support_cache) == 1  # not 2
    finally:
        w.stop()
        thread.join(20)
        set_context(None)
