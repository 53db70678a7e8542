"""Fine-tuning jobs: train on a project's accepted labels, score on a held-out slice, promote by backend.promotion."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from redis import Redis
from rq import get_current_job

from .context import ProjectContext
from .errors import BackendError, BadRequest
from .promotion import decide
from .queues import QUEUE_TRAIN, enqueue, job_alive
from .registry import TRAIN_LOCK_KEY, VersionRegistry
from .settings import Settings
from .store import Example
from .versions import base_ref, base_version, current_version
from .worker import WorkerContext, get_context, report_progress

logger = logging.getLogger(__name__)

_SWAP_LOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end"
"""Replace a lock only if it still holds the value seen (one of two concurrent takers wins)."""


def enqueue_training(redis: Redis, settings: Settings, context: ProjectContext, reason: str) -> dict:
    """Queue one training job for a project unless one is queued or running; says which."""
    pid = context.project
    lock = TRAIN_LOCK_KEY.format(pid=pid)
    job_id = f"train-{pid}-{int(time.time() * 1000)}"
    if not redis.set(lock, job_id, nx=True, ex=settings.train_timeout_s + 600):
        existing = (redis.get(lock) or b"").decode()
        if job_alive(redis)(existing):
            return {"status": "already queued or running", "job": existing}
        # The lock's job is gone (its worker was killed, or it failed without releasing): take the lock over.
        logger.warning("project %s: training lock of %s outlived its job; taking it over", pid, existing or "?")
        if not redis.eval(_SWAP_LOCK, 1, lock, existing, job_id, settings.train_timeout_s + 600):
            return {"status": "already queued or running", "job": (redis.get(lock) or b"").decode()}
    enqueue(redis, QUEUE_TRAIN, "backend.training.train_project", args=(context.to_job(), reason),
            timeout_s=settings.train_timeout_s, job_id=job_id, meta={"project": pid, "reason": reason})
    return {"status": "queued", "job": job_id}


def split_held_out(examples: list[Example], every: int) -> tuple[list[Example], list[Example]]:
    """(train, held out): every n-th example by annotation id is held out, so the split is stable as labels grow."""
    ordered = sorted(examples, key=lambda e: e.annotation_id)
    return ([e for i, e in enumerate(ordered) if i % every != every - 1],
            [e for i, e in enumerate(ordered) if i % every == every - 1])


def _samples(ctx: WorkerContext, context: ProjectContext, examples: list[Example], resolution: int) -> list:
    from model.data import make_sample
    from model.errors import InvalidInputError

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
    from model.errors import InvalidInputError
    from model.evaluate import evaluate

    if not held:
        return None
    try:
        return evaluate(model, held, labels, shots=1, episode_count=episodes, seed=0, support_pool=train).miou
    except InvalidInputError:  # no label has both a held-out query and a support
        return None


def incumbents(settings: Settings, project: dict[str, str]) -> list[str]:
    """The versions a candidate must not be worse than: what the project predicts with now, and its active one."""
    active = project.get("active_version") or base_version(settings)
    return list(dict.fromkeys([current_version(settings, project), active]))


def train_project(context: dict, reason: str = "") -> dict:
    """Fine-tune the context's version on the project's accepted labels; write, score and maybe promote a version."""
    from model.train import TrainConfig, finetune
    from model.versions import save_version, trainable_copy

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
