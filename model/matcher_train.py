"""Fine-tuning the matcher: a projection head and the backbone's last blocks, trained episodically on accepted
labels over the rest of the backbone, frozen."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.nn.functional as F

from .data import Sample
from .errors import InvalidInputError
from .backbones import FeatureBackbone
from .matcher import Matcher, ProjectionHead, best_match, cell_indices, hypercolumn
from .train import EpisodeSampler, TrainConfig, TrainResult, validate_samples

DEFAULT_HEAD_LR = 1e-3
"""AdamW learning rate of the head when TrainConfig.lr is None."""
BLOCK_LR_RATIO = 0.1
"""The backbone's tuned blocks learn at this fraction of the head's learning rate."""
DEFAULT_TUNED_BLOCKS = 5
"""Backbone blocks trained with the head when TrainConfig.tuned_blocks is None and the backbone can train them
(EfficientNet-Lite0: its stride-32 stages, 2.2 M convolution weights; docs/matcher.md)."""


def _cell_cover(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """[h, w] share of each feature cell covered by a [R, R] bool mask."""
    return F.adaptive_avg_pool2d(torch.from_numpy(mask).float()[None, None], size)[0, 0]


class _EpisodeData:
    """The frozen part of the backbone run once on every training image (the input of its `tuned` last blocks and
    the maps tapped before them), with the masks per feature cell; with `flip`, also each image mirrored
    left-right (an episode draws each of its images either way). `backbone` is the one being trained."""

    def __init__(self, backbone: FeatureBackbone, samples: Sequence[Sample], tuned: int, device: torch.device,
                 batch_size: int = 8, flip: bool = False):
        self.backbone, self.tuned = backbone, tuned
        with torch.inference_mode():
            pixels = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float().div(255.0)
            views = [pixels, pixels.flip(-1)] if flip else [pixels]
            # per view: [hidden, map, map, ...], each [N, C, h, w] (hidden: the input of the tuned blocks)
            self.stems = [self._stem(view.to(device), batch_size) for view in views]
            probe = self.features([0])
        self.dim, size = probe.shape[1], tuple(probe.shape[-2:])
        cover = [{label: _cell_cover(mask, size) for label, mask in s.masks.items()} for s in samples]
        valid = [_cell_cover(s.valid, size) >= 0.5 for s in samples]
        self.cover, self.valid = [cover], [valid]
        if flip:
            self.cover.append([{label: c.flip(-1) for label, c in per.items()} for per in cover])
            self.valid.append([v.flip(-1) for v in valid])

    def _stem(self, pixels: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
        chunks = [self.backbone.stem_features(chunk, self.tuned) for chunk in pixels.split(batch_size)]
        return [torch.cat([c[0] for c in chunks])] + [torch.cat([c[1][j] for c in chunks])
                                                      for j in range(len(chunks[0][1]))]

    def features(self, images: Sequence[int], ways: Sequence[int] | None = None) -> torch.Tensor:
        """Backbone features [len(images), D, h, w] (Matcher.backbone_features) through the backbone's tuned blocks
        as they are now."""
        ways = ways or [0] * len(images)
        hidden, *early = (torch.stack([self.stems[w][j][i] for w, i in zip(ways, images)])
                          for j in range(len(self.stems[0])))
        late = self.backbone.tuned_features(hidden, self.tuned) if self.tuned else []
        return hypercolumn([*early, *late])

    def draw(self, images: Sequence[int], gen: torch.Generator) -> tuple[torch.Tensor, list[dict], list[torch.Tensor]]:
        """Features [len(images), D, h, w], covers and valid cells of `images`, each mirrored or not at random."""
        if len(self.stems) == 1:  # not mirrored: no draw, so the generator's stream is the one without TRAIN_AUGMENT
            ways = [0] * len(images)
        else:
            ways = torch.randint(len(self.stems), (len(images),), generator=gen).tolist()
        return (self.features(images, ways), [self.cover[w][i] for w, i in zip(ways, images)],
                [self.valid[w][i] for w, i in zip(ways, images)])


def _vectors(features: torch.Tensor, cover: torch.Tensor, limit: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background vectors (matcher.cell_indices) of projected [D, h, w] features, at most `limit`
    each, drawn at random as the matcher keeps them."""
    flat = features.flatten(1).T
    fg, bg = (flat[idx[torch.randperm(len(idx), generator=gen)[:limit]]] for idx in cell_indices(cover))
    return fg, bg


def episode_loss(model: Matcher, head: ProjectionHead, data: _EpisodeData, label: str, query: int,
                 supports: Sequence[int], gen: torch.Generator) -> torch.Tensor:
    """Binary cross-entropy of the matcher's logits on the query's cells (void and part-covered cells left out),
    with the supports matched through the trainable head (and the data's backbone, its tuned blocks trainable)."""
    features, covers, valid = data.draw([query, *supports], gen)
    projected = F.normalize(head(features), dim=1)  # [1+k, D', h, w]
    fgs, bgs = zip(*(_vectors(projected[1 + j], covers[1 + j][label], model.config.max_vectors, gen)
                     for j in range(len(supports))))
    fg, bg = torch.cat(fgs), torch.cat(bgs)
    q = projected[0].flatten(1).T  # [h*w, D']
    logit = (best_match(q, fg) - best_match(q, bg) - model.config.bias) / model.config.temperature
    cover = covers[0][label].flatten()
    keep = valid[0].flatten() & ((cover >= 0.5) | (cover == 0))
    target = (cover >= 0.5).float()
    return F.binary_cross_entropy_with_logits(logit[keep], target[keep])


def tuned_count(backbone: FeatureBackbone, config: TrainConfig, carried: int = 0) -> int:
    """How many last blocks of `backbone` a run trains: TrainConfig.tuned_blocks, or DEFAULT_TUNED_BLOCKS where the
    backbone can train them (else 0); never fewer than the `carried` ones a version already holds."""
    asked = config.tuned_blocks
    if asked is None:
        asked = DEFAULT_TUNED_BLOCKS if backbone.block_count >= DEFAULT_TUNED_BLOCKS else 0
    backbone.check_tuned(asked)
    return max(asked, carried)


def finetune_head(model: Matcher, samples: Sequence[Sample], config: TrainConfig,
                  on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train `model`'s projection head (a fresh identity head if it has none) and its backbone's last blocks
    (tuned_count) on episodes of `samples` in float32; the rest of the backbone stays frozen. `model` runs with the
    trained weights afterwards, over a copy of the backbone (a backbone it shares is never changed)."""
    validate_samples(samples)
    if any(s.image.shape[0] != model.config.resolution for s in samples):
        raise InvalidInputError(f"training samples must be at the matcher's resolution {model.config.resolution}")
    tuned = tuned_count(model.backbone, config, model.config.tuned_blocks)
    trains_blocks = config.tuned_blocks != 0 and tuned > 0
    backbone = deepcopy(model.backbone) if trains_blocks else model.backbone
    blocks = backbone.tuned_parameters(tuned) if trains_blocks else []
    sampler = EpisodeSampler(samples, config.max_shots, config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    data = _EpisodeData(backbone, samples, tuned, model.device, flip=config.augment)
    head = ProjectionHead(data.dim, data.dim) if model.head is None else model.head
    head = head.to(model.device).float().train().requires_grad_(True)
    for weight in blocks:  # batch-norm statistics stay the pretrained ones (the backbone stays in eval mode)
        weight.requires_grad_(True)
    lr = config.lr if config.lr is not None else DEFAULT_HEAD_LR
    groups = [{"params": list(head.parameters()), "lr": lr}]
    if blocks:
        groups.append({"params": blocks, "lr": lr * BLOCK_LR_RATIO})
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=config.weight_decay)
    trained_weights = [w for g in groups for w in g["params"]]
    updates = math.ceil(config.steps / config.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: max(0.0, 1.0 - u / updates))
    result = TrainResult(steps=0, images=len(samples),
                         config={**asdict(config), "lr": lr, "mode": "head", "tuned_blocks": tuned},
                         labels={label: len(idx) for label, idx in sampler.by_label.items()})
    for step in range(1, config.steps + 1):
        label, query, supports = sampler.sample()
        loss = episode_loss(model, head, data, label, query, supports, gen)
        (loss / config.grad_accum).backward()
        if step % config.grad_accum == 0 or step == config.steps:
            torch.nn.utils.clip_grad_norm_(trained_weights, config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss.item())
        result.steps = step
        if on_step is not None:
            on_step(step, result.losses[-1])
    head.eval().requires_grad_(False)
    backbone.requires_grad_(False)
    trained = model.with_head(head, replace(model.config, head_dim=data.dim, tuned_blocks=tuned), backbone=backbone)
    model.__dict__.update(trained.__dict__)
    result.weights = {k: v.detach().float().cpu().clone() for k, v in head.state_dict().items()}
    result.weights |= {k: v.detach().float().cpu().clone() for k, v in backbone.tuned_state(tuned).items()}
    return result
