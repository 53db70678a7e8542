"""The review queue in Label Studio: a Data Manager view of the unlabeled tasks, weakest prediction first (and one
of the tasks whose labels the last label check found suspicious, made by the check itself).

Label Studio 1.23 scores a task (the Data Manager's "Prediction score") with the predictions whose model version is
the project's `model_version`, and keeps that equal to the ML backend's title, which must stay so for tasks to be
predicted when opened. So the view orders by our scores only while the ML backend's title is the version that
predicts: this job sets the title to it (Label Studio then moves the project's model version along), and creates
or updates the view, found again by its title.
"""

from __future__ import annotations

from urllib.parse import urlparse

from redis import Redis

from ..core.context import ProjectContext
from ..core.errors import BackendError
from ..core.keys import PREFIX
from ..core.label_checks import stored_report, suspicious_tasks
from ..core.review_view import CHECK_VIEW_MAX_TASKS, check_view_data, view_data
from .ls_client import ONCE, LabelStudioAPI
from .runtime import get_context


def sync_review_view(context: dict, backend_host: str) -> dict:
    """Title the project's ML backend (the one at `backend_host`) with the current version and create or update the
    review view, and the label-check view when a label check has run; returns what it changed."""
    ctx, project = get_context(), ProjectContext.from_job(context)
    api, pid, version = ctx.api(project), project.project, project.model_version
    backends = api.call("listing the project's ML backends",
                        lambda: list(api.client.ml.list(project=pid, request_options=ONCE)))
    ours = [b for b in backends if urlparse(b.url or "").netloc == backend_host]
    if not ours:  # Label Studio calls /setup before it saves a new ML backend: RQ retries the job shortly
        raise BackendError(f"no ML backend at {backend_host} in project {pid} yet; looking again")
    out = {"project": pid, "model_version": version, "retitled": 0}
    for ml in ours:
        if ml.title != version:
            # The whole form, as Label Studio's settings page sends it (1.23 validates it as a new connection: it
            # calls /health and /setup); the password only with basic auth (an empty one is refused).
            auth = ({"basic_auth_user": ctx.settings.basic_auth_user, "basic_auth_pass": ctx.settings.basic_auth_pass}
                    if str(ml.auth_method or "").upper().endswith("BASIC_AUTH") else {})
            api.call("naming the ML backend after the model version", lambda ml=ml: api.client.ml.update(
                ml.id, url=ml.url, project=pid, title=version, auth_method=ml.auth_method,
                is_interactive=ml.is_interactive, request_options=ONCE, **auth), retry=False)
            out["retitled"] += 1
    out["view"], out["view_action"] = upsert_view(api, ctx.redis, pid, view_data())
    report = stored_report(ctx.redis, pid)
    if report is not None:
        out.update(sync_check_view(api, ctx.redis, pid, report))
    ctx.store.set_project_field(pid, "review_view", f"{version}:{out['view']}")
    return out


def upsert_view(api: LabelStudioAPI, redis: Redis, pid: int, wanted: dict) -> tuple[int, str]:
    """Create the project's view titled `wanted["title"]`, or update it to `wanted`; (its id, what was done)."""
    with redis.lock(f"{PREFIX}:view-lock:{pid}", timeout=60, blocking_timeout=60):  # two jobs make one view
        return _upsert_view(api, pid, wanted)


def _upsert_view(api: LabelStudioAPI, pid: int, wanted: dict) -> tuple[int, str]:
    views = api.call("listing the project's views",
                     lambda: list(api.client.views.list(project=pid, request_options=ONCE)))
    mine = [v for v in views if (v.data or {}).get("title") == wanted["title"]]
    if not mine:
        view = api.call(f"creating the view {wanted['title']!r}", lambda: api.client.views.create(
            project=pid, data=wanted, request_options=ONCE), retry=False)
        return view.id, "created"
    view = mine[0]
    if {k: (view.data or {}).get(k) for k in wanted} == wanted:
        return view.id, "unchanged"
    api.call(f"updating the view {wanted['title']!r}", lambda: api.client.views.update(
        view.id, project=pid, data=wanted, request_options=ONCE))
    return view.id, "updated"


def sync_check_view(api: LabelStudioAPI, redis: Redis, pid: int, report: dict) -> dict:
    """Create or update the label-check view from a label-check report; what was done."""
    tasks = suspicious_tasks(report)
    view, action = upsert_view(api, redis, pid, check_view_data(tasks))
    return {"check_view": view, "check_view_action": action, "check_view_tasks": len(tasks[:CHECK_VIEW_MAX_TASKS])}
