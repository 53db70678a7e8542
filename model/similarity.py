"""Image descriptors from the VAE latents the model computes anyway, and the most similar examples for a query."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InvalidInputError

DESCRIPTOR_GRID = 4
"""The latent is average-pooled to a GRID x GRID layout of its 4 channels: 64 numbers per image."""


def descriptor_space(vae: torch.nn.Module, resolution: int) -> str:
    """A name for the descriptors one VAE gives at one working resolution: those of equal names compare."""
    digest = hashlib.sha256(f"{resolution}:{DESCRIPTOR_GRID}".encode())
    for layer in (vae.encoder.conv_in, getattr(vae, "quant_conv", None)):
        if layer is not None:
            digest.update(layer.weight.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def latent_descriptor(latents: torch.Tensor, grid: int = DESCRIPTOR_GRID) -> torch.Tensor:
    """[B, C, h, w] latents or feature maps -> [B, C*grid*grid] float32 CPU descriptors, centred, of unit length.

    The coarse layout of the latent (where sky, road and dark or bright masses lie) is what street scenes of
    the same kind share; centring removes the overall brightness offset, so a dot product is a correlation.
    """
    if latents.ndim != 4:
        raise InvalidInputError(f"latent_descriptor takes [B, C, h, w] latents, got shape {tuple(latents.shape)}")
    pooled = F.adaptive_avg_pool2d(latents.float(), grid).flatten(1).cpu()
    centred = pooled - pooled.mean(dim=1, keepdim=True)
    return centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-8)


def most_similar(query: torch.Tensor | np.ndarray, pool: torch.Tensor | np.ndarray, k: int) -> list[int]:
    """Indices of the k rows of `pool` [P, D] most similar to `query` [D] (correlation), best first; ties by index."""
    query_np = np.asarray(query, dtype=np.float32).reshape(-1)
    pool_np = np.asarray(pool, dtype=np.float32)
    if pool_np.ndim != 2 or pool_np.shape[1] != query_np.shape[0]:
        raise InvalidInputError(f"pool descriptors {pool_np.shape} do not match a query descriptor of {query_np.shape[0]}")
    if k < 1:
        raise InvalidInputError(f"most_similar needs k >= 1, got {k}")
    similarity = pool_np @ query_np
    order = np.lexsort((np.arange(len(similarity)), -similarity))  # highest first, then the lower index
    return [int(i) for i in order[:k]]
