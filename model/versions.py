"""Fine-tuned model versions: deltas over one shared base, written atomically, never overwritten.

A LoRA version is a peft adapter (its whole LoraConfig beside it) that is loaded onto the base's UNet
under its own name; a full version is UNet weights only. Either way the VAE, the float32 decoder and
the prompt embedding are the base's: a loaded version costs an adapter, or one UNet, never a model.
"""

from __future__ import annotations

from copy import deepcopy
import json
import os
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from .adapters import TRAIN_ADAPTER, add_adapter, adapter_key, adapter_state, trainable_state
from .config import DiffewSConfig
from .errors import CheckpointNotFoundError, InvalidCheckpointError
from .pipeline import DiffewS, forget_active_adapter
from .tiny import TINY_RESOLUTION
from .unet_weights import plain_unet_state, unet_like
from .matcher import Matcher
from .matcher_config import DEFAULT_BACKBONE, is_matcher_folder
from .version_file import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FULL_WEIGHTS,
    LEGACY_ADAPTER_CONFIG,
    LEGACY_ADAPTER_WEIGHTS,
    LEGACY_LORA,
    VersionInfo,
    file_digests,
    is_version_folder,
)


def is_matcher(model) -> bool:
    """True for the matcher, False for DiffewS."""
    return isinstance(model, Matcher)


def replace_head_config(model: Matcher, name: str) -> Matcher:
    """The matcher `model` named `name` as a version."""
    return model.with_head(model.head, replace(model.config, name=name))


def save_version(model: DiffewS, root: str | Path, name: str, *, base: dict, parent: str | None, mode: str,
                 summary: dict, project: int | None = None, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a version folder: version.json, diffews_config.json and the UNet weights (full) or the adapter (LoRA).

    `weights` are the float32 master weights of the run (TrainResult.weights); by default they are read
    from the model. `base` says what they apply to: {"spec": ..., "unet": ...} or {"version": <folder>}
    (relative to `root`, so a tree of versions can move). The folder appears complete or not at all
    (temporary folder, fsync, rename); an existing name is an error.
    """
    if is_matcher(model):
        mode = "head"
    root = Path(root)
    final = root / name
    if final.exists():
        raise InvalidCheckpointError(f"version {final} already exists; versions are never overwritten")
    info = VersionInfo(name=name, mode=mode, base=base, parent=parent, project=project, summary=summary)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if mode == "head":  # the matcher: its head, tuned blocks and config (the rest of the backbone: the base spec)
            replace_head_config(model, name).save_pretrained(tmp)
        elif mode == "lora":
            save_file(weights if weights is not None else trainable_state(model, mode), tmp / ADAPTER_WEIGHTS)
            model.unet.peft_config[model.adapter].save_pretrained(tmp)  # ADAPTER_CONFIG, the whole LoraConfig
        else:
            save_file(weights if weights is not None else trainable_state(model, mode), tmp / FULL_WEIGHTS)
        if mode != "head":
            replace(model.config, trained=True, name=name).save(tmp)
        info = replace(info, files=file_digests(tmp))  # checked at registration and at load
        info.write(tmp)
        for path in tmp.iterdir():  # data on disk before the rename makes the version visible
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_version(folder: str | Path) -> VersionInfo:
    """version.json of a version folder (typed errors if absent or unreadable)."""
    return VersionInfo.read(folder)


def version_lora_config(folder: Path, info: VersionInfo) -> LoraConfig:
    """The LoraConfig a LoRA version was trained with, as saved beside it."""
    if info.schema < 2:  # schema 1 saved the rank only; the rest were code constants of that time
        rank = int(_read_json(folder / LEGACY_ADAPTER_CONFIG)["rank"])
        return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=LEGACY_LORA["init_lora_weights"],
                          target_modules=list(LEGACY_LORA["target_modules"]))
    try:
        return LoraConfig.from_pretrained(str(folder))
    except (OSError, TypeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidCheckpointError(f"{folder / ADAPTER_CONFIG}: not a LoRA config ({exc})") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidCheckpointError(f"{path} is missing") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidCheckpointError(f"{path}: cannot read ({exc})") from None


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InvalidCheckpointError(f"{path} is missing")
    try:
        return load_file(path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for truncated or corrupted files
        raise InvalidCheckpointError(f"{path}: cannot read (truncated or corrupted?): {exc}") from None


def attach_version(host: DiffewS, folder: str | Path, info: VersionInfo | None = None) -> DiffewS:
    """A version over `host` (a loaded model of the version's base): a LoRA version becomes a named adapter on
    host's UNet, a full version a new UNet; both share host's VAE, decoder and prompt embedding."""
    folder = Path(folder)
    info = info or read_version(folder)
    info.verify_files(folder, hashes=False)  # sizes: a truncated file is named, not a safetensors error
    if (info.mode == "head") != is_matcher(host):
        kind, other = ("a matcher", "DiffewS") if info.mode == "head" else ("a DiffewS", "the matcher")
        raise InvalidCheckpointError(f"{folder} is {kind} version; it cannot run over {other} (the model this process "
                                     "serves): serve its own model family, or train a version of this one")
    if info.mode == "head":
        saved = Matcher.from_pretrained(folder, backbone=host.backbone)
        return host.with_head(saved.head, saved.config, backbone=saved.backbone)  # host's, or a copy with tuned blocks
    config = replace(DiffewSConfig.load(folder), family=host.config.family)  # folders from before `family`
    if info.mode == "lora":
        name = adapter_key(f"{info.name}_{int(info.created_at * 1000)}")  # one name per folder ever written
        if name not in getattr(host.unet, "peft_config", {}):
            weights = _load_weights(folder / (LEGACY_ADAPTER_WEIGHTS if info.schema < 2 else ADAPTER_WEIGHTS))
            try:
                add_adapter(host, version_lora_config(folder, info), name, weights)
            except (ValueError, RuntimeError, KeyError) as exc:
                raise InvalidCheckpointError(f"{folder}: its adapter does not fit the base UNet ({exc})") from None
        return DiffewS.sharing(host, adapter=name, config=config, source=str(folder))
    path = folder / FULL_WEIGHTS
    state = {k: v.to(host.dtype) for k, v in _load_weights(path).items()}
    unet = unet_like(host.unet, state, source=str(path))
    return DiffewS.sharing(host, unet=unet, config=config, source=str(folder))


def load_version(folder: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DiffewS:
    """Load a version with its base (recursively for versions of versions)."""
    folder = Path(folder)
    info = read_version(folder)
    if info.mode == "head":
        return Matcher.from_pretrained(folder, device=device or "cpu")
    config = DiffewSConfig.load(folder)
    parent = info.base_folder(folder)
    if parent is not None:
        if not is_version_folder(parent):
            raise CheckpointNotFoundError(f"{folder}: its base version {parent} is missing")
        host = load_version(parent, device=device, dtype=dtype)
    elif info.base.get("spec") == "tiny":
        host = DiffewS.tiny(resolution=config.resolution, device=device or "cpu", dtype=dtype)
    else:
        host = DiffewS.from_pretrained(info.base["spec"], unet=info.base.get("unet"), device=device, dtype=dtype)
    return attach_version(host, folder, info)


def trainable_copy(model: DiffewS, mode: str) -> DiffewS:
    """A model to fine-tune without touching `model` (which may be serving predictions meanwhile).

    "lora": a UNet that shares model's frozen weights tensor for tensor, carrying a float32 copy of model's
    adapter (if it runs with one) as TRAIN_ADAPTER. "full": a float32 copy of the UNet with model's adapter
    merged in. Both share model's VAE, decoder and prompt embedding. A matcher: the same backbone with a float32
    copy of its head (none: training starts from the identity head); training copies the backbone before it
    changes its blocks.
    """
    if is_matcher(model):
        return model.with_head(deepcopy(model.head) if model.head is not None else None)
    with model._lock:
        plain = plain_unet_state(model.unet)
        adapter = adapter_state(model, model.adapter) if model.adapter else None
        config = model.unet.peft_config[model.adapter] if model.adapter else None
        if mode == "full":
            plain = {k: v.to(torch.float32, copy=True) for k, v in plain.items()}
    copy = DiffewS.sharing(model, unet=unet_like(model.unet, plain), config=model.config,
                           dtype=torch.float32 if mode == "full" else model.dtype)
    if adapter is not None:
        add_adapter(copy, config, TRAIN_ADAPTER, adapter)
        copy.adapter = TRAIN_ADAPTER
        if mode == "full":  # the adapter becomes part of the weights being trained
            with torch.no_grad():
                copy.unet.fuse_lora(adapter_names=[TRAIN_ADAPTER])
            copy.unet.unload_lora()
            forget_active_adapter(copy.unet)
            copy.adapter = None
    return copy


def load_model_or_version(spec: str, *, unet: str | None = None, resolution: int | None = None,
                          device: torch.device | str | None = None) -> DiffewS:
    """A version folder, "tiny" (at `resolution`), "matcher" or "matcher:<backbone>", a saved matcher folder, or
    any spec DiffewS.from_pretrained takes."""
    if spec == "matcher" or spec.startswith("matcher:") or is_matcher_folder(spec):
        backbone = spec.removeprefix("matcher:") if spec.startswith("matcher:") else DEFAULT_BACKBONE
        return Matcher.from_pretrained(spec if is_matcher_folder(spec) else backbone, resolution=resolution,
                                       device=device or "cpu")
    if is_version_folder(spec):
        model = load_version(spec, device=device)
    elif spec == "tiny":
        model = DiffewS.tiny(resolution=resolution or TINY_RESOLUTION, device=device or "cpu")
    else:
        model = DiffewS.from_pretrained(spec, unet=unet, device=device)
    if resolution and resolution != model.config.resolution:
        model.config = replace(model.config, resolution=resolution)
    return model

