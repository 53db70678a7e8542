"""Label Studio API access for the workers: tasks, annotations, predictions and authenticated downloads."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import requests

from .context import LS_FROM_SETTINGS, ProjectContext
from .errors import ServiceUnavailable
from .settings import Settings

logger = logging.getLogger(__name__)

API_TIMEOUT_S = 30


class LabelStudioAPI:
    """A thin wrapper over label-studio-sdk: it takes a Personal Access Token or a legacy token alike."""

    def __init__(self, url: str, api_key: str):
        from label_studio_sdk import LabelStudio

        self.url = url.rstrip("/")
        self.client = LabelStudio(base_url=self.url, api_key=api_key, timeout=API_TIMEOUT_S)

    @classmethod
    def for_context(cls, settings: Settings, project: dict[str, str] | None, context: ProjectContext) -> LabelStudioAPI:
        """The API of a project context: its URL with the credential its access source names."""
        if not context.has_api:
            raise ServiceUnavailable(
                "Label Studio API is not configured: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY "
                "(a Personal Access Token from Account & Settings) for the web process and every worker"
            )
        if context.ls_access == LS_FROM_SETTINGS:
            url, key = settings.label_studio_url, settings.label_studio_api_key
        else:
            url, key = (project or {}).get("hostname", ""), (project or {}).get("access_token", "")
        if not key or url.rstrip("/") != context.ls_url:
            raise ServiceUnavailable(
                f"this worker has no credential for Label Studio at {context.ls_url}: give it the same "
                "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY as the web process"
            )
        if not url.startswith(("http://", "https://")):
            raise ServiceUnavailable(f"Label Studio URL {url!r} must start with http:// or https://")
        return cls(url, key)

    def auth_headers(self) -> dict[str, str]:
        """Authorization header for plain HTTP downloads: the SDK exchanges a PAT for a fresh access token."""
        # The SDK keeps its token refresh behind its client wrapper; reusing it avoids a second refresh loop.
        headers = self.client._client_wrapper.get_headers()
        return {"Authorization": headers["Authorization"]}

    def get(self, path_or_url: str, *, stream: bool = True, allow_redirects: bool = True) -> requests.Response:
        """GET a Label Studio path (or absolute URL on it) with auth."""
        url = path_or_url if path_or_url.startswith(("http://", "https://")) else self.url + path_or_url
        return requests.get(url, headers=self.auth_headers(), stream=stream, timeout=(5, API_TIMEOUT_S),
                            allow_redirects=allow_redirects)

    def tasks(self, project_id: int, *, only_annotated: bool = False) -> Iterator[dict]:
        """Every task of a project with its data and annotations."""
        pager = self.client.tasks.list(project=project_id, fields="all", page_size=100, only_annotated=only_annotated or None)
        for task in pager:
            yield task.model_dump(mode="json") if hasattr(task, "model_dump") else dict(task)

    def task(self, task_id: int) -> dict:
        """One task with its data."""
        task = self.client.tasks.get(id=str(task_id))
        return task.model_dump(mode="json") if hasattr(task, "model_dump") else dict(task)

    def create_prediction(self, task_id: int, result: list[dict], score: float, model_version: str) -> int:
        """POST /api/predictions; returns the new prediction's id."""
        prediction = self.client.predictions.create(task=task_id, result=result, score=score, model_version=model_version)
        return int(prediction.id)

    def prediction_ids(self, task_id: int, model_version: str) -> list[int]:
        """Ids of the task's stored predictions of one model version."""
        return [int(p.id) for p in self.client.predictions.list(task=task_id) if p.model_version == model_version]

    def delete_prediction(self, prediction_id: int) -> None:
        """DELETE /api/predictions/<id>; a prediction already gone is fine."""
        from label_studio_sdk.core.api_error import ApiError

        try:
            self.client.predictions.delete(id=prediction_id)
        except ApiError as exc:
            if exc.status_code != 404:
                raise

    def replace_prediction(self, task_id: int, prediction: dict) -> int:
        """Make this the task's only prediction of its model version: delete the stored ones, then post it.

        Deleting first keeps at most one at every moment; a retry after a crash between the two steps finds
        none (or the one it posted) and ends with exactly one again.
        """
        for stale in self.prediction_ids(task_id, prediction["model_version"]):
            self.delete_prediction(stale)
        return self.create_prediction(task_id, prediction["result"], prediction["score"], prediction["model_version"])
