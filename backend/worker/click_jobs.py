"""Click jobs: the predictions of one /predict (returned to the waiting web process, or posted when it is gone),
smart-tool answers, and the later check that Label Studio stored what was returned."""

from __future__ import annotations

import logging
import time

from ..core.admission import click_ended, record_click_seconds
from ..core.bulk import held_predictions
from ..core.catalog import submit
from ..core.context import ProjectContext
from ..core.errors import BackendError, DeadlinePassed, error_record
from ..core.ledger import VIA_RETURNED, DeliveryLedger, click_may_take
from ..core.prompts import parse_prompts, prompt_passes
from ..core.queues import job_alive, server_time
from .delivery import Delivered, Delivery
from .runtime import WorkerContext, current_job_id, get_context

logger = logging.getLogger(__name__)


def predict_tasks(context: dict, tasks: list[dict], deadline: float) -> dict:
    """Predict the tasks of one /predict and deliver them exactly once.

    The worker alone decides how: finished before `deadline` (Redis time), the predictions go back to
    the waiting web process, which returns them to Label Studio; finished later, they are posted
    through the API. A job that starts after its deadline is dropped (its caller is gone).
    Per task the answer is a prediction, or None (failed, or being delivered by another job). A typed error that
    fails the whole click (a version that cannot be loaded) is returned as its class, status and message.
    """
    ctx, project, job_id = get_context(), ProjectContext.from_job(context), current_job_id()
    out = {"model_version": project.model_version, "predictions": [None] * len(tasks), "failures": {}, "skipped": {}}
    started = time.monotonic()
    try:
        if server_time(ctx.redis) >= deadline:
            return {**out, "delivered": "dropped"}
        try:
            delivered = _predict_and_deliver(ctx, project, tasks, deadline, job_id, out)
        except BackendError as exc:  # claims released (Delivery.predict); the web answers with the same class and status
            return {**out, "delivered": "error", **error_record(exc)}
        record_click_seconds(ctx.redis, time.monotonic() - started)
        return delivered
    finally:
        click_ended(ctx.redis, job_id)


def predict_interactive(context: dict, task: dict, regions: list[dict], deadline: float) -> dict:
    """A smart-tool request: the refined regions of one task, returned to the waiting web process only.

    Nothing is posted or recorded in the ledger: Label Studio shows the answer in the editor, and the
    annotator accepts it as an annotation. A job that starts after its deadline is dropped.
    """
    ctx, project, job_id = get_context(), ProjectContext.from_job(context), current_job_id()
    started = time.monotonic()
    try:
        if server_time(ctx.redis) >= deadline:
            return {"delivered": "dropped"}
        try:
            prompts = parse_prompts(regions, project.config, ctx.settings.max_prompts)
            prediction = ctx.segmenter(project).predict_interactive(
                project.project, task, project.config, prompts, expired=lambda: server_time(ctx.redis) >= deadline)
        except DeadlinePassed as exc:  # its caller got a 504 and is gone: the remaining passes are not run
            logger.info("smart-tool job %s stopped: %s", job_id, exc.message)
            return {"delivered": "dropped"}
        except BackendError as exc:  # the web answers it with the same class, status and message
            return {"delivered": "error", **error_record(exc)}
        record_click_seconds(ctx.redis, time.monotonic() - started, prompt_passes(prompts))
        return {"delivered": "returned", "prediction": prediction}
    finally:
        click_ended(ctx.redis, job_id)


def _predict_and_deliver(ctx: WorkerContext, project: ProjectContext, tasks: list[dict], deadline: float, job_id: str,
                         out: dict) -> dict:
    delivery = Delivery(ctx, project, job_id)
    held = held_predictions(tasks, project.model_version)
    claims = delivery.claim([int(t["id"]) for t in tasks if not held.get(int(t["id"]))],
                            click_may_take(job_alive(ctx.redis)))
    for task in tasks:
        tid = int(task["id"])
        if tid not in claims:
            delivery.skip(tid, "Label Studio holds a prediction of this version" if held.get(tid)
                          else "another job is delivering this task's prediction")
    run = delivery.predict(claims, tasks)
    if server_time(ctx.redis) < deadline:
        delivery.record_returned(claims, run.revision)
        if claims and project.has_api:  # Label Studio's Test button shows predictions without storing them
            submit(ctx.redis, ctx.settings, "confirm-returned", project.to_job(), sorted(claims),
                   meta={"project": project.project}, delay_s=ctx.settings.confirm_returned_s)
        out["predictions"] = [run.predictions.get(int(t["id"])) for t in tasks]
        delivered = {"delivered": "returned"}
    else:
        delivery.post(claims, run.predictions, run.revision)
        delivered = {"delivered": "posted", "posted": delivery.count(Delivered.POSTED)}
    out["skipped"] = delivery.reasons(Delivered.SKIPPED)
    out["failures"] = delivery.reasons(Delivered.FAILED, Delivered.NOT_POSTED)
    return {**out, **delivered}


def confirm_returned(context: dict, task_ids: list[int]) -> dict:
    """Forget returned deliveries that Label Studio did not store (its Test button answers the user only), so
    the ledger counts what Label Studio holds and the next run delivers those tasks."""
    ctx, project = get_context(), ProjectContext.from_job(context)
    ledger, api = DeliveryLedger(ctx.redis, project.project, project.model_version), ctx.api(project)
    forgotten = []
    for tid in task_ids:
        entry = ledger.get(tid)
        if entry is None or entry.via != VIA_RETURNED:
            continue  # redone or replaced meanwhile
        if not api.prediction_ids(tid, project.model_version) and ledger.forget(tid, entry):
            forgotten.append(tid)
    if forgotten:
        logger.info("project %s: %d returned predictions were not stored by Label Studio (the Test button?): %s",
                    project.project, len(forgotten), forgotten)
    return {"checked": len(task_ids), "not_stored": forgotten}

