"""Faults against real processes: workers killed with SIGKILL, the backend stopped with SIGTERM, a worker loop dying.

Workers here are real `python -m backend worker` processes on the test's redis-server; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import requests
from rq.job import Job, JobStatus

from backend.core.ledger import DELIVERING, DeliveryLedger
from backend.core.queues import QUEUE_BULK, live_workers

from bench.ls_harness import brush_result, create_project, start_backend, wait_for
from bench.synthetic import CONFIG_XML, annotation_event, square_scene
from .processes import WorkerProcess


@pytest.fixture
def spawn(redis, tmp_path):
    """Start worker processes; every one is stopped after the test."""
    made = []

    def start(settings, queues, **env) -> WorkerProcess:
        made.append(WorkerProcess(f"unix://{redis.socket_file}", settings, queues, tmp_path / f"worker{len(made)}.log",
                                  **env))
        return made[-1]

    yield start
    for worker in made:
        worker.stop()


def _wait_workers(redis, queue: str, count: int) -> None:
    wait_for(lambda: live_workers(redis)[queue] >= count, 60, f"{count} worker(s) on {queue}")


@pytest.mark.label_studio
def test_killed_bulk_worker_is_retried_within_a_minute_with_one_prediction_each(
        label_studio, redis, settings, spawn):
    """SIGKILL a worker in the middle of a bulk batch: another worker retries it; every task ends with one."""
    from backend.web.app import create_app

    settings = settings.replace(tiny_resolution=256, bulk_batch_size=6, label_studio_url=label_studio.url,
                       label_studio_api_key=label_studio.pat)
    client = create_app(settings, redis).test_client()
    scenes = [square_scene(i, (120, 160)) for i in range(8)]
    pid, tasks = create_project(label_studio, CONFIG_XML, [image for image, _ in scenes])
    ls_env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.pat}
    first = spawn(settings, ["predict-high", "ingest", "predict-bulk"], **ls_env)
    for task, (_, mask) in zip(tasks[:2], scenes):
        label_studio.request("POST", f"/api/tasks/{task['id']}/annotations", json={"result": brush_result(mask)})
    assert client.post("/setup", json={"project": f"{pid}.1", "schema": CONFIG_XML}).status_code == 200
    _wait_workers(redis, QUEUE_BULK, 1)
    wait_for(lambda: client.get(f"/status/{pid}").json["examples"].get("square") == 2, 60, "the backfill")
    assert client.post(f"/prelabel/{pid}").status_code == 202
    version = client.get(f"/status/{pid}").json["model_version"]
    ledger = DeliveryLedger(redis, pid, version)
    wait_for(lambda: any(e.state == DELIVERING for e in ledger.entries().values()), 60, "the batch to start")
    [job_id] = {e.job for e in ledger.entries().values()}
    first.kill()
    killed_at = time.monotonic()
    spawn(settings, ["predict-high", "ingest", "predict-bulk"], **ls_env)
    job = Job.fetch(job_id, connection=redis)

    def taken_again() -> bool:
        job.refresh()
        return job.retries_left < 5 and job.get_status() in (JobStatus.STARTED, JobStatus.FINISHED)

    wait_for(taken_again, 120, "another worker to take the abandoned batch again")
    retried_s = time.monotonic() - killed_at
    assert retried_s < 60, f"the abandoned batch was taken up again only after {retried_s:.0f} s"
    unlabeled = [t["id"] for t in tasks[2:]]
    wait_for(lambda: all(label_studio.predictions(t) for t in unlabeled), 120, "the retried batch")
    time.sleep(1)
    assert [len(label_studio.predictions(t)) for t in unlabeled] == [1] * len(unlabeled)


@pytest.mark.label_studio
def test_crash_between_post_and_record_leaves_one(label_studio, live_backend):
    """A batch that posted a prediction and died before recording it: the retry replaces it, never adds one."""
    from backend.core.bulk import queue_bulk
    from backend.core.context import resolve_project
    from backend.core.ledger import own_may_take
    from backend.core.queues import job_alive

    backend = live_backend()
    backend.workers.stop(timeout=10)  # nobody takes the batch until the crash is staged
    scenes = [square_scene(i) for i in range(3)]
    pid, tasks = create_project(label_studio, CONFIG_XML, [image for image, _ in scenes])
    requests.post(f"{backend.url}/setup", json={"project": f"{pid}.1", "schema": CONFIG_XML}, timeout=10)
    for task, (_, mask) in zip(tasks[:2], scenes):
        label_studio.request("POST", f"/api/tasks/{task['id']}/annotations", json={"result": brush_result(mask)})
        event = annotation_event(task["id"], task["id"], scenes[0][0], mask, project=pid)
        event["task"]["data"]["image"] = task["data"]["image"]
        requests.post(f"{backend.url}/webhook", json=event, timeout=10)
    context = resolve_project(backend.settings, backend.context.store, pid)
    target = tasks[2]["id"]
    [job_id] = queue_bulk(backend.redis, backend.settings, context, [{"id": target, "data": tasks[2]["data"]}])["jobs"]
    ledger = DeliveryLedger(backend.redis, pid, context.model_version)
    ledger.claim([target], job_id, context.revision, own_may_take(job_id, context.revision, job_alive(backend.redis)))
    label_studio.request("POST", "/api/predictions",  # what the killed attempt had posted before dying
                         json={"task": target, "result": [], "score": 0.0, "model_version": context.model_version})
    from backend.worker.supervision import EmbeddedWorkers

    workers = EmbeddedWorkers(backend.context).start()
    try:
        wait_for(lambda: (e := ledger.get(target)) and e.state == "delivered", 60, "the batch")
    finally:
        workers.stop(timeout=30)
    [kept] = label_studio.predictions(target)
    assert kept["result"] and kept["id"] == ledger.get(target).ls_id


def test_killed_training_worker_releases_the_training_lock(redis, settings, spawn):
    """SIGKILL a worker while it trains: once its job is abandoned, Start Training is accepted again."""
    from backend.web.app import create_app

    settings = settings.replace(train_steps=100000)
    client = create_app(settings, redis).test_client()
    client.post("/setup", json={"project": "1.1", "schema": CONFIG_XML})
    for i in range(6):
        client.post("/webhook", json=annotation_event(10 + i, 100 + i, *square_scene(i)))
    trainer = spawn(settings, ["train"], TRAIN_STEPS="100000")
    _wait_workers(redis, "train", 1)
    job = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).json["job"]
    wait_for(lambda: client.get(f"/jobs/{job}").json["meta"].get("stage") == "training", 60, "training to start")
    trainer.kill()
    refused = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).json
    assert refused["status"] == "already queued or running"  # not yet known to be dead
    spawn(settings, ["train"], TRAIN_STEPS="100000")  # its maintenance finds the abandoned job
    wait_for(lambda: client.get(f"/jobs/{job}").json["status"] == "failed", 60, "the abandoned training job")
    again = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).json
    assert again["status"] == "queued" and again["job"] != job


def test_sigterm_stops_the_embedded_redis(tmp_path):
    """SIGTERM to `python _wsgi.py` ends it and the redis-server it started (saved, not left running)."""
    proc, url = start_backend(tmp_path, "http://127.0.0.1:9", "unused-key")
    registry = json.loads((tmp_path / "redis" / "diffews.rdb.settings").read_text())
    redis_pid = int(Path(registry["pidfile"]).read_text())
    os.kill(redis_pid, 0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0

    def gone() -> bool:
        try:
            os.kill(redis_pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie of a process we do not own counts as gone too
            return Path(f"/proc/{redis_pid}/stat").read_text().split()[2] == "Z"
        except OSError:
            return True

    wait_for(gone, 15, "the embedded redis-server to exit")
    assert (tmp_path / "redis" / "diffews.rdb").exists() or (tmp_path / "redis" / "appendonly.aof").exists()


def test_embedded_worker_loop_is_restarted_and_health_counts_live_ones(redis, settings, tiny_model):
    """An embedded worker that leaves its loop is replaced; /health counts only workers with a fresh heartbeat."""
    from backend.core.queues import BEAT_AT, WORKER_ALIVE_S, server_time

    from .conftest import LiveBackend

    backend = LiveBackend(settings, redis, tiny_model)
    try:
        wait_for(lambda: backend.get("/health")["workers"] == {"predict-high": 1, "ingest": 1, "predict-bulk": 1, "train": 1}, 30,
                 "three live workers")
        first = backend.workers.workers[("predict-high",)]
        first._stop_requested = True  # its loop ends with no stop asked, as if it had died
        wait_for(lambda: backend.workers.restarts == 1 and backend.workers.workers[("predict-high",)] is not first, 60,
                 "the supervisor to start a new worker")
        wait_for(lambda: backend.get("/health")["workers"]["predict-high"] == 1, 30, "the new worker to register")
        redis.hset(f"rq:worker:{backend.workers.workers[('train',)].name}", BEAT_AT, server_time(redis) - WORKER_ALIVE_S - 1)
        assert backend.get("/health")["workers"]["train"] == 0  # a silent worker is not reported alive
    finally:
        backend.stop()


def test_an_idle_worker_stops_even_beside_another_worker_of_its_queue(redis, caplog):
    """stop() is seen by an idle worker within a few seconds, without a wake-up job another worker could take;
    the due-job mover's once-a-second scheduler lock is not logged."""
    import logging
    import threading

    from backend.core.queues import QUEUE_CLICK
    from backend.worker.rq_worker import InProcessWorker, move_due_jobs
    from rq.scheduler import RQScheduler

    caplog.set_level(logging.INFO)
    workers = [InProcessWorker([QUEUE_CLICK], connection=redis, heartbeat_ttl_s=12) for _ in range(2)]
    threads = [threading.Thread(target=w.work, daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    wait_for(lambda: all(w.get_state() == "idle" for w in workers), 15, "both workers to listen")
    workers[0].stop()
    threads[0].join(10)
    assert not threads[0].is_alive()
    assert threads[1].is_alive()  # the other one goes on listening
    workers[1].stop()
    threads[1].join(10)
    assert not threads[1].is_alive()
    move_due_jobs(RQScheduler([QUEUE_CLICK], connection=redis))
    assert not [r for r in caplog.records if "scheduler lock" in r.getMessage()]


@pytest.mark.parametrize("ttl", [4, 45, 120, 600])
def test_idle_workers_beat_inside_the_liveness_window_whatever_the_job_ttl(redis, ttl):
    """An idle worker heartbeats every worker_ttl - 15 s (RQ's dequeue timeout), which must stay under the
    WORKER_ALIVE_S after which /health and admission count it dead, for any JOB_HEARTBEAT_TTL_S."""
    from backend.core.queues import QUEUE_CLICK, WORKER_ALIVE_S
    from backend.worker.rq_worker import InProcessWorker

    worker = InProcessWorker([QUEUE_CLICK], connection=redis, heartbeat_ttl_s=ttl)
    assert worker.worker_ttl - 15 <= WORKER_ALIVE_S / 2
    assert worker.get_heartbeat_ttl(None) == ttl  # a running job's own TTL is still what was configured
