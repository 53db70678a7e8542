"""Model version names and what the configured model is, without loading it (the web process has no torch)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from model import MODELSCOPE_BASE, MODELSCOPE_DEFAULT_UNET, RELEASE_ID

from .settings import Settings


TINY_WARNING = (
    "DIFFEWS_MODEL is not set (or is 'tiny'): running the tiny DiffewS model, untrained on real pictures (pre-trained on "
    "synthetic shapes only). Its masks are rough colour matches until it is fine-tuned on accepted labels; "
    "point DIFFEWS_MODEL at the official weights for real use."
)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


MATCHER_NOTE = (
    "DIFFEWS_MODEL is not set: running the matcher (nearest-neighbour matching of pretrained ImageNet features), the "
    "default that segments on any CPU with nothing to download. DiffewS is the main model: on a machine with a GPU, "
    "set DIFFEWS_MODEL=zzzmmz/Diffews (the official weights, about 5 GB, downloaded once) or a folder holding them."
)


GPU_HINT = ("this machine has an NVIDIA GPU but serves the CPU default (the matcher): set DIFFEWS_MODEL=zzzmmz/Diffews "
            "(or a folder of the official weights) to serve DiffewS on it")


def gpu_visible() -> bool:
    """True when an NVIDIA GPU is visible to this process (its device node or nvidia-smi), without importing torch."""
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def uses_matcher(settings: Settings) -> bool:
    """True when the configured base model is the matcher (DIFFEWS_MODEL empty)."""
    return not settings.model_spec


def base_version(settings: Settings) -> str:
    """Version string of the configured weights, e.g. "matcher-effnet-lite0-r384", "diffews-tiny-r256-untrained"
    or "diffews-incontext"."""
    if uses_matcher(settings):
        return f"matcher-{_slug(settings.matcher_backbone.removeprefix('hf:'))}-r{settings.matcher_resolution}"
    if settings.model_spec == "tiny":
        return f"diffews-tiny-r{settings.tiny_resolution}-untrained"
    spec = Path(settings.model_spec)
    name = spec.name if spec.name not in ("", ".") else settings.model_spec
    if ((spec / "weight" / "incontext").is_dir() or settings.model_spec.lower() == RELEASE_ID.lower()) \
            and not settings.model_unet:
        name = "incontext"
    if settings.model_unet:
        unet = Path(settings.model_unet)
        name = unet.parent.name if unet.name == "unet" else unet.name  # coco_fold0 for .../coco_fold0/unet or "coco_fold0"
    resolution = f"-r{settings.resolution}" if settings.resolution else ""  # other masks than the model's own size
    return f"diffews-{_slug(name)}{resolution}"


def base_ref(settings: Settings) -> dict:
    """The configured weights as a version's version.json names its base."""
    if uses_matcher(settings):
        return {"spec": f"matcher:{settings.matcher_backbone}", "unet": None}
    return {"spec": settings.model_spec, "unet": settings.model_unet or None}


def describe_model(settings: Settings) -> dict:
    """What /health reports about the model: spec, trained or not, and a warning for the tiny model."""
    info = {"spec": settings.model_spec, "unet": settings.model_unet or None, "version": base_version(settings)}
    if uses_matcher(settings):
        info.update(family="matcher", backbone=settings.matcher_backbone, resolution=settings.matcher_resolution,
                    trained=True, note=MATCHER_NOTE)
        if gpu_visible():
            info["warning"] = GPU_HINT
        return info
    info["family"] = "diffews"
    if settings.model_spec == "tiny":
        info.update(trained=False, warning=TINY_WARNING)
        return info
    trained = _declared_trained(settings)
    info["trained"] = trained
    if not trained:
        info["warning"] = PLAIN_SD_WARNING
    return info


PLAIN_SD_WARNING = ("the configured weights are not trained for segmentation (a plain Stable Diffusion folder, whose "
                    "conv_in_ref is derived from conv_in): fine-tune on accepted labels before relying on its masks")


def _declared_trained(settings: Settings) -> bool:
    """Trained or not, from the files alone: diffews_config.json, else whether the UNet ships conv_in_ref."""
    if settings.model_spec.lower() == RELEASE_ID.lower():
        return True  # the official weights, downloaded by the worker
    spec = Path(settings.model_spec)
    base = spec / MODELSCOPE_BASE if (spec / MODELSCOPE_BASE).is_dir() else spec
    config = base / "diffews_config.json"
    if config.is_file():
        try:
            return bool(json.loads(config.read_text()).get("trained", True))
        except (OSError, ValueError):
            return True
    unet = Path(settings.model_unet) if settings.model_unet else (
        spec / MODELSCOPE_DEFAULT_UNET if base != spec else base / "unet")
    try:
        return "in_channels_ref" in json.loads((unet / "config.json").read_text())
    except (OSError, ValueError):
        return True  # a hub id or an unreadable folder: the worker's load says what it is


def current_version(settings: Settings, project: dict[str, str] | None) -> str:
    """The version a project predicts with: its pinned or promoted version, else the configured weights'."""
    project = project or {}
    return project.get("pinned_version") or project.get("active_version") or base_version(settings)
