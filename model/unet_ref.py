"""The extra support-input conv of DiffewS (`conv_in_ref`) on a stock diffusers UNet."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from safetensors import safe_open

from .errors import InvalidCheckpointError

REF_KEYS = ("conv_in_ref.weight", "conv_in_ref.bias")


@contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' warnings about the `in_channels_ref` key and `conv_in_ref.*` tensors it drops,
    and its note on dtype casts of models that keep no float32 modules.

    Those tensors are read and checked separately (read_ref_tensors), so the warnings are noise.
    """
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def make_conv_in_ref(unet: UNet2DConditionModel, in_channels_ref: int = 8) -> torch.nn.Conv2d:
    """A new conv shaped like `conv_in` but taking `in_channels_ref` channels (weights uninitialised)."""
    conv = unet.conv_in
    return torch.nn.Conv2d(
        in_channels_ref, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        bias=conv.bias is not None,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)


def attach_conv_in_ref(unet: UNet2DConditionModel, conv: torch.nn.Conv2d) -> None:
    """Register `conv` as `unet.conv_in_ref` and record `in_channels_ref` in the UNet's config."""
    unet.conv_in_ref = conv
    unet.register_to_config(in_channels_ref=conv.in_channels)


def add_conv_in_ref_by_surgery(unet: UNet2DConditionModel, in_channels_ref: int = 8) -> None:
    """Give a plain SD UNet its `conv_in_ref`: conv_in's weight repeated over the input groups / groups, bias copied."""
    groups, rest = divmod(in_channels_ref, unet.conv_in.in_channels)
    if rest:
        raise InvalidCheckpointError(
            f"in_channels_ref={in_channels_ref} is not a multiple of conv_in's {unet.conv_in.in_channels} channels"
        )
    conv = make_conv_in_ref(unet, in_channels_ref)
    with torch.no_grad():
        conv.weight.copy_(unet.conv_in.weight.repeat(1, groups, 1, 1) / groups)
        if conv.bias is not None:
            conv.bias.copy_(unet.conv_in.bias)
    attach_conv_in_ref(unet, conv)


def unet_weight_file(folder: Path) -> Path | None:
    """The UNet weights file in a diffusers model folder (safetensors preferred), or None."""
    for name in (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
        "diffusion_pytorch_model.bin",
    ):
        if (folder / name).is_file():
            return folder / name
    return None


def pickled_objects_message(path: Path) -> str:
    """Why a .bin holding more than tensors is refused, and what to do instead (never "weights_only=False")."""
    return (f"{path}: holds Python objects besides tensors, and such pickles can run code when loaded, so it is "
            "not loaded; use the checkpoint's .safetensors weights, or re-save the weights as safetensors where "
            "you trust the file")


def read_ref_tensors(folder: Path) -> dict[str, torch.Tensor] | None:
    """The `conv_in_ref.*` tensors of a UNet folder, or None if its weights have none.

    Stock `from_pretrained` drops these keys, so they are read here directly; `.bin` files are
    opened with `weights_only=True`, which refuses anything but tensors.
    """
    path = unet_weight_file(folder)
    if path is None:
        raise InvalidCheckpointError(
            f"{folder}: no diffusion_pytorch_model.safetensors (or .bin) next to config.json"
        )
    try:
        if path.name.endswith(".index.json"):
            weight_map = json.loads(path.read_text())["weight_map"]
            shards = {weight_map[k] for k in REF_KEYS if k in weight_map}
            found = {}
            for shard in shards:
                with safe_open(folder / shard, framework="pt") as f:
                    found.update({k: f.get_tensor(k) for k in REF_KEYS if k in f.keys()})
        elif path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                found = {k: f.get_tensor(k) for k in REF_KEYS if k in f.keys()}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            found = {k: state[k] for k in REF_KEYS if k in state}
    except pickle.UnpicklingError:
        raise InvalidCheckpointError(pickled_objects_message(path)) from None
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InvalidCheckpointError(f"{path}: cannot read UNet weights ({exc})") from None
    if not found:
        return None
    missing = [k for k in REF_KEYS if k not in found]
    if missing:
        raise InvalidCheckpointError(f"{path}: has {sorted(found)} but lacks {missing}")
    return found


def load_conv_in_ref(unet: UNet2DConditionModel, folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Attach `conv_in_ref` from checkpoint tensors, checking their shapes against the UNet."""
    weight, bias = tensors["conv_in_ref.weight"], tensors["conv_in_ref.bias"]
    declared = unet.config.get("in_channels_ref")
    conv = unet.conv_in
    expected = (conv.out_channels, declared or weight.shape[1], *conv.kernel_size)
    if weight.ndim != 4 or tuple(weight.shape) != expected or tuple(bias.shape) != (conv.out_channels,):
        raise InvalidCheckpointError(
            f"{folder}: conv_in_ref.weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not fit this UNet; "
            f"expected weight {expected} and bias ({conv.out_channels},)"
        )
    ref = make_conv_in_ref(unet, weight.shape[1])
    with torch.no_grad():
        ref.weight.copy_(weight)
        ref.bias.copy_(bias)
    attach_conv_in_ref(unet, ref)


@contextmanager
def reference_input(unet: UNet2DConditionModel) -> Iterator[None]:
    """Within the block, the UNet's input conv is `conv_in_ref` (support pass: latent + mask latent).

    The stock UNet calls `self.conv_in`; routing the support pass means pointing that attribute at
    `conv_in_ref` for the duration (no copy of the UNet code). Callers serialise passes on one UNet,
    as `DiffewS` does with its lock.
    """
    if not hasattr(unet, "conv_in_ref"):
        raise InvalidCheckpointError("this UNet has no conv_in_ref; load it through DiffewS.from_pretrained")
    original = unet.conv_in
    unet.conv_in = unet.conv_in_ref
    try:
        yield
    finally:
        unet.conv_in = original
