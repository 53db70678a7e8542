"""Support sets: a warm click reads no support at all; a changed label re-reads its K examples and drops the old set."""

from __future__ import annotations

import pytest

from backend.core.label_config import parse_label_config
from backend.core.store import Example, SupportStore
from backend.core.supports import SupportSetKey, SupportSets
from backend.worker.example_files import ExampleFiles
from backend.worker.media import MediaFetcher
from backend.worker.segmenter import FewShotSegmenter

from bench.synthetic import CONFIG_XML, annotation_event, png_data_uri, square_scene


def test_support_sets_answer_only_the_exact_revision():
    """lookup answers only the key that was remembered; a newer revision replaces it and names the old memory."""
    sets = SupportSets()
    first = SupportSetKey("v1", 1, "car", 3, "newest", 5)
    assert sets.lookup(first) is None
    assert sets.remember(first, "mem-a") is None
    assert sets.lookup(first) == "mem-a"
    newer = SupportSetKey("v1", 1, "car", 4, "newest", 5)
    assert sets.lookup(newer) is None
    assert sets.remember(newer, "mem-b") == "mem-a"
    assert sets.remember(newer, "mem-b") is None  # the same memory again replaces nothing
    assert sets.lookup(SupportSetKey("v2", 1, "car", 4, "newest", 5)) is None  # per model version


def _example(aid: int, seed: int) -> Example:
    event = annotation_event(aid, 100 + aid, *square_scene(seed))
    return Example.from_annotation(event["annotation"], event["task"], parse_label_config(CONFIG_XML))


def _without_ids(prediction: dict) -> dict:
    return {**prediction, "result": [{k: v for k, v in r.items() if k != "id"} for r in prediction["result"]]}


@pytest.fixture
def segmenter(settings, redis, tiny_model) -> FewShotSegmenter:
    store = SupportStore(redis, settings.model_dir)
    store.register_project(1, CONFIG_XML)
    for aid in range(1, 4):
        store.upsert(1, _example(aid, aid))
    return FewShotSegmenter(settings, store, tiny_model, "v1", ExampleFiles(store, MediaFetcher(settings, None)))


def test_warm_click_reads_no_support(segmenter, monkeypatch):
    """Once a label's set is encoded at its revision, predicting again selects, reads and decodes nothing."""
    config = parse_label_config(CONFIG_XML)
    task = {"id": 9, "data": {"image": png_data_uri(square_scene(9)[0])}}
    first = segmenter.predict(1, [task], config)
    assert first.predictions[9]["result"], "the cold click found the square"

    def no_io(*args, **kwargs):
        raise AssertionError("a warm click read support examples")

    monkeypatch.setattr(segmenter.store, "select", no_io)
    monkeypatch.setattr(segmenter.files, "image_bytes", no_io)
    monkeypatch.setattr(segmenter.files, "example_mask", no_io)
    again = segmenter.predict(1, [task], config)
    assert _without_ids(again.predictions[9]) == _without_ids(first.predictions[9])
    monkeypatch.undo()

    old_key = next(iter(segmenter.sets._current.values()))[1]
    segmenter.store.upsert(1, _example(4, 4))  # a new example: the label's revision moves on
    selected = []
    original = segmenter.store.select
    monkeypatch.setattr(segmenter.store, "select", lambda *a: selected.append(a) or original(*a))
    segmenter.predict(1, [task], config)
    assert len(selected) == 1
    assert segmenter.model.support_cache.get(old_key) is None, "the replaced support set was dropped"


def test_masks_below_their_labels_threshold_are_left_out(segmenter):
    """MASK_MIN_SCORE drops masks scoring below it (counted as predicted, not kept); MASK_MIN_SCORES overrides it per
    label; the model's own default applies when neither is set."""
    config = parse_label_config(CONFIG_XML)
    task = {"id": 9, "data": {"image": png_data_uri(square_scene(9)[0])}}
    every = segmenter.predict(1, [task], config)
    [region] = every.predictions[9]["result"]
    assert (every.masks, every.kept) == (1, 1) and 0 < region["score"] < 1
    segmenter.settings = segmenter.settings.replace(mask_min_score=1.0)
    strict = segmenter.predict(1, [task], config)
    assert (strict.masks, strict.kept) == (1, 0)
    assert strict.predictions[9]["result"] == [] and strict.predictions[9]["score"] == 0.0
    segmenter.settings = segmenter.settings.replace(mask_min_scores={"square": round(region["score"], 4) - 0.001})
    assert segmenter.predict(1, [task], config).kept == 1  # the label's own threshold wins over MASK_MIN_SCORE
    segmenter.settings = segmenter.settings.replace(mask_min_score=None, mask_min_scores={})
    segmenter.model.suggested_min_score = 1.0  # an instance attribute: the session's model class is untouched
    try:
        assert segmenter.predict(1, [task], config).kept == 0
    finally:
        del segmenter.model.suggested_min_score
