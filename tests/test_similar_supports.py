"""SUPPORT_POLICY=similar: each query gets the examples most like it; warm queries read nothing; pools follow edits."""

from __future__ import annotations

import numpy as np
import pytest

from backend.core.descriptors import DescriptorStore
from backend.core.label_config import parse_label_config
from backend.core.settings import Settings
from backend.core.store import Example, SupportStore
from backend.worker.example_files import ExampleFiles
from backend.worker.media import MediaFetcher
from backend.worker.segmenter import FewShotSegmenter
from backend.worker.similar import SimilarSupports

from bench.synthetic import CONFIG_XML, annotation_event, png_data_uri, square_scene

CONFIG = parse_label_config(CONFIG_XML)


def scene(kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A dark picture with a bright square ("dark"), or its negative ("bright"): two kinds of scene."""
    image, mask = square_scene(seed, (64, 64))
    return (image if kind == "dark" else 255 - image), mask


def _example(aid: int, kind: str, seed: int) -> Example:
    event = annotation_event(aid, 100 + aid, *scene(kind, seed))
    return Example.from_annotation(event["annotation"], event["task"], CONFIG)


def _task(task_id: int, kind: str, seed: int) -> dict:
    return {"id": task_id, "data": {"image": png_data_uri(scene(kind, seed)[0])}}


KINDS = {1: "dark", 2: "dark", 3: "dark", 4: "bright", 5: "bright", 6: "bright"}


@pytest.fixture
def store(settings, redis) -> SupportStore:
    store = SupportStore(redis, settings.model_dir)
    store.register_project(1, CONFIG_XML)
    for aid, kind in KINDS.items():
        store.upsert(1, _example(aid, kind, aid))
    return store


def _segmenter(settings, store, model, similar=None) -> FewShotSegmenter:
    similar_settings = Settings(**{**settings.model_dump(), "support_policy": "similar", "max_shots": 2})
    return FewShotSegmenter(similar_settings, store, model, "v1", ExampleFiles(store, MediaFetcher(similar_settings, None)),
                            similar=similar)


def _capture(model, monkeypatch) -> list:
    seen = []
    original = model.segment_many_encoded
    monkeypatch.setattr(model, "segment_many_encoded", lambda q, s, **kw: seen.append(s) or original(q, s, **kw))
    return seen


def test_each_query_gets_the_examples_most_like_it(settings, store, tiny_model, monkeypatch):
    """In one batch, a dark query is given dark examples and a bright one bright examples (2 shots each)."""
    segmenter = _segmenter(settings, store, tiny_model)
    seen = _capture(tiny_model, monkeypatch)
    run = segmenter.predict(1, [_task(20, "dark", 20), _task(21, "bright", 21)], CONFIG)
    assert set(run.predictions) == {20, 21} and not run.failures
    per_query = seen[0]
    examples = tiny_model.describe_images([scene(KINDS[a], a)[0] for a in KINDS]).numpy()
    for memories, kind in zip(per_query, ("dark", "bright")):
        memory = memories["square"]
        assert memory.num_shots == 2
        nearest = [list(KINDS)[int(np.argmax(examples @ row))] for row in memory.descriptors.numpy()]
        assert [KINDS[a] for a in nearest] == [kind, kind], nearest
    assert per_query[0]["square"] is not per_query[1]["square"]


def test_a_warm_query_reads_no_example_and_no_descriptor(settings, store, tiny_model, monkeypatch):
    """Once the pool and the chosen parts are in the process, predicting again does no support I/O at all."""
    segmenter = _segmenter(settings, store, tiny_model)
    task = _task(20, "dark", 20)
    first = segmenter.predict(1, [task], CONFIG).predictions[20]

    def no_io(*args, **kwargs):
        raise AssertionError("a warm query read support examples")

    for target, name in ((store, "pool"), (store, "select"), (segmenter.files, "image_bytes"),
                         (segmenter.files, "example_mask"), (DescriptorStore, "get_many")):
        monkeypatch.setattr(target, name, no_io)
    again = segmenter.predict(1, [task], CONFIG).predictions[20]
    assert [r["value"] for r in again["result"]] == [r["value"] for r in first["result"]]


def test_descriptors_are_computed_once_for_all_processes(settings, store, tiny_model, monkeypatch):
    """A second process (a fresh SimilarSupports) takes the pool's descriptors from Redis: no image is described."""
    _segmenter(settings, store, tiny_model).predict(1, [_task(20, "dark", 20)], CONFIG)
    stored = store.redis.hlen(DescriptorStore.key(1, tiny_model.descriptor_space))
    assert stored == len(KINDS)
    monkeypatch.setattr(tiny_model, "describe_images", lambda *a, **k: (_ for _ in ()).throw(AssertionError("described")))
    other = _segmenter(settings, store, tiny_model, similar=SimilarSupports(store))
    pool = other.similar.pool(tiny_model, 1, "square", store.label_revisions(1)["square"], lambda e, label: None)
    assert [e.annotation_id for e in pool.examples] == list(KINDS)


def test_a_changed_label_rereads_its_pool_and_forgets_removed_examples(settings, store, tiny_model):
    """A new example joins the pool at the next query; a removed one leaves it, and its part is forgotten."""
    segmenter = _segmenter(settings, store, tiny_model)
    segmenter.predict(1, [_task(20, "dark", 20), _task(21, "bright", 21)], CONFIG)
    parts_before = {k[3] for k in segmenter.similar._parts}
    store.upsert(1, _example(7, "bright", 7))
    store.remove(1, [a for a in parts_before if KINDS[a] == "dark"][:1])
    segmenter.predict(1, [_task(21, "bright", 21)], CONFIG)
    pool = segmenter.similar._pools[(tiny_model.descriptor_space, 1, "square")]
    ids = [e.annotation_id for e in pool.examples]
    assert 7 in ids and len(ids) == len(KINDS)
    removed = [a for a in parts_before if KINDS[a] == "dark"][0]
    assert removed not in ids and removed not in {k[3] for k in segmenter.similar._parts}


def test_an_example_whose_image_cannot_be_read_is_left_out_and_reported(settings, store, tiny_model):
    """An example with an unreachable image is recorded in the project's errors; the others still predict."""
    event = annotation_event(9, 109, *scene("dark", 9))
    event["task"]["data"]["image"] = "/data/upload/1/missing.png"  # a Label Studio upload, with no API configured
    store.upsert(1, Example.from_annotation(event["annotation"], event["task"], CONFIG))
    run = _segmenter(settings, store, tiny_model).predict(1, [_task(20, "dark", 20)], CONFIG)
    assert 20 in run.predictions
    assert "skipped when predicting" in store.errors(1)["9"]


def test_a_label_without_examples_gets_no_prediction(settings, redis, tiny_model):
    """With no example at all, the task fails with the reason (no empty prediction that would block a retry)."""
    store = SupportStore(redis, settings.model_dir)
    store.register_project(2, CONFIG_XML)
    run = _segmenter(settings, store, tiny_model).predict(2, [_task(20, "dark", 20)], CONFIG)
    assert run.predictions == {} and "no support examples yet" in run.failures[0].message


def test_the_smart_tool_uses_the_examples_like_its_image(settings, store, tiny_model, monkeypatch):
    """A click with a box under the similar policy refines with the query's own supports."""
    from backend.worker import segmenter as segmenter_module

    used = []
    monkeypatch.setattr(segmenter_module, "refine",
                        lambda model, image, memory, prompt, expired: used.append(memory) or (np.zeros((64, 64), bool), 0.0))
    seg = _segmenter(settings, store, tiny_model)
    seg.predict_interactive(1, _task(21, "bright", 21), CONFIG, {"square": object()})
    examples = tiny_model.describe_images([scene(KINDS[a], a)[0] for a in KINDS]).numpy()
    nearest = [list(KINDS)[int(np.argmax(examples @ row))] for row in used[0].descriptors.numpy()]
    assert {KINDS[a] for a in nearest} == {"bright"}


def test_settings_name_the_policies():
    """An unknown SUPPORT_POLICY is refused with the list, similar included."""
    with pytest.raises(ValueError, match="similar"):
        Settings(support_policy="closest")


def test_ingestion_describes_the_pool_so_a_click_describes_none_of_it(settings, store, tiny_model, monkeypatch):
    """SUPPORT_POLICY=similar: the ingest job that caches new examples also describes their label's pool; a click in
    another process then describes no example image (only reads the descriptors)."""
    from backend.core.context import resolve_project
    from backend.worker.ingest_jobs import ingest_examples
    from backend.worker.runtime import WorkerContext, set_context

    similar_settings = settings.replace(support_policy="similar", max_shots=2)
    ingest = WorkerContext(similar_settings, store.redis, store)
    ingest.models.base = tiny_model
    set_context(ingest)
    try:
        out = ingest_examples(resolve_project(similar_settings, store, 1).to_job(), list(KINDS))
    finally:
        set_context(None)
    assert out["done"] == len(KINDS) and out["described"] == len(KINDS)
    assert store.redis.hlen(DescriptorStore.key(1, tiny_model.descriptor_space)) == len(KINDS)
    described = []
    original = tiny_model.describe_images
    monkeypatch.setattr(tiny_model, "describe_images", lambda images, *a, **k: described.append(len(images))
                        or original(images, *a, **k))
    click = _segmenter(settings, store, tiny_model, similar=SimilarSupports(store))  # another worker process
    run = click.predict(1, [_task(20, "dark", 20)], CONFIG)
    assert set(run.predictions) == {20} and described == []
