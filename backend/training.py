"""Fine-tuning jobs: train on a project's accepted labels, score on a held-out slice, promote if not worse."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from redis import Redis
from rq import get_current_job

from .errors import BackendError, BadRequest
from .label_config import parse_label_config
from .queues import QUEUE_TRAIN, enqueue
from .registry import TRAIN_LOCK_KEY, VersionRegistry
from .settings import Settings
from .store import Example
from .versions import base_version, current_version
from .worker import WorkerContext, get_context, report_progress

logger = logging.getLogger(__name__)

SCORE_EPISODES = 40
"""Held-out episodes per version score (fixed seed, so parent and child see the same episodes)."""


def enqueue_training(redis: Redis, settings: Settings, pid: int, reason: str) -> dict:
    """Queue one training job for a project unless one is queued or running; says which."""
    lock = TRAIN_LOCK_KEY.format(pid=pid)
    job_id = f"train-{pid}-{int(time.time() * 1000)}"
    if not redis.set(lock, job_id, nx=True, ex=settings.train_timeout_s + 600):
        existing = redis.get(lock)
        return {"status": "already queued or running", "job": existing.decode() if existing else None}
    enqueue(redis, QUEUE_TRAIN, "backend.training.train_project", args=(pid, reason), timeout_s=settings.train_timeout_s,
            job_id=job_id, meta={"project": pid, "reason": reason})
    return {"status": "queued", "job": job_id}


def split_held_out(examples: list[Example], every: int) -> tuple[list[Example], list[Example]]:
    """(train, held out): every n-th example by annotation id is held out, so the split is stable as labels grow."""
    ordered = sorted(examples, key=lambda e: e.annotation_id)
    return ([e for i, e in enumerate(ordered) if i % every != every - 1],
            [e for i, e in enumerate(ordered) if i % every == every - 1])


def _samples(ctx: WorkerContext, pid: int, examples: list[Example], resolution: int) -> list:
    from model.data import make_sample
    from model.errors import InvalidInputError

    files = ctx.example_files(pid)
    samples = []
    for e in examples:
        try:
            image = files.image_bytes(pid, e.task_id, e.image_url)
            masks = {label: files.example_mask(pid, e, label) for label in e.labels}
            samples.append(make_sample(image, masks, resolution, name=f"annotation {e.annotation_id}"))
        except (BackendError, InvalidInputError) as exc:
            logger.warning("project %s: annotation %s left out of training: %s", pid, e.annotation_id, exc)
    return samples


def _score(model, held: list, train: list, labels: list[str]) -> float | None:
    from model.evaluate import evaluate
    from model.errors import InvalidInputError

    if not held:
        return None
    try:
        return evaluate(model, held, labels, shots=1, episode_count=SCORE_EPISODES, seed=0, support_pool=train).miou
    except InvalidInputError:  # no label has both a held-out query and a support
        return None


def train_project(project_id: int, reason: str = "") -> dict:
    """Fine-tune the project's current version on its accepted labels; write, score and maybe promote a version."""
    from model.train import TrainConfig, finetune
    from model.versions import load_version, save_version

    ctx = get_context()
    job = get_current_job()
    try:
        settings, store = ctx.settings, ctx.store
        registry = VersionRegistry(ctx.redis, store)
        project = store.require_project(project_id)
        labels = list(parse_label_config(project["label_config"]).labels)
        train_ex, held_ex = split_held_out(store.examples(project_id), settings.held_out_every)
        parent = current_version(settings, project)
        base = base_version(settings)
        parent_info = registry.get(parent) if parent != base else None
        model = load_version(parent_info["path"], device=settings.device or None) if parent_info else ctx.fresh_base_model()
        resolution = model.config.resolution
        train, held = _samples(ctx, project_id, train_ex, resolution), _samples(ctx, project_id, held_ex, resolution)
        if len(train) < 2:
            raise BadRequest(f"project {project_id} has {len(train)} usable training images; label at least 2 (plus held-out)")
        report_progress(stage="scoring parent", train_images=len(train), held_out_images=len(held))
        parent_score = _score(model, held, train, labels)
        config = TrainConfig(steps=settings.train_steps, grad_accum=settings.train_grad_accum, max_shots=settings.max_shots,
                             lr=settings.train_lr, mode=settings.train_mode, augment=settings.train_augment,
                             seed=int(time.time()) % 100000)
        every = max(1, settings.train_steps // 100)
        result = finetune(model, train, config, on_step=lambda step, loss: step % every == 0 and report_progress(
            stage="training", step=step, steps=config.steps, loss=round(loss, 5)))
        report_progress(stage="scoring new version")
        new_score = _score(model, held, train, labels)
        n = len(registry.list(project_id)) + 1
        name = f"{base}-p{project_id}-v{n}"
        root = Path(settings.model_dir) / "versions" / str(project_id)
        base_ref = {"version": parent_info["path"]} if parent_info else {"spec": settings.model_spec, "unet": settings.model_unet or None}
        promoted = new_score is None or parent_score is None or new_score >= parent_score
        summary = {
            "reason": reason, "train_images": len(train), "held_out_images": len(held), "labels": result.labels,
            "steps": result.steps, "final_loss": result.final_loss,
            "loss_curve": result.losses[:: max(1, len(result.losses) // 100)],
            "held_out_miou": {"parent": parent_score, "new": new_score}, "config": result.config,
        }
        path = save_version(model, root, name, base=base_ref, parent=parent, mode=config.mode, summary=summary)
        registry.add({"name": name, "project": project_id, "path": str(path), "parent": parent, "mode": config.mode,
                      "created_at": time.time(), "scores": summary["held_out_miou"], "promoted": promoted})
        if promoted:
            registry.promote(project_id, name)
        logger.info("project %s: version %s (held-out mIoU parent %s, new %s) %s", project_id, name, parent_score,
                    new_score, "promoted" if promoted else "kept back")
        report_progress(stage="done", version=name, promoted=promoted)
        return {"version": name, "promoted": promoted, "scores": summary["held_out_miou"], "steps": result.steps}
    finally:
        lock = TRAIN_LOCK_KEY.format(pid=project_id)
        if job is None or ctx.redis.get(lock) == job.id.encode():
            ctx.redis.delete(lock)
