"""The Data Manager views the backend keeps in Label Studio (weakest predictions first; labels to re-check), and when
the web asks a worker to create or update them (backend.worker.review_view)."""

from __future__ import annotations

from .catalog import submit
from .context import ProjectContext
from .keys import PREFIX
from .services import Backend

VIEW_TITLE = "DiffewS: weakest predictions first"
"""The Data Manager tab's title (how the backend finds its view again)."""


def view_data() -> dict:
    """The view: unlabeled tasks that hold a prediction, lowest prediction score first."""
    return {"title": VIEW_TITLE,
            "filters": {"conjunction": "and", "items": [
                {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0},
                {"filter": "filter:tasks:total_predictions", "operator": "greater", "type": "Number", "value": 0}]},
            "ordering": ["tasks:predictions_score"]}


CHECK_VIEW_TITLE = "DiffewS: labels to re-check"
"""The label-check tab's title."""

CHECK_VIEW_MAX_TASKS = 100
"""The label-check tab lists at most this many tasks, the most suspicious (the report lists them all)."""


def check_view_data(task_ids: list[int]) -> dict:
    """The label-check view: the tasks whose annotations the last label check found suspicious (Label Studio cannot
    order by our suspicion, so they are listed by task id; no suspicious task: a filter no task matches)."""
    ids = task_ids[:CHECK_VIEW_MAX_TASKS] or [0]
    return {"title": CHECK_VIEW_TITLE,
            "filters": {"conjunction": "or", "items": [
                {"filter": "filter:tasks:id", "operator": "equal", "type": "Number", "value": tid} for tid in ids]},
            "ordering": ["tasks:id"]}


def queue_review_view(backend: Backend, context: ProjectContext, backend_host: str, *, force: bool = False) -> str | None:
    """Queue the view's job when the project's view was not made for its current version (at most once a minute),
    or when `force`d; the job id, or None when nothing was queued."""
    pid = context.project
    if not (backend.settings.review_view and context.has_api):
        return None
    made_for = (backend.store.project(pid) or {}).get("review_view", "")
    if not force and made_for.split(":")[0] == context.model_version:
        return None
    if not force and not backend.redis.set(f"{PREFIX}:review-view-check:{pid}:{context.model_version}", 1, nx=True, ex=60):
        return None
    return submit(backend.redis, backend.settings, "review-view", context.to_job(), backend_host,
                  meta={"project": pid}).id
