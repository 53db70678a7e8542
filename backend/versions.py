"""Model version names and what the configured model is, without loading it (the web process has no torch)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .settings import Settings

TINY_WARNING = (
    "DIFFEWS_MODEL is not set (or is 'tiny'): running the tiny DiffewS model, untrained on real pictures (pre-trained on "
    "synthetic shapes only). Its masks are rough colour matches until it is fine-tuned on accepted labels; "
    "point DIFFEWS_MODEL at the official weights for real use."
)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def base_version(settings: Settings) -> str:
    """Version string of the configured weights, e.g. "diffews-tiny-untrained" or "diffews-incontext"."""
    if settings.model_spec == "tiny":
        return f"diffews-tiny-r{settings.tiny_resolution}-untrained"
    spec = Path(settings.model_spec)
    name = spec.name if spec.name not in ("", ".") else settings.model_spec
    if (spec / "weight" / "incontext").is_dir() and not settings.model_unet:
        name = "incontext"
    if settings.model_unet:
        unet = Path(settings.model_unet)
        name = unet.parent.name if unet.name == "unet" else unet.name
    return f"diffews-{_slug(name)}"


def version_name(base: str, pid: int, n: int) -> str:
    """Name of a project's n-th fine-tuned version over `base`, e.g. "diffews-incontext-p3-v2"."""
    return f"{base}-p{pid}-v{n}"


def describe_model(settings: Settings) -> dict:
    """What /health reports about the model: spec, trained or not, and a warning for the tiny model."""
    info = {"spec": settings.model_spec, "unet": settings.model_unet or None, "version": base_version(settings)}
    if settings.model_spec == "tiny":
        info.update(trained=False, warning=TINY_WARNING)
        return info
    config = Path(settings.model_spec) / "diffews_config.json"
    trained = True
    if config.is_file():
        try:
            trained = bool(json.loads(config.read_text()).get("trained", True))
        except (OSError, ValueError):
            pass
    info["trained"] = trained
    return info


def current_version(settings: Settings, project: dict[str, str] | None) -> str:
    """The version a project predicts with: its pinned or promoted version, else the configured weights'."""
    project = project or {}
    return project.get("pinned_version") or project.get("active_version") or base_version(settings)
