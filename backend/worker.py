"""Worker processes: the model loaded once per process, RQ SimpleWorkers (no fork per job), embedded mode."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from redis import Redis
from rq import SimpleWorker, get_current_job
from rq.timeouts import TimerDeathPenalty

from .context import ProjectContext
from .example_files import ExampleFiles
from .loaded_models import LoadedModels
from .ls_client import LabelStudioAPI
from .media import MediaFetcher
from .queues import ALL_QUEUES, QUEUE_BULK, QUEUE_HIGH, QUEUE_TRAIN, connect
from .registry import VersionRegistry
from .settings import Settings
from .store import SupportStore
from .versions import base_version

logger = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What jobs in this process share: settings, Redis, the store and the loaded models."""

    settings: Settings
    redis: Redis
    store: SupportStore
    models: LoadedModels = field(init=False)

    def __post_init__(self) -> None:
        self.models = LoadedModels(base_version(self.settings), lambda: load_model(self.settings),
                                   VersionRegistry(self.redis, self.store), self.settings.device or None)

    @property
    def model(self):
        """The base DiffewS model, loaded on first use and kept for the life of the process."""
        return self.models.base

    def fresh_base_model(self):
        """A new copy of the base model (training must not change the one serving predictions)."""
        return load_model(self.settings)

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
        from .segmenter import FewShotSegmenter

        return FewShotSegmenter(self.settings, self.store, self.models.get(context.model_version),
                                context.model_version, self.example_files(context))


def report_progress(**meta) -> None:
    """Merge `meta` into the running job's meta (visible in /jobs/<id> and rq-dashboard); no-op outside a job."""
    job = get_current_job()
    if job is not None:
        job.meta.update(meta)
        job.save_meta()


def load_model(settings: Settings):
    """Load DiffewS as configured (DIFFEWS_MODEL, DIFFEWS_UNET, DIFFEWS_DEVICE)."""
    from model import DiffewS

    device = settings.device or None
    if settings.model_spec == "tiny":
        logger.warning("DIFFEWS_MODEL not set: tiny model, untrained on real pictures (synthetic pre-training only) until fine-tuned")
        return DiffewS.tiny(resolution=settings.tiny_resolution, device=device or "cpu")
    return DiffewS.from_pretrained(settings.model_spec, unet=settings.model_unet or None, device=device)


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


class InProcessWorker(SimpleWorker):
    """A SimpleWorker that also runs in a thread of the web process.

    Off the main thread there are no signals: job timeouts use a timer instead of SIGALRM, and
    `stop()` replaces SIGTERM.
    """

    death_penalty_class = TimerDeathPenalty

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            super()._install_signal_handlers()

    def stop(self) -> None:
        """Finish the current job, then leave the work loop (a no-op job wakes a blocked dequeue)."""
        self._stop_requested = True
        if self.queues:
            self.queues[0].enqueue(noop, job_timeout=10, result_ttl=0)


def noop() -> None:
    """Does nothing: enqueued to wake a worker that is blocked waiting for jobs."""


def run_worker(queues: tuple[str, ...] = ALL_QUEUES, *, burst: bool = False, preload: bool = True) -> bool:
    """Run a SimpleWorker on `queues` in this process (model loaded once, jobs never forked)."""
    context = get_context()
    if preload:
        context.model  # load before taking the first job, so a bad DIFFEWS_MODEL fails at start
    worker = InProcessWorker(list(queues), connection=context.redis)
    return worker.work(burst=burst, logging_level=logging.getLevelName(logging.getLogger().level))


EMBEDDED_QUEUES = ((QUEUE_HIGH,), (QUEUE_BULK,), (QUEUE_TRAIN,))
"""One worker thread per queue in one-command mode: training never holds up a click."""


def start_embedded_workers(context: WorkerContext) -> list[threading.Thread]:
    """Start one worker thread per queue inside this process, sharing one loaded model (one-command mode)."""
    set_context(context)
    context.model  # load once, before any thread takes a job

    def target(queues: tuple[str, ...]) -> None:
        try:
            run_worker(queues, preload=False)
        except Exception:
            logger.exception("embedded worker on %s stopped", ",".join(queues))

    threads = [threading.Thread(target=target, args=(queues,), name=f"diffews-worker-{queues[0]}", daemon=True)
               for queues in EMBEDDED_QUEUES]
    for thread in threads:
        thread.start()
    return threads
