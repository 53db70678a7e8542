"""Label Studio API access for the workers: tasks, annotations, predictions and authenticated downloads."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import httpx
import requests
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from ..core.context import LS_FROM_SETTINGS, ProjectContext
from ..core.errors import BackendError, ServiceUnavailable
from ..core.settings import Settings

logger = logging.getLogger(__name__)

API_TIMEOUT_S = 30
BLIP_RETRIES_S = (0.5, 1.5)
"""Pauses before the second and third try of a call that failed for a passing reason (network, 5xx, 429).
Longer outages are left to the job's own retries (backend.core.queues.RETRY_INTERVALS_S)."""

T = TypeVar("T")
ONCE = {"max_retries": 0}
"""SDK request options: the SDK would repeat 5xx answers by itself (twice), also a POST that Label Studio
stored before failing; `LabelStudioAPI.call` and `replace_prediction` decide what is repeated instead."""


class LabelStudioUnavailable(ServiceUnavailable):
    """Label Studio is down, overloaded, or refuses our credential: the same call can work later."""


class LabelStudioRefused(BackendError):
    """Label Studio answered this particular call with a client error (4xx): repeating it will not help."""

    status = 502

    def __init__(self, message: str, status_code: int):
        super().__init__(message)
        self.status_code = status_code


TASK_PAGE_SIZE = 100
"""Tasks per page when listing a project."""


@functools.lru_cache(maxsize=32)
def sdk_client(url: str, api_key: str) -> LabelStudio:
    """One SDK client per (URL, credential) in this process.

    The SDK exchanges a Personal Access Token for a short-lived access token on a client's first call and again
    only when it expires; a client per job exchanged it on every job (155 exchanges for 131 jobs).
    """
    return LabelStudio(base_url=url, api_key=api_key, timeout=API_TIMEOUT_S)


class LabelStudioAPI:
    """A thin wrapper over label-studio-sdk: it takes a Personal Access Token or a legacy token alike.

    Every call goes through `call`, which retries passing failures briefly and turns the rest into
    LabelStudioUnavailable (try later) or LabelStudioRefused (do not repeat), naming the credential on 401.
    """

    def __init__(self, url: str, api_key: str, credential: str = "LABEL_STUDIO_API_KEY"):
        self.url = url.rstrip("/")
        self.credential = credential
        self.client = sdk_client(self.url, api_key)

    @classmethod
    def for_context(cls, settings: Settings, project: dict[str, str] | None, context: ProjectContext) -> LabelStudioAPI:
        """The API of a project context: its URL with the credential its access source names."""
        if not context.has_api:
            raise ServiceUnavailable(
                "Label Studio API is not configured: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY "
                "(a Personal Access Token from Account & Settings) for the web process and every worker"
            )
        if context.ls_access == LS_FROM_SETTINGS:
            url, key, credential = settings.label_studio_url, settings.label_studio_api_key, "LABEL_STUDIO_API_KEY"
        else:
            url, key = (project or {}).get("hostname", ""), (project or {}).get("access_token", "")
            credential = "the access token Label Studio sent in /setup (set LABEL_STUDIO_API_KEY to a Personal Access Token)"
        if not key or url.rstrip("/") != context.ls_url:
            raise ServiceUnavailable(
                f"this worker has no credential for Label Studio at {context.ls_url}: give it the same "
                "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY as the web process"
            )
        if not url.startswith(("http://", "https://")):
            raise ServiceUnavailable(f"Label Studio URL {url!r} must start with http:// or https://")
        return cls(url, key, credential)

    def refused_credential(self, status: int, detail: str = "") -> LabelStudioUnavailable:
        """The error for a 401/403: which credential Label Studio refused, and what to do (the cached clients are
        dropped, so the next call exchanges the token again)."""
        sdk_client.cache_clear()
        return LabelStudioUnavailable(
            f"Label Studio at {self.url} refused {self.credential} (HTTP {status}{': ' + detail if detail else ''}); "
            "create a new Personal Access Token in Label Studio (Account & Settings) and restart the backend with it"
        )

    def call(self, what: str, fn: Callable[[], T], *, retry: bool = True) -> T:
        """Run one API call: passing failures are retried briefly (unless `retry` is False, for calls that
        may have taken effect), the rest mapped to a typed error."""
        for pause in (*BLIP_RETRIES_S, None) if retry else (None,):
            try:
                return fn()
            except ApiError as exc:
                status, detail = exc.status_code or 0, _detail(exc.body)
                if status in (401, 403):
                    raise self.refused_credential(status, detail) from None
                if status != 429 and status < 500:
                    raise LabelStudioRefused(f"Label Studio refused {what}: HTTP {status} {detail}".strip(), status) from None
                problem = f"HTTP {status} {detail}".strip()
            except (httpx.TransportError, requests.RequestException) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if pause is None:
                raise LabelStudioUnavailable(f"Label Studio at {self.url} failed while {what} ({problem})")
            logger.info("Label Studio %s failed (%s); trying again in %.1f s", what, problem, pause)
            time.sleep(pause)
        raise AssertionError("unreachable")

    def auth_headers(self) -> dict[str, str]:
        """Authorization header for plain HTTP downloads: the SDK exchanges a PAT for a fresh access token."""
        # The SDK has no public call for "the headers you would send": its token refresh (PAT -> access token,
        # renewed before expiry) lives behind the private _client_wrapper. Reusing it avoids a second refresh
        # loop; tests/test_ls_faults.py pins the legacy-token header and the end-to-end tests the PAT one
        # (image downloads from a real Label Studio), so an SDK upgrade that moves it fails there first.
        headers = self.call("refreshing the access token", self.client._client_wrapper.get_headers)
        return {"Authorization": headers["Authorization"]}

    def get(self, path_or_url: str, *, stream: bool = True, allow_redirects: bool = True) -> requests.Response:
        """GET a Label Studio path (or absolute URL on it) with auth."""
        url = path_or_url if path_or_url.startswith(("http://", "https://")) else self.url + path_or_url
        return requests.get(url, headers=self.auth_headers(), stream=stream, timeout=(5, API_TIMEOUT_S),
                            allow_redirects=allow_redirects)

    def tasks(self, project_id: int, *, only_annotated: bool = False) -> Iterator[dict]:
        """Every task of a project with its data, annotations and predictions (read in full, then yielded)."""

        def read() -> list[dict]:
            # Page by page up to the total Label Studio reports: the SDK's pager asks for one page past the last,
            # which Label Studio 1.23 answers with a logged error ("Invalid page.") and a traceback.
            tasks, page = [], 1
            while True:
                pager = self.client.tasks.list(project=project_id, fields="all", page=page, page_size=TASK_PAGE_SIZE,
                                               only_annotated=only_annotated or None, request_options=ONCE)
                items = pager.items or []
                tasks += [t.model_dump(mode="json") if hasattr(t, "model_dump") else dict(t) for t in items]
                total = getattr(pager.response, "total", None)
                if not items or len(items) < TASK_PAGE_SIZE or (total is not None and len(tasks) >= total):
                    return tasks
                page += 1

        yield from self.call(f"listing the tasks of project {project_id}", read)

    def create_prediction(self, task_id: int, result: list[dict], score: float, model_version: str,
                          project_id: int | None = None) -> int:
        """POST /api/predictions; returns the new prediction's id."""
        # Not repeated on failure: Label Studio may have stored it and failed afterwards (replace_prediction
        # repeats the whole delete-then-post instead). The project is sent too: without it Label Studio 1.23
        # logs "project_id is not set" for every prediction.
        extra = {"project": project_id} if project_id is not None else {}
        prediction = self.call(f"posting a prediction for task {task_id}", lambda: self.client.predictions.create(
            task=task_id, result=result, score=score, model_version=model_version, request_options=ONCE, **extra),
            retry=False)
        return int(prediction.id)

    def stored_predictions(self, task_id: int) -> list[tuple[int, str]]:
        """(id, model version) of every prediction Label Studio stores for a task."""
        stored = self.call(f"reading the predictions of task {task_id}",
                            lambda: list(self.client.predictions.list(task=task_id, request_options=ONCE)))
        return [(int(p.id), str(p.model_version or "")) for p in stored]

    def prediction_ids(self, task_id: int, model_version: str) -> list[int]:
        """Ids of the task's stored predictions of one model version."""
        return [pid for pid, version in self.stored_predictions(task_id) if version == model_version]

    def delete_prediction(self, prediction_id: int) -> None:
        """DELETE /api/predictions/<id>; a prediction already gone is fine."""
        try:
            self.call(f"deleting prediction {prediction_id}", lambda: self.client.predictions.delete(id=prediction_id, request_options=ONCE))
        except LabelStudioRefused as exc:
            if exc.status_code != 404:
                raise

    def replace_prediction(self, task_id: int, prediction: dict, project_id: int | None = None,
                           drop_other_versions: bool = False) -> tuple[int, set[str]]:
        """Make this the task's only prediction of its model version: delete the stored ones, then post it; with
        `drop_other_versions`, other versions' predictions of the task are deleted after the post. Returns the new
        prediction's id and the other versions whose predictions were deleted.

        Deleting first keeps at most one at every moment; a retry after a crash between the two steps, or
        after a post that was stored but answered with an error, finds none (or that one) and ends with
        exactly one again. Other versions' go only once the new one is stored: the task never shows none.
        """
        version = prediction["model_version"]
        for pause in (*BLIP_RETRIES_S, None):
            try:
                stored = self.stored_predictions(task_id)
                for stale, stale_version in stored:
                    if stale_version == version:
                        self.delete_prediction(stale)
                new_id = self.create_prediction(task_id, prediction["result"], prediction["score"], version, project_id)
                break
            except LabelStudioUnavailable:
                if pause is None:
                    raise
                time.sleep(pause)
        dropped: set[str] = set()
        if drop_other_versions:
            try:
                for old, old_version in stored:
                    if old_version != version:
                        self.delete_prediction(old)
                        dropped.add(old_version)
            except LabelStudioUnavailable as exc:  # the new one is stored; the next listing deletes the rest
                logger.warning("task %s: earlier versions' predictions not deleted yet: %s", task_id, exc.message)
        return new_id, dropped


def _detail(body: object) -> str:
    """The human part of a Label Studio error body."""
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("validation_errors") or "")[:200]
    return str(body or "")[:200]
