"""Fine-tuning jobs: train on a project's accepted labels, score by cross-validation, promote by backend.core.promotion."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

from model import InvalidInputError, Matcher, TrainConfig, episode_ious, finetune, make_sample, save_version, trainable_copy
from rq import get_current_job

from ..core.context import ProjectContext
from ..core.errors import BackendError, BadRequest
from ..core.promotion import decide
from ..core.refresh import VERSION_CHANGED, request_refresh
from ..core.registry import TRAIN_LOCK_KEY, VersionRegistry
from ..core.settings import Settings
from ..core.store import Example
from ..core.versions import base_ref, base_version, current_version
from .runtime import WorkerContext, get_context, report_progress

logger = logging.getLogger(__name__)

def folds_of(count: int, folds: int) -> list[list[int]]:
    """Image indices (in annotation-id order) per fold: image i goes to fold i % k, k = min(folds, count)."""
    k = max(1, min(folds, count))
    return [list(range(f, count, k)) for f in range(k)]


def cv_plan(samples: list, labels: list[str], fold: list[int], shots: int, budget: int, seed: int) -> list:
    """Episodes whose queries are the fold's images (each at least once, one label in turn, then more labels up to
    `budget` episodes in all) and whose supports come from the other images (fixed seed)."""
    rng = random.Random(seed)
    inside = set(fold)
    others = {c: [i for i in range(len(samples)) if i not in inside and c in samples[i].masks] for c in labels}
    plan, extra = [], []
    for j, q in enumerate(fold):
        held = [(c, q) for c in labels if c in samples[q].masks and others[c]]
        if held:
            first = held[j % len(held)]  # every image once, its labels taken in turn across the fold
            plan.append(first)
            extra += [pair for pair in held if pair != first]
    plan += extra[: max(0, budget - len(plan))]
    return [(c, q, rng.sample(others[c], min(shots, len(others[c])))) for c, q in plan]


def load_samples(ctx: WorkerContext, context: ProjectContext, examples: list[Example], resolution: int,
                 purpose: str = "training") -> list[tuple[Example, object]]:
    """(example, model.data.Sample at `resolution`) for every example whose image and masks load (others logged)."""
    files, pid = ctx.example_files(context), context.project
    pairs = []
    for e in examples:
        try:
            image = files.image_bytes(pid, e.task_id, e.image_url)
            masks = {label: files.example_mask(pid, e, label) for label in e.labels}
            pairs.append((e, make_sample(image, masks, resolution, name=f"annotation {e.annotation_id}")))
        except (BackendError, InvalidInputError) as exc:
            logger.warning("project %s: annotation %s left out of %s: %s", pid, e.annotation_id, purpose, exc)
    return pairs


def cross_validate(ctx: WorkerContext, parent_model, samples: list, labels: list[str], config: TrainConfig,
                   against: list[str], settings: Settings) -> tuple[dict[str, list[float]], int]:
    """Per version, its IoU on every cross-validation episode: the candidate's through a model trained without the
    episode's query image (one per fold), each incumbent's as served; returns (IoUs by name, folds). The key
    "candidate" holds the candidate's."""
    groups = folds_of(len(samples), settings.cv_folds)
    ious: dict[str, list[float]] = {"candidate": [], **{name: [] for name in against}}
    budget = max(1, settings.score_episodes // len(groups))
    for f, fold in enumerate(groups):
        plan = cv_plan(samples, labels, fold, 1, budget, seed=f)
        if not plan:
            continue
        inside = set(fold)
        train = [sample for i, sample in enumerate(samples) if i not in inside]
        report_progress(stage="cross-validation", fold=f + 1, folds=len(groups), episodes=len(plan))
        fold_model = trainable_copy(parent_model, settings.train_mode)
        try:
            finetune(fold_model, train, config)
        except InvalidInputError as exc:  # too few images left to train without this fold: it gives no evidence
            logger.info("cross-validation fold %d of %d skipped: %s", f + 1, len(groups), exc)
            continue
        ious["candidate"] += episode_ious(fold_model, samples, plan)
        for name in against:
            ious[name] += episode_ious(ctx.models.get(name), samples, plan)
    return ious, len(groups)


DEFAULT_TRAIN_STEPS = 300
"""Episodes of a DiffewS fine-tuning run when TRAIN_STEPS is empty."""
MATCHER_TRAIN_STEPS = 500
"""Episodes of a matcher fine-tuning run when TRAIN_STEPS is empty (more than DiffewS's: the tuned backbone blocks
learn slowly; at 25 CamVid frames 500 did better than 300, docs/matcher.md)."""


def train_config(settings: Settings, seed: int, model: object | None = None) -> TrainConfig:
    """The fine-tuning run the settings ask for of `model` (TRAIN_*; episodes of 1 to TRAIN_MAX_SHOTS, else MAX_SHOTS,
    supports; TRAIN_STEPS, else the model family's default)."""
    steps = settings.train_steps or (MATCHER_TRAIN_STEPS if isinstance(model, Matcher) else DEFAULT_TRAIN_STEPS)
    return TrainConfig(steps=steps, grad_accum=settings.train_grad_accum,
                       max_shots=settings.train_max_shots or settings.max_shots, lr=settings.train_lr,
                       mode=settings.train_mode, augment=settings.train_augment, seed=seed,
                       tuned_blocks=settings.matcher_tuned_blocks)


def incumbents(settings: Settings, project: dict[str, str]) -> list[str]:
    """The versions a candidate must not be worse than: what the project predicts with now, its active one, and the
    root (the configured base), so that steps each within noise cannot add up to a loss against where it started."""
    base = base_version(settings)
    active = project.get("active_version") or base
    return list(dict.fromkeys([current_version(settings, project), active, base]))


def train_project(context: dict, reason: str = "") -> dict:
    """Fine-tune the context's version on the project's accepted labels; write, score and maybe promote a version."""
    ctx, project_ctx = get_context(), ProjectContext.from_job(context)
    project_id, parent = project_ctx.project, project_ctx.model_version
    job = get_current_job()
    try:
        settings, store = ctx.settings, ctx.store
        registry = VersionRegistry(ctx.redis, store)
        labels = list(project_ctx.config.labels)
        base = base_version(settings)
        parent_folder = registry.folder(parent) if parent != base else None
        parent_model = ctx.models.get(parent)
        # A copy to train, sharing the serving model's frozen tensors (LoRA) or a float32 copy of its UNet (full):
        # the model answering clicks meanwhile is never touched.
        model = trainable_copy(parent_model, settings.train_mode)
        held = store.held(project_id)  # kept out by a label check until confirmed (HOLD_SUSPICIOUS_LABELS)
        examples = sorted((e for e in store.examples(project_id) if e.annotation_id not in held),
                          key=lambda e: e.annotation_id)
        samples = [sample for _, sample in load_samples(ctx, project_ctx, examples, model.config.resolution)]
        if len(samples) < 2:
            raise BadRequest(f"project {project_id} has {len(samples)} usable labeled images; label at least 2")
        seed = settings.train_seed if settings.train_seed is not None else int(time.time()) % 100000
        config = train_config(settings, seed, model)
        every = max(1, config.steps // 100)
        report_progress(stage="training", train_images=len(samples))
        result = finetune(model, samples, config, on_step=lambda step, loss: step % every == 0 and report_progress(
            stage="training", step=step, steps=config.steps, loss=round(loss, 5)))
        name = registry.next_name(project_id, base)
        against = incumbents(settings, store.require_project(project_id))  # what is live now, not at enqueue time
        ious, folds = cross_validate(ctx, parent_model, samples, labels, config, against, settings)
        ious[name] = ious.pop("candidate")
        decision = decide(name, ious, against, images=len(samples), folds=folds)
        scores = decision.scores
        summary = {
            "reason": reason, "train_images": len(samples), "labels": result.labels,
            "steps": result.steps, "final_loss": result.final_loss, "seed": seed,
            "loss_curve": result.losses[:: max(1, len(result.losses) // 100)],
            "cv_mean_iou": scores, "evidence": decision.evidence, "decision": decision.as_dict(), "config": result.config,
        }
        root = Path(settings.model_dir) / "versions" / str(project_id)
        weights_base = {"version": parent_folder.name} if parent_folder else base_ref(settings)
        path = save_version(model, root, name, base=weights_base, parent=parent, mode=config.mode, summary=summary,
                            project=project_id, weights=result.weights)
        registry.add(path)
        if decision.promoted:
            before = current_version(settings, store.require_project(project_id))
            registry.promote(project_id, name)
            if current_version(settings, store.require_project(project_id)) != before:  # not while pinned
                request_refresh(ctx.redis, settings, project_ctx, VERSION_CHANGED, f"promoted {name}")
        outcome = {"version": name, "at": time.time(), "reason": reason, **decision.as_dict()}
        store.set_project_field(project_id, "last_training", json.dumps(outcome))
        logger.info("project %s: version %s: %s", project_id, name, decision.reason)
        report_progress(stage="done", version=name, promoted=decision.promoted, decision=decision.reason)
        return {"version": name, "promoted": decision.promoted, "reason": decision.reason, "scores": scores,
                "evidence": decision.evidence, "steps": result.steps}
    finally:
        lock = TRAIN_LOCK_KEY.format(pid=project_id)
        if job is None or ctx.redis.get(lock) == job.id.encode():
            ctx.redis.delete(lock)
