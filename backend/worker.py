"""Worker processes: the model loaded once per process, RQ SimpleWorkers (no fork per job), embedded mode."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from redis import Redis
from rq import SimpleWorker, get_current_job
from rq.timeouts import TimerDeathPenalty

from .example_files import ExampleFiles
from .ls_client import LabelStudioAPI
from .media import MediaFetcher
from .queues import ALL_QUEUES, connect
from .settings import Settings
from .store import SupportStore
from .versions import base_version, current_version

MAX_LOADED_VERSIONS = 2
"""Fine-tuned versions a worker keeps loaded besides the base model."""

logger = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What jobs in this process share: settings, Redis, the store and the loaded model."""

    settings: Settings
    redis: Redis
    store: SupportStore
    _model: object = None
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _versions: OrderedDict = field(default_factory=OrderedDict)

    @property
    def model(self):
        """The base DiffewS model, loaded on first use and kept for the life of the process."""
        with self._lock:
            if self._model is None:
                self._model = load_model(self.settings)
            return self._model

    def fresh_base_model(self):
        """A new copy of the base model (training must not change the one serving predictions)."""
        return load_model(self.settings)

    def model_for(self, version: str):
        """The model of a version: the base, or a fine-tuned version loaded once (hot swap, no restart)."""
        if version == base_version(self.settings):
            return self.model
        with self._lock:
            if version in self._versions:
                self._versions.move_to_end(version)
                return self._versions[version]
            from model.versions import load_version

            from .registry import VersionRegistry

            info = VersionRegistry(self.redis, self.store).get(version)
            if info is None:
                logger.warning("version %s is not registered; predicting with the base model", version)
                return self.model
            loaded = load_version(info["path"], device=self.settings.device or None)
            self._versions[version] = loaded
            while len(self._versions) > MAX_LOADED_VERSIONS:
                self._versions.popitem(last=False)
            return loaded

    def api(self, pid: int | None = None) -> LabelStudioAPI:
        """Label Studio API client from settings, else from what the project's /setup sent."""
        return LabelStudioAPI.from_settings(self.settings, self.store.project(pid) if pid else None)

    def api_or_none(self, pid: int | None = None) -> LabelStudioAPI | None:
        """Like api(), or None when no Label Studio access is configured."""
        try:
            return self.api(pid)
        except Exception as exc:  # unconfigured or unreachable: media from LS then fails with a clear message
            logger.debug("no Label Studio API: %s", exc)
            return None

    def example_files(self, pid: int) -> ExampleFiles:
        """The project's cached example images and masks, fetched through its Label Studio (no model loaded)."""
        return ExampleFiles(self.store, MediaFetcher(self.settings, self.api_or_none(pid)))

    def segmenter(self, pid: int):
        """A FewShotSegmenter for one project, with its current model version and its Label Studio's media."""
        from .segmenter import FewShotSegmenter

        version = current_version(self.settings, self.store.project(pid))
        return FewShotSegmenter(self.settings, self.store, self.model_for(version), version, self.example_files(pid))


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
        redis = connect(settings)
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


def start_embedded_worker(context: WorkerContext) -> threading.Thread:
    """Start a worker thread inside this process on all queues (one-command local mode)."""
    set_context(context)

    def target() -> None:
        try:
            run_worker(ALL_QUEUES, preload=True)
        except Exception:
            logger.exception("embedded worker stopped")

    thread = threading.Thread(target=target, name="diffews-worker", daemon=True)
    thread.start()
    return thread
