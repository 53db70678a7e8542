"""backend/core/triggers.py: which webhook events do what (imported tasks are predicted with no action)."""

from __future__ import annotations

import pytest
from rq.registry import ScheduledJobRegistry

from bench.synthetic import CONFIG_XML, annotation_event, square_scene


@pytest.fixture
def refreshing_client(settings, redis):
    """The app with AUTO_REFRESH on (30 s debounce) and Label Studio API access configured."""
    from backend.web.app import create_app

    on = settings.replace(auto_refresh=True, refresh_delay_s=30, refresh_after_changes=1000,
                          label_studio_url="http://ls.invalid", label_studio_api_key="k")
    client = create_app(on, redis).test_client()
    assert client.post("/setup", json={"project": "1.1", "schema": CONFIG_XML}).status_code == 200
    return client


def _tasks_created(client, n: int):
    return client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 1},
                                         "tasks": [{"id": 900 + i, "data": {}} for i in range(n)]})


def test_imported_tasks_wait_for_examples(refreshing_client, redis):
    """Before any example, TASKS_CREATED schedules nothing and says why."""
    r = _tasks_created(refreshing_client, 3)
    assert r.status_code == 200 and r.json["refresh"].startswith("not yet: no support examples")
    assert ScheduledJobRegistry("ingest", connection=redis).count == 0


def test_imported_tasks_are_predicted_by_the_debounced_refresh(refreshing_client, redis):
    """With examples, TASKS_CREATED counts the new tasks into the pending refresh, which /status shows."""
    labeled = refreshing_client.post("/webhook", json=annotation_event(10, 100, *square_scene(0))).json
    assert labeled["refresh"] == "in 30 s"
    r = _tasks_created(refreshing_client, 4)
    assert r.status_code == 200 and r.json["tasks"] == 4 and r.json["refresh"] == "scheduled earlier"
    assert ScheduledJobRegistry("ingest", connection=redis).count == 1  # one refresh covers both
    pending = refreshing_client.get("/status/1").json["refresh"]
    assert pending["changes"] == 5 and pending["reason"] == "TASKS_CREATED" and pending["starts_in_s"] > 0


def test_tasks_created_without_a_task_list(refreshing_client):
    """A TASKS_CREATED body without a tasks list is a 400 naming it."""
    r = refreshing_client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 1}})
    assert r.status_code == 400 and "'tasks' must be a non-empty list" in r.json["error"]


def test_other_task_events_are_ignored(refreshing_client):
    """Events the backend has no use for are answered as ignored."""
    r = refreshing_client.post("/webhook", json={"action": "TASKS_DELETED", "project": {"id": 1}, "tasks": []})
    assert r.json == {"status": "ignored", "action": "TASKS_DELETED"}


def test_reconcile_is_due_first_after_refused_webhooks_and_every_interval(settings, redis):
    """reconcile_due: never read -> due; read just now -> not; a webhook refused later -> due; an old read -> due
    at RECONCILE_INTERVAL_S, never with 0."""
    from backend.core.queues import server_time
    from backend.core.triggers import REJECTED_WEBHOOKS_KEY, reconcile_due

    now = server_time(redis)
    assert reconcile_due(redis, settings, {}) == "first read of the project's annotations"
    assert reconcile_due(redis, settings, {"backfilled": str(now)}) is None
    redis.hset(REJECTED_WEBHOOKS_KEY, "last_at", now + 1)
    assert reconcile_due(redis, settings, {"backfilled": str(now)}).startswith("webhooks were refused")
    assert reconcile_due(redis, settings, {"backfilled": str(now - 50), "reconciled_at": str(now + 2)}) is None
    redis.delete(REJECTED_WEBHOOKS_KEY)
    old = {"backfilled": str(now - 5000), "reconciled_at": str(now - 1000)}
    assert reconcile_due(redis, settings.replace(reconcile_interval_s=900), old).startswith("every RECONCILE_INTERVAL_S")
    assert reconcile_due(redis, settings.replace(reconcile_interval_s=0), old) is None


def test_workers_queue_the_reconciles_that_are_due_once(settings, redis):
    """queue_due_reconciles queues one "backfill" job per project whose interval passed, and none for a project
    without Label Studio access or one compared recently; a second look in the same minute queues nothing."""
    from rq import Queue

    from backend.core.queues import QUEUE_INGEST, server_time
    from backend.core.store import SupportStore
    from backend.worker.runtime import WorkerContext
    from backend.worker.supervision import queue_due_reconciles

    on = settings.replace(label_studio_url="http://ls.invalid", label_studio_api_key="k", reconcile_interval_s=600)
    store = SupportStore(redis, settings.model_dir)
    now = server_time(redis)
    for pid, last in ((1, now - 700), (2, now - 10)):
        store.register_project(pid, CONFIG_XML)
        store.set_project_field(pid, "backfilled", last)
    context = WorkerContext(on, redis, store)
    assert queue_due_reconciles(context) == [1]
    assert queue_due_reconciles(context) == []
    jobs = Queue(QUEUE_INGEST, connection=redis).jobs
    assert [(j.func_name, j.meta["project"]) for j in jobs] == [("backend.worker.ingest_jobs.backfill_if_needed", 1)]
    assert jobs[0].meta["why"].startswith("every RECONCILE_INTERVAL_S")
    assert queue_due_reconciles(WorkerContext(settings.replace(reconcile_interval_s=600), redis, store)) == []
