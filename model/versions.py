"""Fine-tuned model versions on disk: written atomically, never overwritten, loadable over their base."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import quiet_diffusers
from .config import DiffewSConfig
from .errors import CheckpointNotFoundError, InvalidCheckpointError
from .pipeline import DiffewS
from .tiny import TINY_RESOLUTION

VERSION_FILE = "version.json"
WEIGHTS_FILE = "unet.safetensors"
LORA_FILE = "unet_lora.safetensors"


def save_version(model: DiffewS, root: str | Path, name: str, *, base: dict, parent: str | None, mode: str,
                 summary: dict) -> Path:
    """Write a version folder: diffews_config.json, UNet weights (full) or adapters (LoRA), version.json.

    `base` says what the weights apply to: {"spec": ..., "unet": ...} or {"version": <folder>}; a relative
    version folder is read relative to `root` (so a tree of versions can move, or be mounted elsewhere).
    The folder appears complete or not at all (temp folder + rename); an existing name is an error.
    """
    from .train import trainable_state

    root = Path(root)
    final = root / name
    if final.exists():
        raise InvalidCheckpointError(f"version {final} already exists; versions are never overwritten")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(trainable_state(model, mode), tmp / (LORA_FILE if mode == "lora" else WEIGHTS_FILE))
        if mode == "lora":
            (tmp / "lora_config.json").write_text(json.dumps({"rank": _lora_rank(model)}))
        replace(model.config, trained=True, name=name).save(tmp)
        info = {"name": name, "parent": parent, "base": base, "mode": mode, "created_at": time.time(), "summary": summary}
        (tmp / VERSION_FILE).write_text(json.dumps(info, indent=2) + "\n")
        for path in tmp.iterdir():  # data on disk before the rename makes the version visible
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _lora_rank(model: DiffewS) -> int:
    config = next(iter(model.unet.peft_config.values()))
    return int(config.r)


def read_version(folder: str | Path) -> dict:
    """version.json of a version folder; InvalidCheckpointError if absent or unreadable."""
    path = Path(folder) / VERSION_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path} does not exist: not a model version folder") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidCheckpointError(f"{path}: cannot read ({exc})") from None


def load_version(folder: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DiffewS:
    """Load a version: its base (recursively for versions of versions), then its weights or adapters."""
    folder = Path(folder)
    info = read_version(folder)
    config = DiffewSConfig.load(folder)
    base = info["base"]
    if "version" in base:
        parent = folder.parent / base["version"]  # relative to the versions' root; an absolute path stays as is
        if not (parent / VERSION_FILE).is_file():
            raise CheckpointNotFoundError(f"{folder}: its base version {parent} is missing")
        model = load_version(parent, device=device, dtype=dtype)
    elif base.get("spec") == "tiny":
        model = DiffewS.tiny(resolution=config.resolution, device=device or "cpu", dtype=dtype)
    else:
        model = DiffewS.from_pretrained(base["spec"], unet=base.get("unet"), device=device, dtype=dtype)
    if info["mode"] == "lora":
        from peft.utils import set_peft_model_state_dict

        from .train import add_lora

        rank = json.loads((folder / "lora_config.json").read_text())["rank"]
        add_lora(model, rank)
        set_peft_model_state_dict(model.unet, load_file(folder / LORA_FILE))
    else:
        try:
            model.unet.load_state_dict(load_file(folder / WEIGHTS_FILE))
        except (RuntimeError, FileNotFoundError) as exc:
            raise InvalidCheckpointError(f"{folder / WEIGHTS_FILE}: does not fit the base UNet ({exc})") from None
    with quiet_diffusers():  # diffusers notes every dtype cast, even of models that keep no fp32 modules
        model.unet.to(model.device, model.dtype).eval().requires_grad_(False)
    model.config = replace(config, family=model.config.family)  # folders written before `family` existed
    model.source = str(folder)
    return model


def load_model_or_version(spec: str, *, unet: str | None = None, resolution: int | None = None,
                          device: torch.device | str | None = None) -> DiffewS:
    """A version folder, "tiny" (at `resolution`) or any spec DiffewS.from_pretrained takes."""
    if (Path(spec) / VERSION_FILE).is_file():
        model = load_version(spec, device=device)
    elif spec == "tiny":
        model = DiffewS.tiny(resolution=resolution or TINY_RESOLUTION, device=device or "cpu")
    else:
        model = DiffewS.from_pretrained(spec, unet=unet, device=device)
    if resolution and resolution != model.config.resolution:
        model.config = replace(model.config, resolution=resolution)
    return model
