"""UNets built around given weights (shared or copied), and checks that weight files fit an architecture."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from .errors import InvalidCheckpointError
from .unet_ref import attach_conv_in_ref, make_conv_in_ref, quiet_diffusers


def plain_unet_state(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The UNet's own weights under their stock names, without any peft adapter (no copy is made)."""
    state = {}
    for name, value in unet.state_dict().items():
        if "lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = value.detach()
    return state


def unet_like(template: UNet2DConditionModel, state: Mapping[str, torch.Tensor], *, source: str = "") -> UNet2DConditionModel:
    """A UNet of `template`'s architecture whose parameters ARE the tensors of `state` (no copy, no random init).

    Pass copies to get an independent UNet, the same tensors to share frozen weights with `template`.
    InvalidCheckpointError names `source` and the first tensor that does not fit.
    """
    with quiet_diffusers(), torch.device("meta"):
        unet = UNet2DConditionModel.from_config(template.config)
        if "conv_in_ref.weight" in state:
            attach_conv_in_ref(unet, make_conv_in_ref(unet, state["conv_in_ref.weight"].shape[1]))
    check_state(unet, {k: tuple(v.shape) for k, v in state.items()}, source or "the given weights")
    unet.load_state_dict(dict(state), strict=True, assign=True)
    return unet


def check_state(module: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """InvalidCheckpointError naming `source` and the first missing, unexpected or mis-shaped tensor."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for name, shape in expected.items():
        if name not in shapes:
            raise InvalidCheckpointError(f"{source}: tensor {name} {list(shape)} is missing (the weights do not fit "
                                         f"the architecture of its config.json)")
        if tuple(shapes[name]) != shape:
            raise InvalidCheckpointError(f"{source}: tensor {name} is {list(shapes[name])} but the architecture of its "
                                         f"config.json needs {list(shape)}")
    for name in shapes:
        if name not in expected:
            raise InvalidCheckpointError(f"{source}: unexpected tensor {name} {list(shapes[name])}: the weights do not "
                                         "fit the architecture of its config.json")


def file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes stored in a safetensors file, read from its header (no tensor is loaded)."""
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check_folder_fits(folder: Path, model_class, weight_name: str = "diffusion_pytorch_model.safetensors",
                      ignore: tuple[str, ...] = ()) -> None:
    """Check a diffusers folder's safetensors against the architecture its config.json builds (on the meta device)."""
    path = folder / weight_name
    if not path.is_file():
        return  # other layouts (sharded, .bin) are left to diffusers' own loading
    try:
        with quiet_diffusers(), torch.device("meta"):
            module = model_class.from_config(model_class.load_config(folder))
        stored = file_shapes(path)
    except Exception as exc:  # noqa: BLE001 - safetensors and diffusers raise their own types; all mean "unreadable"
        raise InvalidCheckpointError(f"{folder}: cannot read its config.json or {weight_name} "
                                     f"(truncated or corrupted?): {exc}") from None
    shapes = {k: v for k, v in stored.items() if not k.startswith(ignore)}
    check_state(module, shapes, str(path))
