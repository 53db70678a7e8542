"""Ingestion: annotations become, replace or remove support examples; a bad one is reported and harms nothing."""

from __future__ import annotations

from backend.core.ingest import ingest
from backend.core.label_config import parse_label_config
from backend.core.store import SupportStore

from bench.synthetic import CONFIG_XML, annotation_event, square_scene


def _pair(aid: int, seed: int, **kwargs):
    event = annotation_event(aid, 100 + aid, *square_scene(seed), **kwargs)
    return event["annotation"], event["task"]


def test_ingest_stores_keeps_removes_and_reports(redis, tmp_path):
    store, config = SupportStore(redis, tmp_path), parse_label_config(CONFIG_XML)
    store.register_project(1, CONFIG_XML)
    report = ingest(store, 1, config, [_pair(1, 1), _pair(2, 2, label="other")])
    assert report.stored == [1, 2] and store.label_counts(1) == {"square": 1, "other": 1}
    bad_annotation, bad_task = _pair(1, 1)
    bad_annotation["result"][0]["original_width"] += 1  # its RLE no longer matches the image size
    report = ingest(store, 1, config, [_pair(2, 2, label="other"), (bad_annotation, bad_task), ("x", None),
                                       (_pair(3, 3)[0], None)])
    assert report.unchanged == [2] and report.stored == []
    assert set(report.errors) == {"1", "?", "3"} and "RLE declares" in report.errors["1"]
    assert "missing from the payload" in report.errors["3"]
    assert store.label_counts(1) == {"square": 1, "other": 1}, "the stored example of annotation 1 is kept"
    assert store.errors(1).keys() == {"1", "?", "3"}
    report = ingest(store, 1, config, [_pair(1, 1, cancelled=True)])
    assert report.removed == [1] and store.label_counts(1) == {"other": 1}
    assert "1" not in store.errors(1), "a removed annotation's old error is cleared"


def test_the_ingest_job_encodes_the_supports_so_the_next_click_encodes_nothing(redis, settings, tiny_model,
                                                                              monkeypatch):
    """After the cache-examples job of new examples, a click in the same worker process finds every label's support
    memory ready: the model encodes no support for it."""
    from backend.core.context import resolve_project
    from backend.core.label_config import parse_label_config
    from backend.worker.ingest_jobs import ingest_examples
    from backend.worker.runtime import WorkerContext, set_context

    from bench.synthetic import png_data_uri

    store = SupportStore(redis, settings.model_dir)
    store.register_project(1, CONFIG_XML)
    ingest(store, 1, parse_label_config(CONFIG_XML), [_pair(1, 1), _pair(2, 2), _pair(3, 3, label="other")])
    ctx = WorkerContext(settings, redis, store)
    ctx.models.base = tiny_model
    project = resolve_project(settings, store, 1)
    set_context(ctx)
    try:
        out = ingest_examples(project.to_job(), [1, 2, 3])
        assert out["done"] == 3 and out["encoded"] == 2  # "square" and "other"
        encoded = []
        monkeypatch.setattr(tiny_model, "encode_support", lambda *a, **k: encoded.append(a) or None)
        run = ctx.segmenter(project).predict(1, [{"id": 50, "data": {"image": png_data_uri(square_scene(9)[0])}}],
                                             project.config)
    finally:
        set_context(None)
    assert set(run.predictions) == {50} and encoded == []
