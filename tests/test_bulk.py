"""Bulk runs: progress with an ETA, and cancel (queued batches dropped, the ledger left so nothing is posted twice)."""

from __future__ import annotations

import time

import pytest
from rq import Queue
from rq.job import Job, JobStatus

from backend.core.bulk import Progress, cancel_bulk, cancelled_batch_key, queue_bulk
from backend.core.context import resolve_project
from backend.core.ledger import DELIVERED, QUEUED, DeliveryLedger
from backend.core.queues import QUEUE_BULK
from backend.core.store import SupportStore

from bench.synthetic import CONFIG_XML


@pytest.fixture
def project(settings, redis):
    """Settings with Label Studio access, batches of 2, a registered project and its context."""
    on = settings.replace(bulk_batch_size=2, label_studio_url="http://ls.invalid", label_studio_api_key="k")
    store = SupportStore(redis, on.model_dir)
    store.register_project(1, CONFIG_XML)
    return on, resolve_project(on, store, 1)


def _tasks(n: int) -> list[dict]:
    return [{"id": 100 + i, "data": {"image": f"http://ls.invalid/{i}.png"}} for i in range(n)]


def test_progress_reports_state_and_eta(redis):
    """Running with an ETA from the rate so far; finished once every task is done or failed."""
    progress = Progress(redis, 7)
    assert progress.read() == {}
    progress.start("v1", 1)
    progress.add(2, job="a")
    progress.add(2, job="b")
    progress.mark_done(1)
    redis.hset(progress.key, mapping={"started_at": 100.0, "updated_at": 110.0})  # one task in 10 s
    current = progress.read()
    assert current["state"] == "running" and current["eta_s"] == 30.0 and progress.jobs() == ["a", "b"]
    for task in (2, 3):
        progress.mark_done(task)
    progress.mark_failed(4, "broken image")
    current = progress.read()
    assert current["state"] == "finished" and "eta_s" not in current and current["failed"] == 1


def test_cancel_drops_queued_batches_and_a_later_run_takes_their_tasks(redis, project):
    """Queued batches are cancelled in RQ and marked; their tasks count as cancelled; the next run queues them
    again, and a batch already delivered by a retried job is not counted."""
    settings, context = project
    out = queue_bulk(redis, settings, context, _tasks(5))
    assert out["queued_tasks"] == 5 and len(out["jobs"]) == 3
    ledger = DeliveryLedger(redis, 1, context.model_version)
    first = Job.fetch(out["jobs"][0], connection=redis)
    delivered = ledger.claim([first.args[1][0]["id"]], first.id, context.revision, lambda t, e: True)
    ledger.record(delivered[0], via="posted", ls_id=1)  # an earlier try of this batch posted one task
    Progress(redis, 1).mark_done(first.args[1][0]["id"])
    answer = cancel_bulk(redis, 1)
    assert answer["dropped_batches"] == 3 and answer["dropped_tasks"] == 4 and answer["running_batches"] == []
    assert answer["progress"]["state"] == "cancelled" and answer["progress"]["cancelled"] == 4
    assert Queue(QUEUE_BULK, connection=redis).count == 0
    assert all(Job.fetch(j, connection=redis).get_status() == JobStatus.CANCELED for j in out["jobs"])
    assert all(redis.exists(cancelled_batch_key(j)) for j in out["jobs"])
    assert not Progress(redis, 1).in_flight(stale_s=3600)
    states = {t: e.state for t, e in ledger.entries().items()}
    assert sorted(states.values()) == [DELIVERED] + [QUEUED] * 4  # claims of dead jobs: free for the next run
    again = queue_bulk(redis, settings, context, _tasks(5))
    assert again["queued_tasks"] == 4 and again["skipped"] == 1
    assert Progress(redis, 1).read()["state"] == "running"


def test_cancel_leaves_a_running_batch_and_counts_nothing_without_a_run(redis, project):
    """A started batch is left to finish (and post); cancelling with no run is an empty answer, not an error."""
    settings, context = project
    assert cancel_bulk(redis, 1)["dropped_batches"] == 0
    out = queue_bulk(redis, settings, context, _tasks(2))
    job = Job.fetch(out["jobs"][0], connection=redis)
    job.set_status(JobStatus.STARTED)
    answer = cancel_bulk(redis, 1)
    assert answer["running_batches"] == [job.id] and answer["dropped_tasks"] == 0
    assert not redis.exists(cancelled_batch_key(job.id))
    assert Progress(redis, 1).read()["state"] == "running"


def test_a_batch_dequeued_just_before_its_cancel_posts_nothing(redis, project, worker):
    """The marker a cancel leaves makes a batch that a worker already took return without predicting."""
    settings, context = project
    from backend.worker.bulk_jobs import prelabel_batch

    redis.set(cancelled_batch_key("inline-job"), 1)
    job = Queue(QUEUE_BULK, connection=redis).enqueue(prelabel_batch, context.to_job(), _tasks(2), job_id="inline-job")
    deadline = time.monotonic() + 30
    while job.get_status(refresh=True) not in (JobStatus.FINISHED, JobStatus.FAILED) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.return_value() == {"posted": 0, "skipped": 2, "failed": {}, "cancelled": True}
    assert DeliveryLedger(redis, 1, context.model_version).entries() == {}


def test_preview_and_cancel_routes_check_their_input(settings, redis, project):
    """?preview= takes 1 to MAX_PREVIEW tasks (400 naming it otherwise) and queues a preview job at the front of the
    bulk queue; cancelling an unknown project is a 404."""
    from backend.core.bulk import MAX_PREVIEW
    from backend.web.app import create_app

    on, _ = project
    client = create_app(on, redis).test_client()
    for bad in ("0", "abc", str(MAX_PREVIEW + 1), "-3"):
        r = client.post(f"/projects/1/prelabel?preview={bad}")
        assert r.status_code == 400 and "?preview= must be a number of tasks" in r.json["error"], r.json
    r = client.post("/projects/1/prelabel?preview=3")
    assert r.status_code == 202 and r.json["preview"] == 3
    job = Job.fetch(r.json["job"], connection=redis)
    assert job.func_name == "backend.worker.preview.preview_prelabel" and job.args == (1, 3)
    assert Queue(QUEUE_BULK, connection=redis).job_ids[0] == job.id
    assert client.delete("/projects/9/prelabel").status_code == 404
    assert client.delete("/projects/1/prelabel").json["dropped_batches"] == 0


def test_preview_tasks_are_spread_over_the_project():
    from backend.worker.preview import spread

    assert spread(10, 3) == [0, 4, 9] and spread(10, 1) == [5] and spread(3, 5) == [0, 1, 2] and spread(0, 2) == []
    assert spread(100, 10) == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]


def test_the_review_view_is_queued_once_per_version_unless_forced(settings, redis, project):
    """At /setup the view's job is queued when the project's view was made for another version (at most once a
    minute); a request forces it; without API access or with REVIEW_VIEW off nothing is queued."""
    from backend.core.review_view import queue_review_view
    from backend.core.services import Backend
    from backend.core.store import SupportStore

    on, context = project
    backend = Backend(on, redis, SupportStore(redis, on.model_dir))
    assert queue_review_view(backend, context, "host:9090") is not None
    assert queue_review_view(backend, context, "host:9090") is None  # checked within the last minute
    redis.flushall()
    backend.store.register_project(1, CONFIG_XML)
    backend.store.set_project_field(1, "review_view", f"{context.model_version}:5")
    assert queue_review_view(backend, context, "host:9090") is None  # made for this version
    assert queue_review_view(backend, context, "host:9090", force=True) is not None
    off = Backend(on.replace(review_view=False), redis, backend.store)
    assert queue_review_view(off, context, "host:9090", force=True) is None
