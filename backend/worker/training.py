"""Fine-tuning jobs: train on a project's accepted labels, score on a held-out slice, promote by backend.core.promotion."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from model import InvalidInputError, TrainConfig, evaluate_episodes, finetune, make_sample, save_version, trainable_copy
from rq import get_current_job

from ..core.context import ProjectContext
from ..core.errors import BackendError, BadRequest
from ..core.promotion import decide
from ..core.registry import TRAIN_LOCK_KEY, VersionRegistry
from ..core.settings import Settings
from ..core.store import Example
from ..core.versions import base_ref, base_version, current_version
from .runtime import WorkerContext, get_context, report_progress

logger = logging.getLogger(__name__)

def split_held_out(examples: list[Example], every: int) -> tuple[list[Example], list[Example]]:
    """(train, held out): every n-th example by annotation id is held out, so the split is stable as labels grow."""
    ordered = sorted(examples, key=lambda e: e.annotation_id)
    return ([e for i, e in enumerate(ordered) if i % every != every - 1],
            [e for i, e in enumerate(ordered) if i % every == every - 1])


def _samples(ctx: WorkerContext, context: ProjectContext, examples: list[Example], resolution: int) -> list:
    files, pid = ctx.example_files(context), context.project
    samples = []
    for e in examples:
        try:
            image = files.image_bytes(pid, e.task_id, e.image_url)
            masks = {label: files.example_mask(pid, e, label) for label in e.labels}
            samples.append(make_sample(image, masks, resolution, name=f"annotation {e.annotation_id}"))
        except (BackendError, InvalidInputError) as exc:
            logger.warning("project %s: annotation %s left out of training: %s", pid, e.annotation_id, exc)
    return samples


def _score(model, held: list, train: list, labels: list[str], episodes: int) -> float | None:
    if not held:
        return None
    try:
        return evaluate_episodes(model, held, labels, shots=1, episode_count=episodes, seed=0, support_pool=train).miou
    except InvalidInputError:  # no label has both a held-out query and a support
        return None


def incumbents(settings: Settings, project: dict[str, str]) -> list[str]:
    """The versions a candidate must not be worse than: what the project predicts with now, and its active one."""
    active = project.get("active_version") or base_version(settings)
    return list(dict.fromkeys([current_version(settings, project), active]))


def train_project(context: dict, reason: str = "") -> dict:
    """Fine-tune the context's version on the project's accepted labels; write, score and maybe promote a version."""
    ctx, project_ctx = get_context(), ProjectContext.from_job(context)
    project_id, parent = project_ctx.project, project_ctx.model_version
    job = get_current_job()
    try:
        settings, store = ctx.settings, ctx.store
        registry = VersionRegistry(ctx.redis, store)
        labels = list(project_ctx.config.labels)
        train_ex, held_ex = split_held_out(store.examples(project_id), settings.held_out_every)
        base = base_version(settings)
        parent_folder = registry.folder(parent) if parent != base else None
        # A copy to train, sharing the serving model's frozen tensors (LoRA) or a float32 copy of its UNet (full):
        # the model answering clicks meanwhile is never touched.
        model = trainable_copy(ctx.models.get(parent), settings.train_mode)
        resolution = model.config.resolution
        train = _samples(ctx, project_ctx, train_ex, resolution)
        held = _samples(ctx, project_ctx, held_ex, resolution)
        if len(train) < 2:
            raise BadRequest(f"project {project_id} has {len(train)} usable training images; label at least 2 (plus held-out)")
        seed = settings.train_seed if settings.train_seed is not None else int(time.time()) % 100000
        config = TrainConfig(steps=settings.train_steps, grad_accum=settings.train_grad_accum, max_shots=settings.max_shots,
                             lr=settings.train_lr, mode=settings.train_mode, augment=settings.train_augment, seed=seed)
        every = max(1, settings.train_steps // 100)
        report_progress(stage="training", train_images=len(train), held_out_images=len(held))
        result = finetune(model, train, config, on_step=lambda step, loss: step % every == 0 and report_progress(
            stage="training", step=step, steps=config.steps, loss=round(loss, 5)))
        name = registry.next_name(project_id, base)
        report_progress(stage="scoring")
        against = incumbents(settings, store.require_project(project_id))  # what is live now, not at enqueue time
        scores = {name: _score(model, held, train, labels, settings.score_episodes)}
        for incumbent in against:
            scores[incumbent] = _score(ctx.models.get(incumbent), held, train, labels, settings.score_episodes)
        decision = decide(name, scores, against, held_out=len(held))
        summary = {
            "reason": reason, "train_images": len(train), "held_out_images": len(held), "labels": result.labels,
            "steps": result.steps, "final_loss": result.final_loss, "seed": seed,
            "loss_curve": result.losses[:: max(1, len(result.losses) // 100)],
            "held_out_miou": scores, "decision": decision.as_dict(), "config": result.config,
        }
        root = Path(settings.model_dir) / "versions" / str(project_id)
        weights_base = {"version": parent_folder.name} if parent_folder else base_ref(settings)
        path = save_version(model, root, name, base=weights_base, parent=parent, mode=config.mode, summary=summary,
                            project=project_id, weights=result.weights)
        registry.add(path)
        if decision.promoted:
            registry.promote(project_id, name)
        outcome = {"version": name, "at": time.time(), "reason": reason, **decision.as_dict()}
        store.set_project_field(project_id, "last_training", json.dumps(outcome))
        logger.info("project %s: version %s: %s", project_id, name, decision.reason)
        report_progress(stage="done", version=name, promoted=decision.promoted, decision=decision.reason)
        return {"version": name, "promoted": decision.promoted, "reason": decision.reason, "scores": scores,
                "steps": result.steps}
    finally:
        lock = TRAIN_LOCK_KEY.format(pid=project_id)
        if job is None or ctx.redis.get(lock) == job.id.encode():
            ctx.redis.delete(lock)
