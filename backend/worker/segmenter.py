"""Predictions for Label Studio tasks from a project's support examples, run in workers.

This is the predict() and model_version half of a LabelStudioMLBase-like interface; setup() is the /setup
route and fit() is backend.worker.training.train_project.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from model import DiffewS, InvalidInputError, QueryBatch, SupportMemory, to_rgb

from ..core.errors import BackendError, MediaError, NoExamplesYet
from ..core.example_health import ExampleHealth
from ..core.label_config import LabelConfig
from ..core.ls_schema import Prediction
from ..core.settings import Settings
from ..core.store import Example, SupportStore
from ..core.supports import SupportSetKey, SupportSets
from .example_files import ExampleFiles
from .refine import refine
from .regions import MaskTooFragmented, mask_regions_for
from .similar import SimilarSupports

logger = logging.getLogger(__name__)


@dataclass
class TaskFailure:
    """Why one task could not be predicted (bulk jobs record it and go on)."""

    task_id: int
    message: str


@dataclass
class PredictionRun:
    """Predictions of a batch of tasks, the tasks that failed, and the support revision they were made from."""

    predictions: dict[int, dict]
    failures: list[TaskFailure]
    revision: int
    masks: int = 0
    """Non-empty masks the model predicted."""
    kept: int = 0
    """Of those, the ones whose score reached their label's threshold (Settings.min_score)."""


def label_regions(config: LabelConfig, label: str, mask: np.ndarray, score: float) -> list[dict]:
    """A label's mask as regions of every output control that carries the label (brush, polygons, boxes)."""
    return [region for control in config.outputs_for(label)
            for region in mask_regions_for(control, config.image_name, label, mask, score)]


def summarise(regions: list[dict], model_version: str) -> dict:
    """A prediction: its regions, a task score (the weakest region's; 0 when nothing was found) and version,
    checked against the schema of what Label Studio stores (backend.core.ls_schema.Prediction)."""
    score = min((r["score"] for r in regions), default=0.0)
    prediction = {"result": regions, "score": round(float(score), 4), "model_version": model_version}
    Prediction.model_validate(prediction)  # the dict itself is sent: a dump would copy every brush RLE
    return prediction


class FewShotSegmenter:
    """Predict brush masks for tasks from a project's support examples with one model version."""

    def __init__(self, settings: Settings, store: SupportStore, model: DiffewS, model_version: str, files: ExampleFiles,
                 sets: SupportSets | None = None, similar: SimilarSupports | None = None):
        self.settings = settings
        self.store = store
        self.model = model
        self.model_version = model_version
        self.files = files
        self.sets = sets if sets is not None else SupportSets()
        """The support sets this process encoded (shared by the segmenters of one worker process)."""
        self.similar = similar if similar is not None else SimilarSupports(store)
        """Pools and per-example memories of SUPPORT_POLICY=similar (shared like `sets`)."""

    # ---- support ----------------------------------------------------------------------------

    def supports(self, pid: int, config: LabelConfig, labels: list[str] | None = None) -> dict[str, SupportMemory]:
        """Encoded support memory per label (of `labels`, default all) that has usable examples (policy:
        SUPPORT_POLICY, at most MAX_SHOTS). A support set this process encoded at the label's current
        revision comes back with no I/O at all; otherwise its K examples are read and encoded."""
        revisions = self.store.label_revisions(pid)
        memories = {}
        for label in labels if labels is not None else config.labels:
            if not revisions.get(label):
                continue  # never had an example
            key = SupportSetKey(self.model_version, pid, label, revisions[label], self.settings.support_policy,
                                self.settings.max_shots)
            cache_key = self.sets.lookup(key)
            memory = self.model.support_cache.get(cache_key) if cache_key else None
            if memory is None:
                memory = self._encode(pid, label)
                if memory is None:
                    continue
                replaced = self.sets.remember(key, memory.key)
                if replaced is not None:  # that support set is gone for good
                    self.model.support_cache.discard(replaced)
            memories[label] = memory
        return memories

    def _encode(self, pid: int, label: str) -> SupportMemory | None:
        loaded = [self._load_example(pid, example, label)
                  for example in self.store.select(pid, label, self.settings.max_shots, self.settings.support_policy)]
        usable = [pair for pair in loaded if pair is not None]
        if not usable:
            return None
        images, masks = zip(*usable)
        return self.model.encode_support(list(images), list(masks), batch_size=self.settings.model_batch_size)

    def _load_example(self, pid: int, example: Example, label: str) -> tuple[np.ndarray, np.ndarray] | None:
        """An example's image and its mask of `label`, or None (why is logged, and recorded for /status).

        One that failed is not fetched again before its next try (backing off: backend.core.example_health).
        """
        health = ExampleHealth(self.store.redis)
        if health.blocked(pid, example.annotation_id):
            return None
        try:
            rgb = to_rgb(self.files.image_bytes(pid, example.task_id, example.image_url), f"task {example.task_id}")
            mask = self.files.example_mask(pid, example, label)
        except (BackendError, InvalidInputError) as exc:  # one bad example never breaks the project
            message = exc.message if isinstance(exc, BackendError) else str(exc)
            wait = health.failed(pid, example.annotation_id, example.labels, message)
            logger.warning("project %s: skipping example of annotation %s for %d s: %s", pid, example.annotation_id,
                           wait, message)
            self.store.record_errors(pid, {str(example.annotation_id): f"skipped when predicting: {message}"})
            return None
        health.recovered(pid, example.annotation_id)
        if mask.shape != rgb.shape[:2] or not mask.any():
            logger.warning("project %s: skipping annotation %s label %r: mask %s vs image %s or empty",
                           pid, example.annotation_id, label, mask.shape, rgb.shape[:2])
            return None
        return rgb, mask

    def describe_pools(self, pid: int, labels: list[str]) -> int:
        """Build the SUPPORT_POLICY=similar pools of `labels` now, describing the examples that have no descriptor
        yet (ingestion calls this as examples arrive, so a click never describes a pool); how many examples."""
        revisions = self.store.label_revisions(pid)
        return sum(len(self.similar.pool(self.model, pid, label, revisions[label],
                                         lambda e, lab: self._load_example(pid, e, lab)).examples)
                   for label in labels if revisions.get(label))

    def supports_per_query(self, pid: int, config: LabelConfig, queries: QueryBatch,
                           labels: list[str] | None = None) -> list[dict[str, SupportMemory]]:
        """Each query's support memory per label with usable examples: by SUPPORT_POLICY=similar its own K
        examples (backend.worker.similar), by any other policy the label's one support set."""
        if self.settings.support_policy != "similar":
            return [self.supports(pid, config, labels)] * len(queries)
        revisions = self.store.label_revisions(pid)
        out: list[dict[str, SupportMemory]] = [{} for _ in range(len(queries))]
        descriptors = queries.descriptors
        for label in labels if labels is not None else config.labels:
            if not revisions.get(label):
                continue
            memories = self.similar.choose(self.model, self.model_version, pid, label, revisions[label], descriptors,
                                           self.settings.max_shots, lambda e, lab: self._load_example(pid, e, lab))
            for per_query, memory in zip(out, memories or []):
                if memory is not None:
                    per_query[label] = memory
        return out

    # ---- prediction -------------------------------------------------------------------------

    def load_queries(self, pid: int, tasks: list[dict], config: LabelConfig) -> tuple[list[dict], list[np.ndarray], list[TaskFailure]]:
        """Fetch and decode each task's image; failures are returned, not raised."""
        ok_tasks, images, failures = [], [], []
        for task in tasks:
            task_id = int(task.get("id", 0))
            url = (task.get("data") or {}).get(config.image_key)
            try:
                images.append(to_rgb(self.files.fetcher.fetch(url, task_id), f"task {task_id} image"))
                ok_tasks.append(task)
            except (MediaError, InvalidInputError) as exc:
                failures.append(TaskFailure(task_id, str(exc)))
        return ok_tasks, images, failures

    def predict(self, pid: int, tasks: list[dict], config: LabelConfig) -> PredictionRun:
        """Predictions keyed by task id for every task whose image loaded, the failures, the revision used."""
        revision = self.store.revision(pid)  # read first: a change during the run makes the result look older
        run = PredictionRun({}, [], revision)
        if not tasks:
            return run
        ok_tasks, images, run.failures = self.load_queries(pid, tasks, config)
        if not ok_tasks:
            return run
        queries = self.model.encode_queries(images, batch_size=self.settings.model_batch_size)
        memories = self.supports_per_query(pid, config, queries)
        keep = [i for i, per_label in enumerate(memories) if per_label]
        # no prediction at all rather than an empty one that would block a later retrieval
        run.failures += [TaskFailure(int(task["id"]), "no support examples yet: label a few images first")
                         for task, per_label in zip(ok_tasks, memories) if not per_label]
        if not keep:
            return run
        queries = queries.select(keep)
        outputs = self.model.segment_many_encoded(queries, [memories[i] for i in keep],
                                                  batch_size=self.settings.model_batch_size)
        model_default = getattr(self.model, "suggested_min_score", 0.0)
        for task, per_label in zip([ok_tasks[i] for i in keep], outputs):
            found = {label: out for label, out in per_label.items() if out.mask.any()}
            kept = {label: out for label, out in found.items()
                    if out.score >= self.settings.min_score(label, model_default)}
            run.masks, run.kept = run.masks + len(found), run.kept + len(kept)
            try:
                regions = [region for label, out in kept.items()
                           for region in label_regions(config, label, out.mask, out.score)]
            except MaskTooFragmented as exc:  # this task fails with why; the others of the batch are delivered
                run.failures.append(TaskFailure(int(task["id"]), exc.message))
                continue
            run.predictions[int(task["id"])] = summarise(regions, self.model_version)
        return run

    def predict_interactive(self, pid: int, task: dict, config: LabelConfig, prompts: dict,
                            expired: Callable[[], bool] = lambda: False) -> dict:
        """One prediction with the regions the smart-tool prompts (prompts.LabelPrompt per label) refine;
        DeadlinePassed between model passes once `expired()` says the caller stopped waiting."""
        similar = self.settings.support_policy == "similar"  # supports chosen for this image: it is read first
        memories = None if similar else self.supports(pid, config, list(prompts))
        _, images, failures = self.load_queries(pid, [task], config)
        if failures:
            raise MediaError(failures[0].message)
        if memories is None:
            memories = self.supports_per_query(pid, config, self.model.encode_queries(images), list(prompts))[0]
        missing = [label for label in prompts if label not in memories]
        if missing:
            raise NoExamplesYet(f"project {pid} has no usable support examples of {missing[0]!r} yet: label a few "
                             "images with it first (the backend learns them from annotation webhooks, or from "
                             "Label Studio's API when LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY are set)")
        regions = []
        for label, prompt in prompts.items():
            mask, score = refine(self.model, images[0], memories[label], prompt, expired)
            if mask.any():
                regions += label_regions(config, label, mask, score)
        return summarise(regions, self.model_version)
