"""KV-fusion self-attention (DiffewS FSA) as a diffusers attention processor."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

KVBank = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Per-layer support keys and values: layer name -> (K, V), each [1 or B, N*L, inner_dim]."""


class FusionMode(enum.Enum):
    """What every `attn1` does on the current UNet pass."""

    OFF = "off"  # plain self-attention, nothing stored (e.g. a stock SD forward)
    RECORD = "record"  # support pass: store this layer's K/V, attend to self only
    FUSE = "fuse"  # query pass: attend over cat([K_q, K_s1..K_sN])


@dataclass
class FusionState:
    """State shared by all KV-fusion processors of one UNet: the mode and the bank."""

    mode: FusionMode = FusionMode.OFF
    bank: KVBank = field(default_factory=dict)
    upcast: bool = False
    """Compute the fused attention in float32 (for fp16 weights)."""


def _shots_to_tokens(t: torch.Tensor) -> torch.Tensor:
    """[N, L, C] support tensor -> [1, N*L, C]: the N shots laid end to end on the token axis."""
    return t.reshape(1, -1, t.shape[-1])


class KVFusionAttnProcessor:
    """Self-attention whose keys/values are extended with a support set's stored keys/values.

    In RECORD mode it stores K/V of the (support) batch under its layer name and does ordinary
    self-attention; in FUSE mode the query batch attends over its own K/V concatenated with the
    stored ones, which are shared across the batch (or given per sample when their batch is B).
    """

    def __init__(self, name: str, state: FusionState):
        self.name = name
        self.state = state

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError(f"{self.name}: KV fusion is for self-attention (attn1) only")
        if attention_mask is not None:
            raise ValueError(f"{self.name}: KV fusion does not take an attention mask")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch = hidden_states.shape[0]

        query = attn.to_q(hidden_states)  # [B, L, inner]
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        mode = self.state.mode
        if mode is FusionMode.RECORD:
            self.state.bank[self.name] = (_shots_to_tokens(key), _shots_to_tokens(value))
        elif mode is FusionMode.FUSE:
            try:
                key_s, value_s = self.state.bank[self.name]
            except KeyError:
                raise KeyError(f"{self.name}: no support keys/values stored for this layer") from None
            if key_s.shape[0] not in (1, batch):
                raise ValueError(
                    f"{self.name}: support bank has batch {key_s.shape[0]}, query batch is {batch}"
                )
            key = torch.cat([key, key_s.to(key.dtype).expand(batch, -1, -1)], dim=1)
            value = torch.cat([value, value_s.to(value.dtype).expand(batch, -1, -1)], dim=1)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, heads, L, d]
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, heads, L+N*L, d]
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        dtype = query.dtype
        if self.state.upcast:  # fp16: attention logits over 4096 x 24576 tokens overflow its range
            query, key, value = query.float(), key.float(), value.float()
        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def bank_per_sample(bank: KVBank, batch: int) -> KVBank:
    """A bank recorded from `batch` samples' supports (sample-major, N shots each) -> one bank per sample.

    Recording lays all shots end to end ([1, batch*N*L, C]); this regroups them as [batch, N*L, C]
    so that each query of a batch attends to its own supports.
    """
    return {name: (k.reshape(batch, -1, k.shape[-1]), v.reshape(batch, -1, v.shape[-1])) for name, (k, v) in bank.items()}


def install_kv_fusion(unet: UNet2DConditionModel, upcast: bool = False) -> FusionState:
    """Put a KV-fusion processor on every `attn1` and AttnProcessor2_0 on everything else.

    Returns the state object the processors share; the caller sets its mode and bank. With `upcast` the
    fused self-attention is computed in float32 (for fp16 weights).
    """
    state = FusionState(upcast=upcast)
    processors = {}
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            processors[name] = KVFusionAttnProcessor(name.removesuffix(".processor"), state)
        else:
            processors[name] = AttnProcessor2_0()
    if not any(isinstance(p, KVFusionAttnProcessor) for p in processors.values()):
        raise ValueError("this UNet has no self-attention (attn1) layers to fuse")
    unet.set_attn_processor(processors)
    return state
