"""Supervision of worker loops: a new RQ worker when one leaves its loop (Redis went away), the thread that moves due
retries and queues due reconciles, a worker process (`python -m backend worker`) and one-command mode's threads."""

from __future__ import annotations

import itertools
import logging
import threading
import time

from redis import Redis
from redis.exceptions import RedisError
from rq.scheduler import RQScheduler

from ..core.context import resolve_project
from ..core.errors import BackendError
from ..core.queues import ALL_QUEUES, QUEUE_BULK, QUEUE_CLICK, QUEUE_INGEST, QUEUE_TRAIN, redis_url_warning
from ..core.services import Backend
from ..core.triggers import queue_backfill
from .rq_worker import InProcessWorker, make_worker, move_due_jobs
from .runtime import WorkerContext, get_context, set_context

logger = logging.getLogger(__name__)


REDIS_BACKOFF_S = (1, 2, 4, 8, 15, 30)
"""Waits between pings while Redis is away, before a new worker is started (then every 30 s)."""
DUE_JOBS_EVERY_S = 1.0
"""How often each worker process moves retries that are due back to their queues."""


def wait_for_redis(redis: Redis, stopping: threading.Event) -> bool:
    """Ping Redis with backoff until it answers (True) or `stopping` is set (False)."""
    for attempt in itertools.count():
        try:
            redis.ping()
            return True
        except (RedisError, OSError) as exc:
            pause = REDIS_BACKOFF_S[min(attempt, len(REDIS_BACKOFF_S) - 1)]
            logger.warning("Redis unavailable (%s); trying again in %d s", exc, pause)
        if stopping.wait(pause):
            return False
    return False


class Supervisor:
    """Worker loops on some queues, one after another, until stopped.

    RQ's loop ends on any error it does not expect, Redis going away in the middle of a job included. A loop
    that ends without a stop is followed by a new worker once Redis answers again (REDIS_BACKOFF_S); the job
    it was running is handed back by the registry maintenance of the other workers (retried, or failed
    after its retries), as for a killed worker.
    """

    def __init__(self, context: WorkerContext, queues: tuple[str, ...], stopping: threading.Event):
        self.context = context
        self.queues = queues
        self.stopping = stopping
        self.worker: InProcessWorker | None = None
        self.restarts = 0
        self._lock = threading.Lock()

    def run(self, *, burst: bool = False) -> None:
        """Run worker loops until a stop (or, with burst, until the queues are empty)."""
        while True:
            worker = make_worker(self.context, self.queues)
            with self._lock:  # stop() either sees this worker, or this loop sees stop()
                if self.stopping.is_set():
                    return
                self.worker = worker
            try:
                worker.work(burst=burst, logging_level=logging.getLevelName(logging.getLogger().level))
            except Exception:
                logger.exception("worker on %s died", ",".join(self.queues))
            if burst or worker.stop_asked or self.stopping.is_set():
                return
            if not wait_for_redis(self.context.redis, self.stopping):
                return
            try:  # the old loop could not say goodbye while Redis was away: /health would count it twice
                worker.register_death()
            except (RedisError, OSError):
                pass
            self.restarts += 1
            logger.warning("worker on %s left its loop; started a new one (%d restarts)", ",".join(self.queues),
                           self.restarts)

    def stop(self) -> None:
        """Ask the current worker to finish its job and leave; no new one is started."""
        with self._lock:
            self.stopping.set()
            worker = self.worker
        if worker is not None:
            try:
                worker.stop()
            except (RedisError, OSError):
                pass


RECONCILE_CHECK_S = 60.0
"""How often each worker process looks for projects whose RECONCILE_INTERVAL_S has passed."""


def queue_due_reconciles(context: WorkerContext) -> list[int]:
    """Queue the comparison with Label Studio of every project whose reconcile is due; the projects queued."""
    if not context.settings.reconcile_interval_s:
        return []
    backend, queued = Backend(context.settings, context.redis, context.store), []
    for pid in context.store.projects():
        try:
            project = resolve_project(context.settings, context.store, pid)
        except BackendError as exc:  # a project whose stored config no longer parses: /status names it
            logger.debug("project %s: no reconcile (%s)", pid, exc)
            continue
        if queue_backfill(backend, project):
            queued.append(pid)
    return queued


def start_due_job_mover(context: WorkerContext, stopping: threading.Event) -> threading.Thread:
    """A thread moving due retries of every queue back every DUE_JOBS_EVERY_S (RQ's maintenance does it
    only every heartbeat_ttl / 3: a "5 s" retry then waited up to 15 s more), and queueing due reconciles
    every RECONCILE_CHECK_S."""
    scheduler = RQScheduler(list(ALL_QUEUES), connection=context.redis)

    def loop() -> None:
        checked = time.monotonic()
        while not stopping.wait(DUE_JOBS_EVERY_S):
            try:
                move_due_jobs(scheduler)
            except (RedisError, OSError):  # Redis away: the supervisors wait for it; so does this
                continue
            if time.monotonic() - checked >= RECONCILE_CHECK_S:
                checked = time.monotonic()
                try:
                    queue_due_reconciles(context)
                except Exception:  # never let it stop the retries this thread moves
                    logger.exception("queueing due reconciles failed; trying again in %.0f s", RECONCILE_CHECK_S)

    thread = threading.Thread(target=loop, name="diffews-due-jobs", daemon=True)
    thread.start()
    return thread


def run_worker(queues: tuple[str, ...] = ALL_QUEUES, *, burst: bool = False, preload: bool = True) -> None:
    """Run worker loops on `queues` in this process (model loaded once, jobs never forked) until stopped."""
    context = get_context()
    if warning := redis_url_warning(context.settings.redis_url):
        logger.warning(warning)
    if preload:
        context.model  # load before taking the first job, so a bad DIFFEWS_MODEL fails at start
    stopping = threading.Event()
    if not burst:
        start_due_job_mover(context, stopping)
    try:
        Supervisor(context, queues, stopping).run(burst=burst)
    finally:
        stopping.set()


EMBEDDED_QUEUES = ((QUEUE_CLICK,), (QUEUE_INGEST,), (QUEUE_BULK,), (QUEUE_TRAIN,))
"""One worker thread per queue in one-command mode: neither training nor ingestion ever holds up a click."""


class EmbeddedWorkers:
    """One supervised worker thread per queue inside the web process (one-command mode)."""

    def __init__(self, context: WorkerContext, queues: tuple[tuple[str, ...], ...] = EMBEDDED_QUEUES):
        self.context = context
        self._stopping = threading.Event()
        self.supervisors = {q: Supervisor(context, q, self._stopping) for q in queues}
        self.threads: list[threading.Thread] = []

    @property
    def workers(self) -> dict[tuple[str, ...], InProcessWorker]:
        """The current worker of each queue group."""
        return {q: s.worker for q, s in self.supervisors.items() if s.worker is not None}

    @property
    def restarts(self) -> int:
        """Worker loops restarted since start, all queues together."""
        return sum(s.restarts for s in self.supervisors.values())

    def start(self) -> EmbeddedWorkers:
        """Load the model once, then start the threads."""
        set_context(self.context)
        self.context.model
        start_due_job_mover(self.context, self._stopping)
        for queues, supervisor in self.supervisors.items():
            thread = threading.Thread(target=supervisor.run, name=f"diffews-worker-{queues[0]}", daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Let each worker finish its job and leave; wait up to `timeout` seconds for the threads."""
        for supervisor in self.supervisors.values():
            supervisor.stop()
        for thread in self.threads:
            thread.join(timeout)
