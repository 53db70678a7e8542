"""Fine-tuning the matcher: a projection head over the frozen backbone, trained episodically on accepted labels."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from .data import Sample
from .errors import InvalidInputError
from .matcher import Matcher, ProjectionHead, best_match, cell_indices
from .train import EpisodeSampler, TrainConfig, TrainResult, validate_samples

DEFAULT_HEAD_LR = 1e-3
"""AdamW learning rate of the head when TrainConfig.lr is None."""


def _cell_cover(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """[h, w] share of each feature cell covered by a [R, R] bool mask."""
    return F.adaptive_avg_pool2d(torch.from_numpy(mask).float()[None, None], size)[0, 0]


class _EpisodeData:
    """The frozen backbone's features of every training image, computed once, with their masks per cell; with
    `flip`, also those of each image mirrored left-right (an episode draws each of its images either way)."""

    def __init__(self, model: Matcher, samples: Sequence[Sample], batch_size: int = 8, flip: bool = False):
        with torch.inference_mode():
            pixels = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float().div(255.0)
            views = [pixels, pixels.flip(-1)] if flip else [pixels]
            self.features = [torch.cat([model.backbone_features(chunk.to(model.device)) for chunk in view.split(batch_size)])
                             for view in views]
        size = tuple(self.features[0].shape[-2:])
        cover = [{label: _cell_cover(mask, size) for label, mask in s.masks.items()} for s in samples]
        valid = [_cell_cover(s.valid, size) >= 0.5 for s in samples]
        self.cover, self.valid = [cover], [valid]
        if flip:
            self.cover.append([{label: c.flip(-1) for label, c in per.items()} for per in cover])
            self.valid.append([v.flip(-1) for v in valid])

    def draw(self, images: Sequence[int], gen: torch.Generator) -> tuple[torch.Tensor, list[dict], list[torch.Tensor]]:
        """Features [len(images), D, h, w], covers and valid cells of `images`, each mirrored or not at random."""
        if len(self.features) == 1:  # not mirrored: no draw, so the generator's stream is the one without TRAIN_AUGMENT
            ways = [0] * len(images)
        else:
            ways = torch.randint(len(self.features), (len(images),), generator=gen).tolist()
        return (torch.stack([self.features[w][i] for w, i in zip(ways, images)]),
                [self.cover[w][i] for w, i in zip(ways, images)], [self.valid[w][i] for w, i in zip(ways, images)])


def _vectors(features: torch.Tensor, cover: torch.Tensor, limit: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background vectors (matcher.cell_indices) of projected [D, h, w] features, at most `limit`
    each, drawn at random as the matcher keeps them."""
    flat = features.flatten(1).T
    fg, bg = (flat[idx[torch.randperm(len(idx), generator=gen)[:limit]]] for idx in cell_indices(cover))
    return fg, bg


def episode_loss(model: Matcher, head: ProjectionHead, data: _EpisodeData, label: str, query: int,
                 supports: Sequence[int], gen: torch.Generator) -> torch.Tensor:
    """Binary cross-entropy of the matcher's logits on the query's cells (void and part-covered cells left out),
    with the supports matched through the trainable head."""
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


def finetune_head(model: Matcher, samples: Sequence[Sample], config: TrainConfig,
                  on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train `model`'s projection head (a fresh identity head if it has none) on episodes of `samples` in float32;
    the backbone stays frozen. `model` runs with the trained head afterwards."""
    validate_samples(samples)
    if any(s.image.shape[0] != model.config.resolution for s in samples):
        raise InvalidInputError(f"training samples must be at the matcher's resolution {model.config.resolution}")
    sampler = EpisodeSampler(samples, config.max_shots, config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    data = _EpisodeData(model, samples, flip=config.augment)
    dim = data.features[0].shape[1]
    head = ProjectionHead(dim, dim) if model.head is None else model.head
    head = head.to(model.device).float().train().requires_grad_(True)
    lr = config.lr if config.lr is not None else DEFAULT_HEAD_LR
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=config.weight_decay)
    updates = math.ceil(config.steps / config.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: max(0.0, 1.0 - u / updates))
    result = TrainResult(steps=0, images=len(samples), config={**asdict(config), "lr": lr, "mode": "head"},
                         labels={label: len(idx) for label, idx in sampler.by_label.items()})
    for step in range(1, config.steps + 1):
        label, query, supports = sampler.sample()
        loss = episode_loss(model, head, data, label, query, supports, gen)
        (loss / config.grad_accum).backward()
        if step % config.grad_accum == 0 or step == config.steps:
            torch.nn.utils.clip_grad_norm_(head.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss.item())
        result.steps = step
        if on_step is not None:
            on_step(step, result.losses[-1])
    head.eval().requires_grad_(False)
    trained = model.with_head(head)
    model.head, model.config, model.support_cache = trained.head, trained.config, trained.support_cache
    result.weights = {k: v.detach().float().cpu().clone() for k, v in head.state_dict().items()}
    return result
