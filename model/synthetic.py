"""Synthetic pictures and few-shot episodes, generated on the fly, for fitting the tiny model."""

from __future__ import annotations

import math

import torch


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")


def _random_region(size: int, generator: torch.Generator) -> torch.Tensor:
    """A bool [size, size] half-plane, ellipse or rectangle at a random place."""
    yy, xx = _grid(size)
    r = torch.rand(6, generator=generator)
    if r[0] < 0.3:
        angle = float(r[5]) * 2 * math.pi
        return (xx - r[1]) * math.cos(angle) + (yy - r[2]) * math.sin(angle) > 0
    if r[0] < 0.65:
        return ((xx - r[1]) / (0.05 + 0.25 * r[3])) ** 2 + ((yy - r[2]) / (0.05 + 0.25 * r[4])) ** 2 < 1
    return ((xx - r[1]).abs() < 0.03 + 0.25 * r[3]) & ((yy - r[2]).abs() < 0.03 + 0.25 * r[4])


def synthetic_batch(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """n synthetic pictures [n, 3, size, size] in [-1, 1]: half textured scenes with shapes, half binary masks."""
    yy, xx = _grid(size)
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


def _appearances(count: int, generator: torch.Generator) -> list[tuple[torch.Tensor, float, float, float]]:
    """`count` region appearances: (colour [3], stripe amplitude, stripe frequency, stripe angle)."""
    out = []
    for _ in range(count):
        r = torch.rand(4, generator=generator)
        amplitude = 0.3 * float(r[0]) if r[1] < 0.5 else 0.0
        out.append((torch.rand(3, generator=generator) * 2 - 1, amplitude, 2 + 10 * float(r[2]), float(r[3]) * math.pi))
    return out


def _scene(looks: list, present: list[int], size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A picture [3, S, S] made of regions of the `present` classes (the first fills the rest), and its label map."""
    yy, xx = _grid(size)
    labels = torch.full((size, size), present[0], dtype=torch.long)
    for c in present[1:]:
        for _ in range(1 + int(torch.randint(0, 2, (1,), generator=generator))):
            labels[_random_region(size, generator)] = c
    image = torch.zeros(3, size, size)
    for c in present:
        colour, amplitude, frequency, angle = looks[c]
        stripes = amplitude * torch.sin(2 * math.pi * frequency * (xx * math.cos(angle) + yy * math.sin(angle)))
        jitter = 0.1 * (torch.rand(3, 1, 1, generator=generator) - 0.5)  # the same class varies a little per picture
        image = torch.where(labels == c, colour[:, None, None] + jitter + stripes, image)
    image = image + 0.05 * torch.randn(3, size, size, generator=generator)
    return image.clamp(-1, 1), labels


def synthetic_episode(shots: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A few-shot episode: pictures [shots + 1, 3, S, S] and their target masks (white on black, same shape), in [-1, 1].

    The first `shots` are supports, the last is the query. Classes are fresh random colours and stripe
    textures each episode, so the target can only be found by matching the query against the supports.
    """
    while True:
        classes = 2 + int(torch.randint(0, 3, (1,), generator=generator))
        looks = _appearances(classes, generator)
        target = int(torch.randint(0, classes, (1,), generator=generator))
        images, masks = [], []
        for _ in range(shots + 1):
            others = [c for c in torch.randperm(classes, generator=generator).tolist() if c != target]
            present = others[: 1 + int(torch.randint(0, classes - 1, (1,), generator=generator))]
            present.insert(int(torch.randint(0, len(present) + 1, (1,), generator=generator)), target)
            image, labels = _scene(looks, present, size, generator)
            images.append(image)
            masks.append((labels == target).float().mul(2).sub(1).expand(3, -1, -1))
        masks_t = torch.stack(masks)
        if bool(((masks_t[:, 0] > 0).float().mean(dim=(1, 2)) > 0.01).all()):  # every picture shows the target
            return torch.stack(images), masks_t
