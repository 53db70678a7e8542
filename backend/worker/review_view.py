"""The review queue in Label Studio: a Data Manager view of the unlabeled tasks, weakest prediction first.

Label Studio 1.23 scores a task (the Data Manager's "Prediction score") with the predictions whose model version is
the project's `model_version`, and keeps that equal to the ML backend's title, which must stay so for tasks to be
predicted when opened. So the view orders by our scores only while the ML backend's title is the version that
predicts: this job sets the title to it (Label Studio then moves the project's model version along), and creates
or updates the view, found again by its title.
"""

from __future__ import annotations

from urllib.parse import urlparse

from ..core.context import ProjectContext
from ..core.errors import BackendError
from ..core.review_view import VIEW_TITLE, view_data
from .ls_client import ONCE
from .runtime import get_context


def sync_review_view(context: dict, backend_host: str) -> dict:
    """Title the project's ML backend (the one at `backend_host`) with the current version and create or update the
    review view; returns what it changed."""
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
    views = api.call("listing the project's views", lambda: list(api.client.views.list(project=pid, request_options=ONCE)))
    mine = [v for v in views if (v.data or {}).get("title") == VIEW_TITLE]
    wanted = view_data()
    if not mine:
        view = api.call("creating the review view", lambda: api.client.views.create(
            project=pid, data=wanted, request_options=ONCE), retry=False)
        out["view"], out["view_action"] = view.id, "created"
    else:
        view = mine[0]
        current = {k: (view.data or {}).get(k) for k in wanted}
        if current != wanted:
            api.call("updating the review view", lambda: api.client.views.update(
                view.id, project=pid, data=wanted, request_options=ONCE))
        out["view"], out["view_action"] = view.id, "updated" if current != wanted else "unchanged"
    ctx.store.set_project_field(pid, "review_view", f"{version}:{out['view']}")
    return out
