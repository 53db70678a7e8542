"""AUTO_REFRESH: changes are counted and debounced into one refresh job; posting keeps one prediction per task."""

from __future__ import annotations

import pytest
from rq import Queue
from rq.registry import ScheduledJobRegistry

from backend.core.context import resolve_project
from backend.core.refresh import VERSION_CHANGED, pending_refresh, pin, request_refresh, start_refresh
from backend.core.settings import Settings
from backend.core.store import SupportStore

from bench.synthetic import CONFIG_XML, square_scene
from bench.ls_harness import create_project


@pytest.fixture
def refreshing(settings, redis):
    """Settings with AUTO_REFRESH on (30 s, or 3 changes), a project with Label Studio access, and its context."""
    on = settings.replace(auto_refresh=True, refresh_delay_s=30, refresh_after_changes=3,
                          label_studio_url="http://ls.invalid", label_studio_api_key="k")
    store = SupportStore(redis, on.model_dir)
    store.register_project(1, CONFIG_XML)
    return on, resolve_project(on, store, 1)


def _waiting(redis) -> tuple[int, int]:
    """(refresh jobs scheduled for later, refresh jobs queued now)."""
    return ScheduledJobRegistry("ingest", connection=redis).count, Queue("ingest", connection=redis).count


def test_changes_are_debounced_into_one_refresh(redis, refreshing):
    """The first change schedules one job REFRESH_DELAY_S later; REFRESH_AFTER_CHANGES start one at once; a job
    that starts clears the count, and the next change schedules again."""
    on, context = refreshing
    assert request_refresh(redis, on, context, 1, "ANNOTATION_CREATED") == {"refresh": "in 30 s"}
    assert request_refresh(redis, on, context, 1, "ANNOTATION_UPDATED") == {"refresh": "scheduled earlier"}
    assert _waiting(redis) == (1, 0)
    assert request_refresh(redis, on, context, 1, "ANNOTATION_UPDATED") == {"refresh": "queued"}
    assert request_refresh(redis, on, context, 2, "ANNOTATIONS_DELETED") == {"refresh": "queued earlier"}
    assert _waiting(redis) == (1, 1)
    assert start_refresh(redis, 1) == 5
    assert request_refresh(redis, on, context, 1, "ANNOTATION_CREATED") == {"refresh": "in 30 s"}
    assert _waiting(redis) == (2, 1)


def test_a_version_change_refreshes_at_once(redis, refreshing):
    on, context = refreshing
    assert request_refresh(redis, on, context, VERSION_CHANGED, "promoted v1") == {"refresh": "queued"}
    [job] = Queue("ingest", connection=redis).jobs
    assert job.func_name == "backend.worker.bulk_jobs.refresh_project" and job.args == (1, "promoted v1")


def test_pending_refresh_says_when_and_why(redis, refreshing):
    """/status's refresh block: none before a change; after one, why, how many changes and when it starts."""
    on, context = refreshing
    assert pending_refresh(redis, 1) is None
    request_refresh(redis, on, context, 1, "ANNOTATION_CREATED")
    pending = pending_refresh(redis, 1)
    assert pending["reason"] == "ANNOTATION_CREATED" and pending["changes"] == 1 and 25 < pending["starts_in_s"] <= 30
    request_refresh(redis, on, context, VERSION_CHANGED, "pinned v2")
    pending = pending_refresh(redis, 1)
    assert pending["changes"] == "version change" and pending["starts_in_s"] == 0 and pending["reason"] == "pinned v2"
    start_refresh(redis, 1)
    assert pending_refresh(redis, 1) is None


def test_cli_pin_refreshes_like_the_route(redis, refreshing, monkeypatch, capsys):
    """`python -m backend pin` goes through the same pin() as POST /projects/<id>/pin: a pin that changes the
    version queues a refresh at once, one that changes nothing does not."""
    from backend.__main__ import main

    on, _ = refreshing
    base = "diffews-tiny-r64-untrained"
    store = SupportStore(redis, on.model_dir)
    assert pin(redis, on, store, 1, base) == {"project": 1, "pinned": base, "current": base}  # nothing changed
    assert _waiting(redis) == (0, 0)
    pin(redis, on, store, 1, None)
    monkeypatch.setattr("backend.__main__.connect", lambda settings, start_embedded=True: redis)
    monkeypatch.setattr("backend.__main__.Settings.from_env", lambda: on)
    folder = on.model_dir / "versions" / "1" / "v1"
    _version_folder(folder)
    from backend.core.registry import VersionRegistry

    VersionRegistry(redis, store).add(folder)
    assert main(["pin", "--project", "1", "--version", "v1"]) == 0
    assert "now predicts with v1; refresh of its predictions: queued" in capsys.readouterr().out
    assert _waiting(redis) == (0, 1)


def _version_folder(folder) -> None:
    """A version folder of the tiny model (its own weights are not read by the registry)."""
    from model import DiffewS, save_version

    save_version(DiffewS.tiny(resolution=64), folder.parent, folder.name, base={"spec": "tiny"}, parent=None,
                 mode="full", summary={}, project=1)


def test_off_without_api_or_when_disabled(redis, settings, refreshing):
    """AUTO_REFRESH=false does nothing; without Label Studio access the answer says why nothing is queued."""
    on, context = refreshing
    assert request_refresh(redis, on.replace(auto_refresh=False), context, 5, "x") == {}
    store = SupportStore(redis, settings.model_dir)
    no_api = resolve_project(settings.replace(auto_refresh=True), store, 1)
    assert request_refresh(redis, settings.replace(auto_refresh=True), no_api, 5, "x") == {
        "refresh": "off: no Label Studio API access to post predictions"}
    assert request_refresh(redis, on, context, 0, "nothing changed") == {}
    assert _waiting(redis) == (0, 0)


@pytest.mark.parametrize("name,value", [("REFRESH_AFTER_CHANGES", 0), ("REFRESH_DELAY_S", -1)])
def test_refresh_settings_are_checked(name, value):
    with pytest.raises(ValueError, match=name):
        Settings(**{name: value})


@pytest.mark.label_studio
@pytest.mark.parametrize("drop", [True, False], ids=["drop-other-versions", "keep"])
def test_posting_drops_other_versions_only_when_asked(label_studio, drop):
    """replace_prediction: one prediction of the version always; others deleted only with drop_other_versions."""
    from backend.worker.ls_client import LabelStudioAPI

    pid, [task] = create_project(label_studio, CONFIG_XML, [square_scene(0)[0]])
    for version in ("v-old", "v-new", "v-new"):
        label_studio.request("POST", "/api/predictions", json={"task": task["id"], "project": pid, "result": [],
                                                                "model_version": version})
    api = LabelStudioAPI(label_studio.url, label_studio.pat)
    new_id, dropped = api.replace_prediction(task["id"], {"model_version": "v-new", "result": [], "score": 0.5}, pid, drop)
    stored = label_studio.predictions(task["id"])
    assert sorted(p["model_version"] for p in stored) == (["v-new"] if drop else ["v-new", "v-old"])
    assert dropped == ({"v-old"} if drop else set()) and new_id in [p["id"] for p in stored]


def test_deliveries_of_a_deleted_prediction_stop_counting(redis):
    """DeliveryLedger.deleted forgets a delivered entry (its prediction was replaced by another version's), and
    leaves one still being delivered."""
    from backend.core.ledger import DeliveryLedger

    ledger = DeliveryLedger(redis, 1, "v-old")
    assert ledger.seed({5: 50, 6: 60}, revision=1) == 2
    [_] = ledger.claim([7], "job-1", 1, lambda task, entry: entry is None)
    assert ledger.deleted(5) and ledger.get(5) is None and ledger.counts()["delivered"] == 1
    assert not ledger.deleted(7) and ledger.get(7) is not None  # in flight: kept
    assert not ledger.deleted(8)  # never delivered


def test_a_refresh_waits_for_the_previous_one(redis, refreshing):
    """While the previous refresh's batches are still being predicted, a refresh reschedules itself without clearing
    the changes it will cover (later changes join it: one runs, one waits); a stalled run is not waited for."""
    from backend.core.bulk import Progress
    from backend.worker.bulk_jobs import refresh_project
    from backend.worker.runtime import WorkerContext, set_context

    on, context = refreshing
    set_context(WorkerContext(on, redis, SupportStore(redis, on.model_dir)))
    try:
        request_refresh(redis, on, context, 1, "ANNOTATION_CREATED")
        Progress(redis, 1).start(context.model_version, context.revision)
        Progress(redis, 1).add(4)
        assert refresh_project(1, "ANNOTATION_CREATED") == {
            "waiting": "the previous refresh's batches are still being predicted", "waited": 1}
        assert pending_refresh(redis, 1)["changes"] == 1  # kept for the run that waits
        assert request_refresh(redis, on, context, 1, "ANNOTATION_UPDATED") == {"refresh": "scheduled earlier"}
        waiting = [job for job in ScheduledJobRegistry("ingest", connection=redis).get_job_ids()]
        assert len(waiting) == 2  # the first schedule and the rescheduled run
        redis.hset(Progress(redis, 1).key, "updated_at", 0)  # stalled for longer than a job may run
        assert "waiting" not in refresh_project(1, "ANNOTATION_CREATED", waited=1)
        assert pending_refresh(redis, 1) is None
    finally:
        set_context(None)
