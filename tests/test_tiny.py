"""The tiny model's shipped weights and how they are made: synthetic episodes, matching init, pre-training."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file

from model import DiffewS
from model.config import DiffewSConfig
from model.synthetic import synthetic_episode
from model.tiny import TINY_UNET_WEIGHTS, build_tiny_components, matching_init
from model.tiny_fit import pretrain_tiny_unet


def to_uint8(picture: torch.Tensor) -> np.ndarray:
    return ((picture.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def test_synthetic_episode_shapes_and_masks():
    """Shots + 1 pictures in [-1, 1], binary masks each showing the target, reproducible from the generator."""
    images, masks = synthetic_episode(3, 32, torch.Generator().manual_seed(5))
    assert images.shape == masks.shape == (4, 3, 32, 32)
    assert images.min() >= -1 and images.max() <= 1
    assert set(masks.unique().tolist()) == {-1.0, 1.0}
    assert ((masks[:, 0] > 0).float().mean(dim=(1, 2)) > 0.01).all()
    again, _ = synthetic_episode(3, 32, torch.Generator().manual_seed(5))
    assert torch.equal(images, again)


def test_matching_init_ties_query_and_key():
    """Fresh tiny UNet: every attn1 has equal q/k projections; conv_in_ref reads the picture with conv_in's weights."""
    _, unet, _ = build_tiny_components(pretrained=False)
    attn1 = [m for n, m in unet.named_modules() if n.endswith("attn1")]
    assert attn1 and all(torch.equal(m.to_q.weight, m.to_k.weight) for m in attn1)
    assert torch.equal(unet.conv_in_ref.weight[:, :4], unet.conv_in.weight)
    assert not torch.equal(unet.conv_in_ref.weight[:, 4:], unet.conv_in.weight)
    before = unet.conv_in_ref.weight[:, 4:].clone()
    matching_init(unet)  # re-drawing the mask weights changes only those
    assert not torch.equal(before, unet.conv_in_ref.weight[:, 4:])


def test_shipped_unet_is_loaded_and_differs_from_a_fresh_one():
    """`pretrained=True` (the default) loads model/tiny_unet.safetensors; `False` gives the fresh initialisation."""
    shipped = load_file(TINY_UNET_WEIGHTS)
    _, unet, _ = build_tiny_components()
    _, fresh, _ = build_tiny_components(pretrained=False)
    for name, tensor in unet.state_dict().items():
        torch.testing.assert_close(tensor, shipped[name])
    assert not torch.equal(fresh.conv_out.weight, unet.conv_out.weight)


def synthetic_iou(unet, episodes: int = 24, size: int = 64) -> tuple[float, float]:
    """Mean 1-shot IoU on fresh synthetic episodes, and that of guessing "everything"."""
    vae, _, embeds = build_tiny_components()
    model = DiffewS(vae, unet, embeds, DiffewSConfig(trained=False, name="tiny", resolution=size), device="cpu")
    gen = torch.Generator().manual_seed(1234)
    ious, everything = [], []
    for _ in range(episodes):
        images, masks = synthetic_episode(1, size, gen)
        truth = masks[1, 0].numpy() > 0
        memory = model.encode_support([to_uint8(images[0])], [masks[0, 0].numpy() > 0])
        pred = model.segment([to_uint8(images[1])], memory)[0].mask
        ious.append((pred & truth).sum() / max(1, (pred | truth).sum()))
        everything.append(truth.mean())
    return float(np.mean(ious)), float(np.mean(everything))


def test_shipped_unet_finds_the_support_region_in_new_episodes():
    """The pre-trained tiny UNet matches query to support on unseen episodes; a fresh one does not."""
    _, shipped, _ = build_tiny_components()
    _, fresh, _ = build_tiny_components(pretrained=False)
    learned, chance = synthetic_iou(shipped)
    untrained, _ = synthetic_iou(fresh)
    assert learned > chance + 0.1 and learned > untrained + 0.1, (learned, untrained, chance)


def test_pretraining_is_seeded_and_changes_the_weights():
    """Two short runs with one seed give the same UNet; it differs from the initialisation."""
    runs = [pretrain_tiny_unet(steps=2, batch=2, size=32, max_shots=2, seed=7, progress=False) for _ in range(2)]
    _, fresh, _ = build_tiny_components(pretrained=False)
    for (name, a), b in zip(runs[0].state_dict().items(), runs[1].state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert not torch.equal(runs[0].conv_out.weight, fresh.conv_out.weight)
    assert not runs[0].training
