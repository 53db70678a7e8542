"""A worker process's context: settings, Redis, the support store and the model, loaded once per process and
shared by every job it runs (RQ's worker loop is backend.worker.rq_worker, its supervision backend.worker.supervision)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import torch

from model import DiffewS, Matcher, parse_dtype
from redis import Redis
from rq import get_current_job

from ..core.context import ProjectContext
from ..core.queues import connect
from ..core.registry import VersionRegistry
from ..core.settings import Settings
from ..core.store import SupportStore
from ..core.supports import SupportSets
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
