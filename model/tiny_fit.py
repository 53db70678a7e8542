"""Fit the tiny model's shipped weights on synthetic data: the VAE as an autoencoder, the UNet on few-shot episodes.

    python -m model.tiny_fit vae     # writes model/tiny_vae.safetensors
    python -m model.tiny_fit unet    # writes model/tiny_unet.safetensors (uses the shipped VAE)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from tqdm import tqdm

from .attention import bank_per_sample
from .synthetic import synthetic_batch, synthetic_episode
from .tiny import TINY_UNET_WEIGHTS, TINY_VAE_CONFIG, TINY_VAE_WEIGHTS, fix_posterior_std


def fit_tiny_vae(steps: int = 1500, batch: int = 16, size: int = 64, seed: int = 0) -> AutoencoderKL:
    """Fit the tiny VAE to reconstruct synthetic scenes and masks (posterior mean, small KL weight)."""
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
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    fix_posterior_std(vae)
    return vae.eval()


def pretrain_tiny_unet(steps: int = 3000, batch: int = 8, size: int = 64, max_shots: int = 3, lr: float = 1e-3,
                       seed: int = 0, progress: bool = True) -> UNet2DConditionModel:
    """Episodic pre-training of a freshly initialised tiny UNet on synthetic episodes (the DiffewS loss).

    Batches of `batch` episodes, k ~ U{1..max_shots} shots per batch, AdamW with 100 warm-up steps,
    a constant rate, and a linear decay over the last fifth.
    """
    from .pipeline import DiffewS

    model = DiffewS.tiny(resolution=size, pretrained=False)
    gen = torch.Generator().manual_seed(seed)
    params = list(model.unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda u: min(1.0, (u + 1) / 100) * min(1.0, (steps - u) / (0.2 * steps))
    )
    model.unet.train().requires_grad_(True)
    bar = tqdm(range(steps), desc="pre-train tiny UNet", disable=not progress)
    for _ in bar:
        shots = int(torch.randint(1, max_shots + 1, (1,), generator=gen))
        episodes = [synthetic_episode(shots, size, gen) for _ in range(batch)]
        with torch.no_grad():
            images = model.encode_latents_torch(torch.cat([e[0] for e in episodes])).unflatten(0, (batch, shots + 1))
            masks = model.encode_latents_torch(torch.cat([e[1] for e in episodes])).unflatten(0, (batch, shots + 1))
        bank = model.support_kv_torch(images[:, :shots].flatten(0, 1), masks[:, :shots].flatten(0, 1))
        pred = model.predict_mask_latents_torch(images[:, shots], bank_per_sample(bank, batch))
        loss = F.mse_loss(pred, masks[:, shots])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.unet.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["vae", "unet"])
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    if args.part == "vae":
        net, path = fit_tiny_vae(**({"steps": args.steps} if args.steps else {})), TINY_VAE_WEIGHTS
    else:
        net, path = pretrain_tiny_unet(**({"steps": args.steps} if args.steps else {})), TINY_UNET_WEIGHTS
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
