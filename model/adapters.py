"""LoRA adapters (peft) on the DiffewS UNet: made, named, read out and put back, always in float32."""

from __future__ import annotations

import re
import warnings

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from .pipeline import DiffewS, forget_active_adapter
from .unet_weights import plain_unet_state

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
"""Attention projections that get LoRA adapters (self- and cross-attention)."""
TRAIN_ADAPTER = "finetuned"
"""The adapter name fine-tuning adds when the model runs with none."""


def lora_config(rank: int) -> LoraConfig:
    """The LoraConfig fine-tuning uses: `rank` on LORA_TARGETS, alpha = rank, gaussian init (B starts at zero)."""
    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS))


def adapter_key(version: str) -> str:
    """A version name as a peft adapter name (module keys take no dots)."""
    return "v_" + re.sub(r"\W", "_", version)


def add_adapter(model: DiffewS, config: LoraConfig, name: str, state: dict[str, torch.Tensor] | None = None) -> None:
    """Add adapter `name` to the model's UNet (weights `state`, else peft's init), in float32, frozen.

    Float32 whatever the UNet's dtype: the adapter is the trained (master) weight, and it is small.
    """
    with model._lock, warnings.catch_warnings():
        # several adapters on one UNet is the design (one per loaded version): peft's warning about it is noise
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        model.unet.add_adapter(config, adapter_name=name)
        forget_active_adapter(model.unet)
        if state is not None:
            result = set_peft_model_state_dict(model.unet, state, adapter_name=name)
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise ValueError(f"adapter weights do not fit the UNet: unexpected {unexpected[0]}")
        for param in adapter_parameters(model, name):
            param.data = param.data.float()
            param.requires_grad_(False)


def adapter_parameters(model: DiffewS, name: str) -> list[torch.nn.Parameter]:
    """The parameters of one adapter of the model's UNet."""
    return [p for n, p in model.unet.named_parameters() if "lora_" in n and f".{name}." in n]


def adapter_state(model: DiffewS, name: str) -> dict[str, torch.Tensor]:
    """An adapter's weights (float32, on the CPU), keyed as peft saves them."""
    state = get_peft_model_state_dict(model.unet, adapter_name=name)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def remove_adapter(model: DiffewS, name: str) -> None:
    """Delete an adapter from the model's UNet (a version no longer held)."""
    with model._lock:
        if name in getattr(model.unet, "peft_config", {}):
            model.unet.delete_adapters(name)
            forget_active_adapter(model.unet)


def trainable_state(model: DiffewS, mode: str) -> dict[str, torch.Tensor]:
    """What a fine-tuning run changes, in float32 on the CPU: the model's adapter, or its whole UNet."""
    if mode == "lora":
        return adapter_state(model, model.adapter)
    return {k: v.float().cpu().contiguous() for k, v in plain_unet_state(model.unet).items()}
