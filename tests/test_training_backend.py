"""Training from the backend: START_TRAINING queues one job, a version is scored, promoted and hot-swapped."""

from __future__ import annotations

import threading
import time

import pytest

from backend.core.queues import QUEUE_CLICK, QUEUE_TRAIN, live_workers
from backend.core.store import SupportStore
from backend.worker.training import cv_plan, folds_of
from backend.worker.rq_worker import InProcessWorker
from backend.worker.runtime import WorkerContext, set_context

from bench.synthetic import CONFIG_XML, annotation_event, png_data_uri, square_scene

SETUP = {"project": "1.1", "schema": CONFIG_XML}


@pytest.fixture
def two_workers(settings, redis, tiny_model):
    """A training worker and a prediction worker in threads, sharing one worker context (like one GPU box)."""

    # Short runs (what is tested is the queueing, promotion and hot swap, not how much training helps).
    settings = settings.replace(train_steps=24, cv_folds=2)
    context = WorkerContext(settings, redis, SupportStore(redis, settings.model_dir))
    context.models.base = tiny_model
    set_context(context)
    workers = [InProcessWorker([QUEUE_TRAIN], connection=redis), InProcessWorker([QUEUE_CLICK, "ingest", "predict-bulk"], connection=redis)]
    threads = [threading.Thread(target=w.work, kwargs={"burst": False}, daemon=True) for w in workers]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while (live_workers(redis)[QUEUE_TRAIN] == 0 or live_workers(redis)[QUEUE_CLICK] == 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    yield workers
    for w, t in zip(workers, threads):
        w.stop()
        t.join(20)
    set_context(None)


def _predict(client, i: int) -> dict:
    query, _ = square_scene(40 + i)
    r = client.post("/predict", json={"tasks": [{"id": 500 + i, "data": {"image": png_data_uri(query)}}],
                                      "project": "1.1", "label_config": CONFIG_XML})
    assert r.status_code == 200, r.json
    return r.json["results"][0]


def test_start_training_promotes_and_hot_swaps(client, two_workers, redis):
    """START_TRAINING -> one job (a second is refused), a scored version, promotion, predictions switch version."""
    assert client.post("/setup", json=SETUP).status_code == 200
    for i in range(6):
        assert client.post("/webhook", json=annotation_event(10 + i, 100 + i, *square_scene(i))).status_code == 200
    base = "diffews-tiny-r64-untrained"
    assert _predict(client, 0)["model_version"] == base

    first = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).json
    second = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).json
    assert first["status"] == "queued" and second == {"action": "START_TRAINING", "status": "already queued or running",
                                                       "job": first["job"]}
    refused = client.get("/status/1").json["training_request"]  # the refusal leaves a trace
    assert refused["status"] == "already queued or running" and first["job"] in refused["why"]
    versions_seen, errors = [], []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # predictions keep working while the training job runs
        try:
            versions_seen.append(_predict(client, len(versions_seen))["model_version"])
        except AssertionError as exc:
            errors.append(str(exc))
        job = client.get(f"/jobs/{first['job']}").json
        if job["status"] in ("finished", "failed"):
            break
    assert job["status"] == "finished", job
    assert not errors
    info = client.get("/projects/1/versions").json
    [version] = info["versions"]
    assert version["name"] == f"{base.removesuffix('-untrained')}-p1-v1" and version["parent"] == base
    assert set(version["scores"]) == {version["name"], base}
    assert version["path"] == f"versions/1/{version['name']}"  # relative to MODEL_DIR
    if version["promoted"]:
        assert info["current"] == version["name"]
        assert _predict(client, 99)["model_version"] == version["name"]  # hot swap, no restart
    else:
        assert version["scores"][version["name"]] < version["scores"][base] and info["current"] == base
    assert client.get("/status/1").json["training"]["version"] == version["name"]
    assert version["name"] in client.get("/versions").json["versions"]
    assert job["meta"]["stage"] == "done" and "loss" in job["meta"]

    # Pin back to the base (roll back), then unpin.
    assert client.post("/projects/1/pin", json={"version": base}).json["current"] == base
    assert _predict(client, 100)["model_version"] == base
    assert client.post("/projects/1/pin", json={"version": None}).status_code == 200
    r = client.post("/projects/1/pin", json={"version": "nope"})
    assert r.status_code == 404 and "no version 'nope'" in r.json["error"]
    refused = client.post("/projects/1/pin", json={"version": 3})
    assert refused.status_code == 400 and "'version' must be a version's name" in refused.json["error"]


def test_train_every_triggers_once(client, redis, settings):
    """With TRAIN_EVERY=3, the third new annotation queues one training job."""

    from backend.web.app import create_app

    client = create_app(settings.replace(train_every=3), redis).test_client()
    client.post("/setup", json=SETUP)
    replies = [client.post("/webhook", json=annotation_event(10 + i, 100 + i, *square_scene(i))).json for i in range(4)]
    assert [("training" in r) for r in replies] == [False, False, True, False]
    assert replies[2]["training"]["status"] == "queued"


def test_cross_validation_queries_every_image_with_supports_from_other_folds():
    """Every labeled image is a query at least once, in its own fold, and no support comes from that fold."""
    from model.data import Sample

    images = [Sample(image=None, masks={label: True for label in labels}, name=str(i))
              for i, labels in enumerate([["a"], ["a", "b"], ["b"], ["a"], ["a", "b"], ["b"], ["a"]])]
    folds = folds_of(len(images), 3)
    assert sorted(i for fold in folds for i in fold) == list(range(7)) and len(folds) == 3
    queried = set()
    for f, fold in enumerate(folds):
        plan = cv_plan(images, ["a", "b"], fold, 2, budget=4, seed=f)
        assert plan == cv_plan(images, ["a", "b"], fold, 2, budget=4, seed=f)  # fixed seeds
        for label, query, supports in plan:
            assert query in fold and not set(supports) & set(fold) and label in images[query].masks
            assert all(label in images[i].masks for i in supports)
            queried.add(query)
    assert queried == set(range(7))
    assert folds_of(2, 3) == [[0], [1]]


def test_training_with_too_few_labels_fails_visibly(client, two_workers, redis):
    """A project with one labeled image: the training job fails with a message saying to label more."""
    client.post("/setup", json=SETUP)
    client.post("/webhook", json=annotation_event(10, 100, *square_scene(0)))
    job = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).json["job"]
    deadline = time.monotonic() + 30
    while client.get(f"/jobs/{job}").json["status"] not in ("failed", "finished") and time.monotonic() < deadline:
        time.sleep(0.1)
    info = client.get(f"/jobs/{job}").json
    assert info["status"] == "failed" and "label at least 2" in info["error"][0]
    # the lock is released: a new request queues again
    assert client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).json["status"] == "queued"


# ---- the promotion rule, deterministic (fixed seed) -----------------------------------------------


@pytest.fixture
def trainer(settings, redis, tiny_model):
    """Run train_project in this thread on a project with `n` labeled images (data URIs), given settings."""

    from backend.web.app import create_app
    from backend.core.context import resolve_project

    def run(n: int, **overrides) -> dict:
        configured = settings.replace(train_steps=8, train_seed=0, **overrides)
        context = WorkerContext(configured, redis, SupportStore(redis, configured.model_dir))
        context.models.base = tiny_model
        set_context(context)
        client = create_app(configured, redis).test_client()
        client.post("/setup", json=SETUP)
        for i in range(n):
            client.post("/webhook", json=annotation_event(10 + i, 100 + i, *square_scene(i)))
        from backend.worker.training import train_project

        return train_project(resolve_project(configured, context.store, 1).to_job(), "test")

    yield run
    set_context(None)


def test_promoted_when_not_worse(trainer, redis):
    """lr = 0 leaves the weights as they are: the same held-out score as the base, so it is promoted."""
    from backend.core.store import SupportStore

    out = trainer(10, train_lr=0.0)
    assert out["promoted"] and out["reason"].startswith("promoted")
    assert out["scores"][out["version"]] == out["scores"]["diffews-tiny-r64-untrained"]
    project = SupportStore(redis, "/").project(1)
    assert project["active_version"] == out["version"]


def test_kept_back_when_worse(trainer, redis):
    """A learning rate that wrecks the UNet scores below the base on the same images: kept back."""
    from backend.core.store import SupportStore

    out = trainer(10, train_lr=10.0)
    base = out["scores"]["diffews-tiny-r64-untrained"]
    assert not out["promoted"] and out["scores"][out["version"]] < base
    assert out["reason"].startswith("kept back") and "diffews-tiny-r64-untrained" in out["reason"]
    assert "active_version" not in SupportStore(redis, "/").project(1)


def test_decided_on_every_labeled_image_with_its_counts(trainer, redis):
    """Six labeled images, three folds: every image a query at least once, the counts in the decision and the
    versions listing."""
    from backend.core.registry import VersionRegistry
    from backend.core.store import SupportStore

    out = trainer(6, train_lr=0.0, score_episodes=3)
    evidence = out["evidence"]
    assert evidence["images"] == 6 and evidence["folds"] == 3 and evidence["episodes"] >= 6
    assert f"{evidence['episodes']} episodes on 6 labeled images, 3-fold cross-validation" in out["reason"]
    [record] = VersionRegistry(redis, SupportStore(redis, "/")).list(1)
    assert record["evidence"] == evidence


def test_not_evaluated_with_too_few_labels(trainer, redis):
    """Two labeled images: no fold can train without its query image: a candidate, not promoted, and why."""
    from backend.core.store import SupportStore

    out = trainer(2, train_lr=0.0)
    assert not out["promoted"] and out["reason"].startswith("not evaluated: too few labeled images")
    project = SupportStore(redis, "/").project(1)
    assert "active_version" not in project and out["version"] in project["last_training"]


def test_pinned_worse_version_cannot_promote_a_child_over_the_base(trainer, redis, settings):
    """Pinned v1 is worse than the base; v2 trained from it must beat both, so it is kept back."""
    from backend.core.registry import VersionRegistry
    from backend.core.store import SupportStore

    v1 = trainer(10, train_lr=10.0)
    store = SupportStore(redis, settings.model_dir)
    VersionRegistry(redis, store).pin(1, v1["version"], "diffews-tiny-r64-untrained")
    v2 = trainer(0, train_lr=0.0)  # same project and labels; trained from the pinned v1
    assert set(v2["scores"]) == {v2["version"], v1["version"], "diffews-tiny-r64-untrained"}
    assert v2["scores"][v2["version"]] == v2["scores"][v1["version"]]
    assert not v2["promoted"] and "diffews-tiny-r64-untrained" in v2["reason"]


def test_versions_load_from_any_folder_sharing_model_dir(trainer, redis, settings, tmp_path):
    """A version's path is relative to MODEL_DIR: a copy of MODEL_DIR elsewhere loads it; a missing one says so."""
    import shutil

    from backend.core.errors import VersionUnavailable

    out = trainer(10, train_lr=0.0)
    moved = tmp_path / "elsewhere"
    shutil.copytree(settings.model_dir / "versions", moved / "versions")
    elsewhere = WorkerContext(settings.replace(model_dir=moved), redis, SupportStore(redis, moved))
    assert elsewhere.models.get(out["version"]).source == str(moved / "versions" / "1" / out["version"])
    empty = WorkerContext(settings.replace(model_dir=tmp_path / "empty"), redis, SupportStore(redis, tmp_path / "empty"))
    with pytest.raises(VersionUnavailable, match=f"model version '{out['version']}': its folder .* is missing"):
        empty.models.get(out["version"])


def test_training_does_not_hold_up_a_click(settings, redis, tiny_model):
    """One-command mode: with a training job running, a click is answered well within PREDICT_WAIT_S."""

    from .conftest import LiveBackend

    # Short cross-validation: the test needs the training running when the click comes, not its outcome.
    backend = LiveBackend(settings.replace(train_steps=30, predict_wait_s=20, cv_folds=2, score_episodes=4), redis,
                          tiny_model)
    try:
        import requests

        requests.post(f"{backend.url}/setup", json=SETUP, timeout=10)
        for i in range(6):
            requests.post(f"{backend.url}/webhook", json=annotation_event(10 + i, 100 + i, *square_scene(i)), timeout=10)
        job = requests.post(f"{backend.url}/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).json()["job"]
        deadline = time.monotonic() + 60
        while backend.get(f"/jobs/{job}")["meta"].get("stage") != "training" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert backend.get(f"/jobs/{job}")["status"] == "started"
        started = time.monotonic()
        query, _ = square_scene(40)
        r = requests.post(f"{backend.url}/predict", timeout=30, json={
            "tasks": [{"id": 900, "data": {"image": png_data_uri(query)}}], "project": "1.1", "label_config": CONFIG_XML})
        elapsed = time.monotonic() - started
        assert r.status_code == 200 and r.json()["results"][0]["model_version"] == r.json()["model_version"]
        assert elapsed < 20 and backend.get(f"/jobs/{job}")["status"] == "started"  # answered while it trains
    finally:
        backend.stop()


def test_versions_and_choices_survive_a_redis_that_lost_everything(trainer, redis, settings):
    """Redis flushed (restarted without persistence): a starting process records the version folders again,
    /setup brings back the project's active and pinned versions, and the next version is not named v1 again."""
    from backend.web.app import create_app
    from backend.core.registry import VersionRegistry

    base = "diffews-tiny-r64-untrained"
    out = trainer(10, train_lr=0.0)
    assert out["promoted"]
    store = SupportStore(redis, settings.model_dir)
    VersionRegistry(redis, store).pin(1, out["version"], base)
    redis.flushall()
    WorkerContext(settings, redis, SupportStore(redis, settings.model_dir))  # a worker process starting
    [record] = VersionRegistry(redis, store).list()
    assert record["name"] == out["version"] and record["project"] == 1 and record["promoted"]
    client = create_app(settings, redis).test_client()
    assert client.post("/setup", json=SETUP).status_code == 200  # Label Studio connects again
    info = client.get("/projects/1/versions").json
    assert (info["active"], info["pinned"], info["current"]) == (out["version"],) * 3
    assert VersionRegistry(redis, store).next_name(1, base) == f"{base.removesuffix('-untrained')}-p1-v2"


def test_orphaned_version_folder_is_adopted_and_stale_temporaries_removed(settings, redis, tiny_model):
    """A folder renamed into place but never registered (a crash between the two) is found on the next lookup;
    a temporary folder of a crashed save is removed once stale, a fresh one (a save in progress) is kept."""
    import os

    from backend.core.registry import STALE_TEMP_S, VersionRegistry
    from model.versions import save_version

    root = settings.model_dir / "versions" / "3"
    save_version(tiny_model, root, "diffews-tiny-r64-untrained-p3-v1", base={"spec": "tiny"}, parent=None,
                 mode="full", summary={}, project=3)
    stale, fresh = root / ".x.tmp-0001", root / ".y.tmp-0002"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (time.time() - STALE_TEMP_S - 10,) * 2)
    registry = VersionRegistry(redis, SupportStore(redis, settings.model_dir))
    assert registry.get("diffews-tiny-r64-untrained-p3-v1")["project"] == 3
    assert not stale.exists() and fresh.exists()
    assert registry.next_name(3, "diffews-tiny-r64-untrained") == "diffews-tiny-r64-p3-v2"  # trained: no "untrained"


def test_training_episodes_take_train_max_shots_else_max_shots(settings):
    """TRAIN_MAX_SHOTS when set, else MAX_SHOTS; the other TRAIN_* settings pass through."""
    from backend.worker.training import train_config

    assert train_config(settings.replace(max_shots=5), seed=3).max_shots == 5
    config = train_config(settings.replace(max_shots=5, train_max_shots=1, train_grad_accum=4), seed=3)
    assert (config.max_shots, config.grad_accum, config.seed) == (1, 4, 3)


def test_training_steps_default_per_model_family(settings):
    """An empty TRAIN_STEPS is 500 episodes for the matcher and 300 for DiffewS; a set one applies to both, and
    MATCHER_TUNED_BLOCKS passes through."""
    from backend.worker.training import train_config
    from model import DiffewS, Matcher

    matcher, tiny = Matcher.from_pretrained("effnet-lite0", resolution=64), DiffewS.tiny(resolution=64)
    empty = settings.replace(train_steps=None)
    assert (train_config(empty, 1, matcher).steps, train_config(empty, 1, tiny).steps) == (500, 300)
    assert train_config(empty.replace(train_steps=40), 1, matcher).steps == 40
    assert train_config(empty, 1, matcher).tuned_blocks is None
    assert train_config(empty.replace(matcher_tuned_blocks=0), 1, matcher).tuned_blocks == 0
