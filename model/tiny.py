"""A tiny DiffewS (same code path as SD 2.1, a few MB) for tests and CPU demos: configs, weights, initialisation."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from .unet_ref import add_conv_in_ref_by_surgery

TINY_CROSS_DIM = 32

TINY_RESOLUTION = 256
"""Working resolution of the tiny model unless told otherwise (16x16 latents at 128 px are too coarse for
anything but large regions; 512 is slow on a CPU for no gain, since its UNet saw 64 px synthetic episodes)."""

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


def build_tiny_components(seed: int = 0, pretrained: bool = True) -> tuple[AutoencoderKL, UNet2DConditionModel, torch.Tensor]:
    """Tiny VAE (fitted) and UNet with conv_in_ref (pretrained on synthetic episodes, or freshly initialised with
    `pretrained=False`), random prompt embedding [1, 2, 32]."""
    from safetensors.torch import load_file

    with torch.random.fork_rng(devices=[]):  # seeds the CPU generator only, restored afterwards
        torch.manual_seed(seed)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        if TINY_VAE_WEIGHTS.is_file():
            vae.load_state_dict(load_file(TINY_VAE_WEIGHTS))
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
        add_conv_in_ref_by_surgery(unet)
        matching_init(unet)
        embeds = torch.randn(1, 2, TINY_CROSS_DIM)
        if pretrained and TINY_UNET_WEIGHTS.is_file():
            unet.load_state_dict(load_file(TINY_UNET_WEIGHTS))
    return vae, unet, embeds


TINY_VAE_WEIGHTS = Path(__file__).with_name("tiny_vae.safetensors")
"""The tiny VAE fit as an autoencoder on synthetic shapes (regenerate: `python -m model.tiny_fit vae`).

A random frozen VAE cannot decode what the UNet predicts (D(E(mask)) is noise), so the tiny model
ships a small fitted VAE.
"""

TINY_UNET_WEIGHTS = Path(__file__).with_name("tiny_unet.safetensors")
"""The tiny UNet after episodic pre-training on synthetic few-shot episodes (`python -m model.tiny_fit unet`).

It stands in for what SD 2.1's pre-training gives the real model: it has learned to find the
support's region in a query by colour and texture, and has never seen a real picture.
"""

QK_GAIN = 10.0
OUT_GAIN = 4.0


def matching_init(unet: UNet2DConditionModel, qk_gain: float = QK_GAIN, out_gain: float = OUT_GAIN) -> None:
    """Initialise a fresh tiny UNet so that KV fusion can be learned from scratch.

    Every self-attention starts with equal query and key projections (scaled by `qk_gain`), so tokens
    attend to tokens of similar features, the query's to the support's included; its output projection
    is scaled by `out_gain` so what it fetches is not drowned in the residual stream; and conv_in_ref
    reads the support picture with conv_in's weights and its mask with weights of its own, so a
    support token's picture features match the query's. With the stock initialisation the tiny UNet
    learns only the label prior: on synthetic two-colour episodes (which colour is the target is shown
    only by the support), 1,000 steps of 8 episodes left it blind to the support (IoU 0.49, guessing
    everything 0.53); with this one the loss fell from 0.055 to 0.018 in 1,500 steps (IoU 0.73).
    """
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn1"):
                module.to_q.weight.mul_(qk_gain)
                module.to_k.weight.copy_(module.to_q.weight)
                module.to_out[0].weight.mul_(out_gain)
        ref, plain = unet.conv_in_ref.weight, unet.conv_in.weight
        ref[:, : plain.shape[1]] = plain
        torch.nn.init.kaiming_uniform_(ref[:, plain.shape[1] :], a=math.sqrt(5))  # nn.Conv2d's default


TINY_POSTERIOR_STD = 0.01
"""Posterior std of the tiny VAE (unscaled latents), small as in SD's VAE."""


def fix_posterior_std(vae: AutoencoderKL, std: float = TINY_POSTERIOR_STD) -> None:
    """Make the posterior std a small constant: fitting on the posterior mean never trains the logvar head,
    which would otherwise leave std near 1 and drown training targets (sampled latents) in noise."""
    latent = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[latent:] = 0
        vae.quant_conv.bias[latent:] = 2 * math.log(std)

