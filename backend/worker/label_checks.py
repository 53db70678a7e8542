"""The label-check job: every labeled image's masks predicted from the project's other labeled images and compared
with its annotation (model.label_checks), stored for GET /projects/<id>/label-checks and the CLI, and shown in Label
Studio as the tab "DiffewS: labels to re-check"."""

from __future__ import annotations

import logging
import time

from model import check_labels

from ..core.context import ProjectContext, resolve_project
from ..core.errors import BackendError, BadRequest
from ..core.label_checks import SUSPICIOUS, save_report
from .review_view import sync_check_view
from .runtime import get_context, report_progress
from .training import load_samples

logger = logging.getLogger(__name__)


def check_project_labels(context: dict | int) -> dict:
    """Check every annotation of the project against the model's leave-one-out mask; store and summarise the report
    (annotation, task, label, IoU, suspicion, and where they disagree in percent of the image). `context` is the
    web's ProjectContext, or a project id that this worker resolves with its own settings (the CLI)."""
    ctx = get_context()
    project = (resolve_project(ctx.settings, ctx.store, context) if isinstance(context, int)
               else ProjectContext.from_job(context))
    pid = project.project
    revision = ctx.store.revision(pid)  # read first: a change during the check makes the report look older
    model = ctx.models.get(project.model_version)
    examples = sorted(ctx.store.examples(pid), key=lambda e: e.annotation_id)
    report_progress(stage="loading", images=len(examples))
    pairs = load_samples(ctx, project, examples, model.config.resolution, "label checks")
    if len(pairs) < 3:
        raise BadRequest(f"project {pid} has {len(pairs)} usable labeled images; checks need at least 3 (each is "
                         "predicted from the others)")
    started = time.monotonic()
    checks = check_labels(model, [sample for _, sample in pairs], shots=ctx.settings.max_shots,
                          on_sample=lambda done, total: report_progress(stage="checking", done=done, images=total))
    side = model.config.resolution
    rows = []
    for check in checks:
        example = pairs[check.index][0]
        box = check.region
        rows.append({
            "annotation_id": example.annotation_id, "task_id": example.task_id, "label": check.label,
            "iou": round(check.iou, 4), "below_median": round(check.gap, 4),
            "outside_share": round(1.0 - check.explained, 4), "score": round(check.score, 4),
            "suspicion": round(check.suspicion, 4), "rank_in_label": round(check.rank, 4),
            "region": None if box is None else {"x": round(100 * box.x0 / side, 2), "y": round(100 * box.y0 / side, 2),
                                                "width": round(100 * (box.x1 - box.x0) / side, 2),
                                                "height": round(100 * (box.y1 - box.y0) / side, 2)}})
    report = {"model_version": project.model_version, "revision": revision, "at": time.time(),
              "seconds": round(time.monotonic() - started, 1), "images": len(pairs), "checked": len(rows),
              "suspicious_at": SUSPICIOUS, "suspicious": sum(r["suspicion"] >= SUSPICIOUS for r in rows), "checks": rows}
    if ctx.settings.hold_suspicious_labels:  # only annotations unchanged since they were checked
        checked = {example.annotation_id: example for example, _ in pairs}
        suspects = {r["annotation_id"] for r in rows if r["suspicion"] >= SUSPICIOUS}
        unchanged = [a for a in sorted(suspects) if (now := ctx.store.get(pid, a)) is not None
                     and now.same_content(checked[a])]
        report["held"] = ctx.store.hold(pid, unchanged)
    save_report(ctx.redis, pid, report)
    summary = {k: v for k, v in report.items() if k != "checks"}
    if ctx.settings.review_view and project.has_api:
        try:
            summary.update(sync_check_view(ctx.api(project), ctx.redis, pid, report))
        except BackendError as e:  # the report is stored; the tab follows at the next check or POST .../review-view
            logger.warning("label checks of project %s: the Label Studio tab was not updated: %s", pid, e)
            summary["check_view_error"] = str(e)
    report_progress(stage="done", checked=len(rows))
    return summary
