"""A tiny random-weight DiffewS (same code path as SD 2.1, a few MB) for tests and CPU demos."""

from __future__ import annotations

import math
from pathlib import Path

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
    """Tiny VAE (fitted, see TINY_VAE_WEIGHTS), random UNet with conv_in_ref, random embedding [1, 2, 32]."""
    with torch.random.fork_rng(devices=[]):  # seeds the CPU generator only, restored afterwards
        torch.manual_seed(seed)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        if TINY_VAE_WEIGHTS.is_file():
            from safetensors.torch import load_file

            vae.load_state_dict(load_file(TINY_VAE_WEIGHTS))
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
        add_conv_in_ref_by_surgery(unet)
        embeds = torch.randn(1, 2, TINY_CROSS_DIM)
    return vae, unet, embeds


TINY_VAE_WEIGHTS = Path(__file__).with_name("tiny_vae.safetensors")
"""The tiny VAE fit as an autoencoder on synthetic shapes (regenerate: `python -m model.tiny`).

A random frozen VAE cannot decode what the UNet predicts (D(E(mask)) is noise), so the tiny model
ships a small fitted VAE; its UNet stays random until fine-tuned.
"""


def synthetic_batch(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """n synthetic pictures [n, 3, size, size] in [-1, 1]: half textured scenes with shapes, half binary masks."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        r = torch.rand(12, generator=generator)
        shapes = torch.zeros(size, size, dtype=torch.bool)
        for _ in range(1 + int(r[0] * 3)):
            c = torch.rand(5, generator=generator)
            if c[0] < 0.5:  # ellipse
                shapes |= ((xx - c[1]) / (0.05 + 0.3 * c[3])) ** 2 + ((yy - c[2]) / (0.05 + 0.3 * c[4])) ** 2 < 1
            else:  # rectangle
                shapes |= ((xx - c[1]).abs() < 0.05 + 0.3 * c[3]) & ((yy - c[2]).abs() < 0.05 + 0.3 * c[4])
        if i % 2:  # a mask: white foreground on black, as DiffewS feeds masks
            out[i] = shapes.float().mul(2).sub(1).expand(3, -1, -1)
        else:  # a scene: gradient background, coloured shapes, noise
            bg = (r[1:4, None, None] * (1 - yy) + r[4:7, None, None] * xx) * 2 - 1
            fg = r[7:10, None, None] * 2 - 1
            img = torch.where(shapes, fg.expand(3, size, size), bg)
            out[i] = (img + 0.1 * torch.randn(3, size, size, generator=generator)).clamp(-1, 1)
    return out


def fit_tiny_vae(steps: int = 1500, batch: int = 16, size: int = 64, seed: int = 0) -> AutoencoderKL:
    """Fit the tiny VAE to reconstruct synthetic scenes and masks (posterior mean, small KL weight)."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    bar = tqdm(range(steps), desc="fit tiny VAE")
    for _ in bar:
        x = synthetic_batch(batch, size, gen)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mean).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    fix_posterior_std(vae)
    return vae.eval()


TINY_POSTERIOR_STD = 0.01
"""Posterior std of the tiny VAE (unscaled latents), small as in SD's VAE."""


def fix_posterior_std(vae: AutoencoderKL, std: float = TINY_POSTERIOR_STD) -> None:
    """Make the posterior std a small constant: fitting on the posterior mean never trains the logvar head,
    which would otherwise leave std near 1 and drown training targets (sampled latents) in noise."""
    latent = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[latent:] = 0
        vae.quant_conv.bias[latent:] = 2 * math.log(std)


if __name__ == "__main__":
    from safetensors.torch import save_file

    fitted = fit_tiny_vae()
    save_file({k: v.contiguous() for k, v in fitted.state_dict().items()}, TINY_VAE_WEIGHTS)
    print(f"wrote {TINY_VAE_WEIGHTS}")
