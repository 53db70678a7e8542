"""Pre-labeling preview: predict a few tasks spread over the project and estimate the whole run; posts nothing."""

from __future__ import annotations

import statistics
import time

from ..core.bulk import bulk_rule, held_predictions, slim_task
from ..core.context import resolve_project
from ..core.errors import BackendError
from ..core.ledger import DeliveryLedger
from ..core.queues import QUEUE_BULK, live_workers
from .runtime import get_context, report_progress

def spread(count: int, wanted: int) -> list[int]:
    """`wanted` indices evenly spread over range(count), first and last included (all of them if fewer)."""
    if wanted >= count:
        return list(range(count))
    if wanted == 1:
        return [count // 2]
    return sorted({round(k * (count - 1) / (wanted - 1)) for k in range(wanted)})


def preview_prelabel(project_id: int, count: int) -> dict:
    """Predict `count` unlabeled tasks spread over the project (in Label Studio's order) with the current version and
    report their scores, the share of masks kept by the score thresholds, and the expected time of the whole run."""
    ctx = get_context()
    context = resolve_project(ctx.settings, ctx.store, project_id)
    if not context.has_api:
        raise BackendError("a preview lists the project's tasks through the Label Studio API: give the workers "
                           "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a Personal Access Token)")
    report_progress(stage="listing")
    unlabeled = [t for t in ctx.api(context).tasks(project_id) if not t.get("annotations")]
    held = held_predictions(unlabeled, context.model_version)
    may_take = bulk_rule(ctx.redis, context, held)  # the rule a pre-labeling run applies, without claiming
    entries = DeliveryLedger(ctx.redis, project_id, context.model_version).entries()
    to_predict = sum(1 for t in held if may_take(t, entries.get(t)))
    tasks = [slim_task(unlabeled[i], context.config.image_key) for i in spread(len(unlabeled), count)]
    report_progress(stage="predicting", tasks=len(tasks))
    started = time.perf_counter()
    run = ctx.segmenter(context).predict(project_id, tasks, context.config)
    seconds = time.perf_counter() - started
    per_task = seconds / len(tasks) if tasks else 0.0
    workers = max(1, live_workers(ctx.redis)[QUEUE_BULK])
    scores = [p["score"] for p in run.predictions.values()]
    return {
        "model_version": context.model_version, "unlabeled_tasks": len(unlabeled), "to_predict": to_predict,
        "previewed": [{"id": tid, "score": p["score"], "regions": len(p["result"]),
                       "labels": sorted({label for r in p["result"] for label in _labels(r)})}
                      for tid, p in run.predictions.items()],
        "failures": {f.task_id: f.message for f in run.failures},
        "mean_score": round(statistics.mean(scores), 4) if scores else None,
        "masks_predicted": run.masks, "masks_kept_share": round(run.kept / run.masks, 4) if run.masks else None,
        "seconds_per_task": round(per_task, 3), "bulk_workers": workers,
        "expected_s": round(per_task * to_predict / workers, 1), "posted": 0,
    }


def _labels(region: dict) -> list[str]:
    value = region.get("value") or {}
    return next((v for k, v in value.items() if k.endswith("labels") and isinstance(v, list)), [])
