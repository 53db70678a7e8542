"""Worker processes: the model loaded once per process, RQ SimpleWorkers (no fork per job), embedded mode."""

from __future__ import annotations

import inspect
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field, replace

import torch

from model import DiffewS, Matcher, parse_dtype
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker, get_current_job, worker_registration
from rq.job import Job
from rq.scheduler import RQScheduler
from rq.timeouts import TimerDeathPenalty
from rq.worker import WorkerStatus

from ..core.context import ProjectContext, resolve_project
from ..core.errors import BackendError
from ..core.queues import (
    ALL_QUEUES,
    BEAT_AT,
    QUEUE_BULK,
    QUEUE_CLICK,
    QUEUE_INGEST,
    QUEUE_TRAIN,
    connect,
    redis_url_warning,
    server_time,
)
from ..core.registry import VersionRegistry
from ..core.settings import Settings
from ..core.services import Backend
from ..core.store import SupportStore
from ..core.supports import SupportSets
from ..core.triggers import queue_backfill
from ..core.versions import GPU_HINT, MATCHER_NOTE, base_ref, base_version, uses_matcher
from .example_files import ExampleFiles
from .loaded_models import LoadedModels
from .ls_client import LabelStudioAPI
from .media import MediaFetcher
from .segmenter import FewShotSegmenter
from .similar import SimilarSupports

logger = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What jobs in this process share: settings, Redis, the store and the loaded models."""

    settings: Settings
    redis: Redis
    store: SupportStore
    models: LoadedModels = field(init=False)
    support_sets: SupportSets = field(init=False, default_factory=SupportSets)
    """The support sets this process encoded, by (version, project, label, revision) (see FewShotSegmenter)."""
    similar: SimilarSupports = field(init=False)
    """Pools and per-example memories of SUPPORT_POLICY=similar in this process."""

    def __post_init__(self) -> None:
        self.similar = SimilarSupports(self.store)
        registry = VersionRegistry(self.redis, self.store)
        registry.rebuild_at_start()  # the version folders are the truth: a Redis that lost them gets them back
        self.models = LoadedModels(base_version(self.settings), lambda: load_model(self.settings), registry,
                                   base_ref(self.settings))

    @property
    def model(self):
        """The base DiffewS model, loaded on first use and kept for the life of the process."""
        return self.models.base

    def api(self, context: ProjectContext) -> LabelStudioAPI:
        """The Label Studio API of a project context (ServiceUnavailable saying what is missing)."""
        return LabelStudioAPI.for_context(self.settings, self.store.project(context.project), context)

    def api_or_none(self, context: ProjectContext) -> LabelStudioAPI | None:
        """Like api(), or None when the context has no Label Studio access."""
        return self.api(context) if context.has_api else None

    def example_files(self, context: ProjectContext) -> ExampleFiles:
        """The project's cached example images and masks, fetched through its Label Studio (no model loaded)."""
        return ExampleFiles(self.store, MediaFetcher(self.settings, self.api_or_none(context)))

    def segmenter(self, context: ProjectContext):
        """A FewShotSegmenter for the context's project and model version (the version is never re-derived)."""
        return FewShotSegmenter(self.settings, self.store, self.models.get(context.model_version),
                                context.model_version, self.example_files(context), self.support_sets, self.similar)


def report_progress(**meta) -> None:
    """Merge `meta` into the running job's meta (visible in /jobs/<id> and rq-dashboard); no-op outside a job."""
    job = get_current_job()
    if job is not None:
        job.meta.update(meta)
        job.save_meta()


def current_job_id() -> str:
    """The running RQ job's id (outside a job, a unique stand-in)."""
    job = get_current_job()
    return job.id if job is not None else f"inline-{time.time()}"


def load_model(settings: Settings):
    """Load the configured model: the matcher when DIFFEWS_MODEL is empty (MATCHER_BACKBONE, MATCHER_RESOLUTION),
    else DiffewS (DIFFEWS_MODEL, DIFFEWS_UNET, DIFFEWS_DEVICE, DIFFEWS_DTYPE)."""
    device = settings.device or None
    cache = settings.support_cache_mb << 20
    if uses_matcher(settings):
        logger.info(MATCHER_NOTE)
        if torch.cuda.is_available():
            logger.warning(GPU_HINT)
        return Matcher.from_pretrained(settings.matcher_backbone, resolution=settings.matcher_resolution,
                                       device=device or "cpu", support_cache_bytes=cache)
    if settings.model_spec == "tiny":
        logger.warning("DIFFEWS_MODEL not set: tiny model, untrained on real pictures (synthetic pre-training only) until fine-tuned")
        return DiffewS.tiny(resolution=settings.tiny_resolution, device=device or "cpu", support_cache_bytes=cache,
                            dtype=parse_dtype(settings.dtype, device or "cpu"))
    model = DiffewS.from_pretrained(settings.model_spec, unet=settings.model_unet or None, device=device,
                                    dtype=parse_dtype(settings.dtype, device), support_cache_bytes=cache)
    if settings.resolution:  # DIFFEWS_RESOLUTION: a lower working resolution for CPU-only installations
        model.config = replace(model.config, resolution=settings.resolution)
    return model


_context: WorkerContext | None = None


def set_context(context: WorkerContext | None) -> None:
    """Install the process-wide worker context (the embedded worker shares the web's Redis)."""
    global _context
    _context = context


def get_context() -> WorkerContext:
    """The process-wide worker context, built from the environment on first use."""
    global _context
    if _context is None:
        settings = Settings.from_env()
        redis = connect(settings, start_embedded=False)  # a worker joins the backend's Redis, never starts its own
        _context = WorkerContext(settings, redis, SupportStore(redis, settings.model_dir))
    return _context


IDLE_WORKER_TTL_S = 45
"""The longest worker_ttl an InProcessWorker takes: it beats at least every 30 s while idle."""


class InProcessWorker(SimpleWorker):
    """A SimpleWorker that heartbeats while its job runs, and that also runs in a thread of the web process.

    RQ's SimpleWorker sends no heartbeat during a job, so a job of a killed worker would look alive for
    job_timeout + 60 s. Here a side thread extends the job's and the worker's heartbeats every quarter
    of `heartbeat_ttl_s` and runs RQ's registry maintenance (which retries or fails abandoned jobs) every
    third of it, busy or not: a job whose worker died is handled within about heartbeat_ttl_s * 4/3.
    Off the main thread there are no signals: job timeouts use a timer instead of SIGALRM, and `stop()`
    replaces SIGTERM.

    RQ has no public hook for a heartbeat during a SimpleWorker's job, so this class overrides RQ 3.0's
    execute_job and calls its prepare_execution, perform_job, maintain_heartbeats, run_maintenance_tasks,
    set_state and _install_signal_handlers, and its RQScheduler's lock and move calls (rq is pinned to
    3.0.0 in requirements.txt for this; tests/test_rq_contract.py names every internal and signature relied on,
    so an upgrade fails there with the list). The behaviour is pinned by tests: a killed worker's job retried
    (tests/test_faults.py), idle heartbeats inside the liveness window, retries moved back when due, and
    stop() in embedded mode (tests/test_training_backend.py, tests/test_faults.py).
    """

    death_penalty_class = TimerDeathPenalty

    def __init__(self, queues, *args, heartbeat_ttl_s: int = 45, **kwargs):
        kwargs.setdefault("maintenance_interval", max(2, heartbeat_ttl_s // 3))
        # An idle worker beats every worker_ttl - 15 s (RQ's dequeue timeout): kept well inside WORKER_ALIVE_S
        # whatever JOB_HEARTBEAT_TTL_S is (at 120 it beat every 105 s and /health counted idle workers dead).
        kwargs.setdefault("worker_ttl", min(max(20, heartbeat_ttl_s), IDLE_WORKER_TTL_S))
        super().__init__(queues, *args, **kwargs)
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self._due_mover = None
        self.stop_asked = False
        """True once stop() or a signal asked this worker to leave (a loop that ends otherwise is restarted)."""

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """How long a running job counts as alive without a new heartbeat."""
        return self.heartbeat_ttl_s

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run the job in this thread while a side thread keeps its heartbeat and the registries."""
        execution = self.prepare_execution(job)
        done = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, done), name=f"rq-heartbeat-{job.id}",
                                daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            done.set()
            beat.join(5)
        self.set_state(WorkerStatus.IDLE)

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:
        """RQ's heartbeat, stamped with Redis's clock (BEAT_AT: liveness never compares two machines' clocks);
        also registers the worker again if Redis lost it (restarted without persistence)."""
        super().heartbeat(timeout, pipeline)
        if pipeline is not None:
            return
        if not self.connection.hexists(self.key, "birth"):
            with self.connection.pipeline() as pipe:
                pipe.hset(self.key, mapping=self.serialize())
                worker_registration.register(self, pipe)
                pipe.expire(self.key, self.worker_ttl + 60)
                pipe.execute()
            logger.warning("worker %s: Redis had lost this worker's registration; registered again", self.name)
        self.connection.hset(self.key, BEAT_AT, server_time(self.connection))

    def register_birth(self) -> None:
        """RQ's registration, with a first BEAT_AT: a worker counts as live from its start."""
        super().register_birth()
        self.connection.hset(self.key, BEAT_AT, server_time(self.connection))

    def request_stop(self, signum, frame) -> None:
        """SIGTERM or SIGINT: RQ's warm shutdown, remembered so the supervisor does not start a new worker."""
        self.stop_asked = True
        super().request_stop(signum, frame)

    def _beat(self, job: Job, execution, done: threading.Event) -> None:
        while not done.wait(max(1.0, self.heartbeat_ttl_s / 4)):
            try:
                self.heartbeat()
                self.maintain_heartbeats(job, execution)
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()
            except (RedisError, OSError) as exc:  # Redis away for a moment: the next beat tries again
                logger.warning("worker %s: heartbeat failed (%s)", self.name, exc)

    def run_maintenance_tasks(self) -> None:
        """RQ's registry maintenance, then move scheduled jobs (retries) that are due back to their queues.

        RQ's own scheduler runs in a forked process; a worker holding a CUDA context must not fork, so the
        same RQScheduler.enqueue_scheduled_jobs runs here, under RQ's scheduler lock.
        """
        super().run_maintenance_tasks()
        if self._due_mover is None:
            self._due_mover = RQScheduler(self.queues, connection=self.connection)
        move_due_jobs(self._due_mover)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            super()._install_signal_handlers()

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None):
        """RQ's dequeue, waiting at most STOP_POLL_S at a time so that a stop asked meanwhile is seen.

        RQ's waiting loop only leaves on a job (a signal ends it in a main-thread worker; there is none
        here). Waking it with a job on the queue was not enough: another worker of the same queue (a
        separate worker process on the same Redis) could take that job, and this thread waited forever.
        """
        if timeout is None or max_idle_time is not None:  # burst mode, or RQ's own idle limit
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        while not self._stop_requested:
            result = super().dequeue_job_and_maintain_ttl(min(timeout, STOP_POLL_S), STOP_POLL_S)
            if result is not None:
                return result
        return None

    def unsubscribe(self) -> None:
        """RQ's unsubscribe from the worker's command channel, waiting at most 1 s for its pubsub thread.

        redis-py 8.2's PubSubWorkerThread.stop() joins the thread without a limit, and a thread that read the
        unsubscribe reply just before sleeps through RQ's 60 s poll first: stopping a worker took 60 s.
        The thread, a daemon, leaves at its next wake-up.
        """
        thread, self.pubsub_thread = self.pubsub_thread, None
        if thread is None:
            return
        self.pubsub.unsubscribe()
        if "timeout" in inspect.signature(thread.stop).parameters:
            thread.stop(timeout=1)
        else:  # redis-py before 8.2: stop() only clears the flag
            thread.stop()
            thread.join(timeout=1)
        if not thread.is_alive():
            self.pubsub.close()

    def stop(self) -> None:
        """Finish the current job, then leave the work loop (within STOP_POLL_S when idle)."""
        self.stop_asked = True
        self._stop_requested = True


STOP_POLL_S = 1
"""How often an idle InProcessWorker looks whether it was asked to stop."""


class _QuietSchedulerLock(logging.Filter):
    """Drops RQ's "Acquired scheduler lock" line: the due-job mover takes the lock every second."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Acquired scheduler lock")


logging.getLogger("rq.scheduler").addFilter(_QuietSchedulerLock())


def noop() -> None:
    """Does nothing: enqueued to wake a worker that is blocked waiting for jobs."""


def move_due_jobs(scheduler: RQScheduler) -> None:
    """Move scheduled jobs (retries) that are due back to their queues, under RQ's scheduler lock.

    RQ's own scheduler runs in a forked process; a worker holding a CUDA context must not fork, so the
    same RQScheduler.enqueue_scheduled_jobs runs in the worker's threads instead.
    """
    if scheduler.acquire_locks():
        try:
            scheduler.enqueue_scheduled_jobs()
        finally:  # held only for the move: a worker killed later leaves no lock for 61 s behind
            scheduler.release_locks()


def make_worker(context: WorkerContext, queues: tuple[str, ...]) -> InProcessWorker:
    """A worker on `queues` with the heartbeat settings of the context."""
    return InProcessWorker(list(queues), connection=context.redis, heartbeat_ttl_s=context.settings.job_heartbeat_ttl_s)


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
