"""A tiny random-weight DiffewS (same code path as SD 2.1, a few MB) for tests and CPU demos."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from .unet_ref import add_conv_in_ref_by_surgery

TINY_CROSS_DIM = 32

TINY_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TINY_CROSS_DIM,
    attention_head_dim=2,  # diffusers reads this as the number of heads, as in SD 2.1's config
    norm_num_groups=8,
    use_linear_projection=True,
)
"""UNet with SD 2.1's block types and linear projections; self-attention at every level."""

TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 32, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)
"""VAE with SD's four levels (8x down-sampling to 4 latent channels) at a fraction of the width."""


def build_tiny_components(seed: int = 0) -> tuple[AutoencoderKL, UNet2DConditionModel, torch.Tensor]:
    """Random-weight VAE, UNet (with conv_in_ref) and empty-prompt embedding [1, 2, 32], from `seed`."""
    with torch.random.fork_rng(devices=[]):  # seeds the CPU generator only, restored afterwards
        torch.manual_seed(seed)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
        add_conv_in_ref_by_surgery(unet)
        embeds = torch.randn(1, 2, TINY_CROSS_DIM)
    return vae, unet, embeds
