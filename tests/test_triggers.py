"""backend/core/triggers.py: which webhook events do what (imported tasks are predicted with no action)."""

from __future__ import annotations

import pytest
from rq.registry import ScheduledJobRegistry

from .payloads import CONFIG_XML, annotation_event, square_scene


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
    assert r.status_code == 400 and "'tasks' list" in r.json["error"]


def test_other_task_events_are_ignored(refreshing_client):
    """Events the backend has no use for are answered as ignored."""
    r = refreshing_client.post("/webhook", json={"action": "TASKS_DELETED", "project": {"id": 1}, "tasks": []})
    assert r.json == {"status": "ignored", "action": "TASKS_DELETED"}
