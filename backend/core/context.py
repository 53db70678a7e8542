"""The frozen project context: a project resolved once per request and handed to its jobs as data."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .label_config import LabelConfig, parse_label_config
from .settings import Settings
from .store import SupportStore
from .versions import current_version

LS_FROM_SETTINGS = "settings"
"""Label Studio access comes from LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY."""
LS_FROM_SETUP = "setup"
"""Label Studio access comes from the hostname and token the project's /setup sent."""


@dataclass(frozen=True)
class ProjectContext:
    """One project as a request saw it: jobs predict, label and deliver with exactly this."""

    project: int
    label_config: str
    model_version: str
    revision: int
    ls_url: str = ""
    """Label Studio of the project ("" when the backend has no API access)."""
    ls_access: str = ""
    """Where the credential for ls_url comes from: LS_FROM_SETTINGS, LS_FROM_SETUP or ""."""

    @property
    def config(self) -> LabelConfig:
        """The parsed labeling config."""
        return parse_label_config(self.label_config)

    @property
    def has_api(self) -> bool:
        """True when jobs can reach the project's Label Studio API."""
        return bool(self.ls_url and self.ls_access)

    def to_job(self) -> dict:
        """Plain data for job arguments (no objects cross the queue)."""
        return asdict(self)

    @classmethod
    def from_job(cls, data: dict) -> ProjectContext:
        """The context a job received."""
        return cls(**data)


def label_studio_access(settings: Settings, project: dict[str, str] | None) -> tuple[str, str]:
    """(url, source) of the Label Studio API a project's jobs use; ("", "") when there is none."""
    if settings.label_studio_url and settings.label_studio_api_key:
        return settings.label_studio_url.rstrip("/"), LS_FROM_SETTINGS
    project = project or {}
    if project.get("hostname") and project.get("access_token"):
        return project["hostname"].rstrip("/"), LS_FROM_SETUP
    return "", ""


def resolve_project(settings: Settings, store: SupportStore, pid: int, label_config: str | None = None) -> ProjectContext:
    """Resolve a project once: its config (registering a changed one), version, revision and LS access."""
    project = store.project(pid)
    config_xml = label_config or (project or {}).get("label_config", "")
    parse_label_config(config_xml)  # BadRequest before anything is stored
    if project is None or project.get("label_config") != config_xml:
        store.register_project(pid, config_xml)
        project = store.project(pid)
    url, access = label_studio_access(settings, project)
    return ProjectContext(project=pid, label_config=config_xml, model_version=current_version(settings, project),
                          revision=store.revision(pid), ls_url=url, ls_access=access)
