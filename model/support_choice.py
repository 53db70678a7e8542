"""Which supports a query sees: random ones versus the most similar of the pool, on the same queries.

    python -m model.evaluate --data ../shared/data/camvid --split val --pool-split train \
        --supports random similar --pool-sizes 10 50 all --shots 1 5 --episodes 200
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from .data import Sample
from .errors import InvalidInputError
from .pipeline import DiffewS, QueryBatch
from .scoring import Tally, copy_support
from .similarity import most_similar
from .support import compose

CHOICES = ("random", "similar")
"""How an episode's supports are taken from the pool holding its class."""


@dataclass
class ChoiceResult:
    """The model and the copy-support baseline on the same episodes, for one pool size, shot count and choice."""

    shots: int
    pool_size: int
    choice: str
    episodes: int
    miou: float
    copy_miou: float
    """The copy-support baseline computed from the very supports the model saw."""
    fbiou: float
    per_class: dict[str, float] = field(default_factory=dict)
    copy_per_class: dict[str, float] = field(default_factory=dict)


def pool_order(pool: Sequence[Sample], seed: int) -> list[int]:
    """A fixed shuffle of the pool: a pool of size P is its first P images, so smaller pools nest in larger."""
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    return order


def compare_choices(model: DiffewS, samples: Sequence[Sample], pool: Sequence[Sample], classes: Sequence[str], *,
                    shots: int, pool_sizes: Sequence[int], choices: Sequence[str] = CHOICES, episode_count: int = 200,
                    seed: int = 0, progress: bool = False) -> list[ChoiceResult]:
    """For every pool size, `episode_count` episodes (class, query) drawn once with `seed` and run with each
    choice of supports; queries come from `samples`, supports from the pool's first P images holding the class.

    Every example of the pool is encoded once (per-example memories, composed per episode), and every query once.
    """
    unknown = [c for c in choices if c not in CHOICES]
    if unknown:
        raise InvalidInputError(f"support choice must be one of {', '.join(CHOICES)}, got {unknown[0]!r}")
    order = pool_order(pool, seed)
    descriptors = model.describe_images([s.image for s in pool]) if "similar" in choices else None
    queries: dict[int, QueryBatch] = {}
    results = []
    for size in pool_sizes:
        members = order[:size]
        holding = {c: [i for i in members if c in pool[i].masks and pool[i].masks[c].any()] for c in classes}
        having = {c: [i for i, s in enumerate(samples) if c in s.masks and s.masks[c].any()] for c in classes}
        eligible = [c for c in classes if len(holding[c]) >= shots and having[c]]
        if not eligible:
            continue
        rng = random.Random(seed)
        plan = [(c, rng.choice(having[c])) for c in (eligible[n % len(eligible)] for n in range(episode_count))]
        for choice in choices:
            tallies, copies = Tally(), Tally()
            picker = random.Random(seed + 1)
            for c, q in tqdm(plan, desc=f"{shots}-shot, pool {size}, {choice}", disable=not progress):
                if q not in queries:
                    queries[q] = model.encode_queries([samples[q].image])
                if choice == "random":
                    chosen = picker.sample(holding[c], shots)
                else:
                    ranked = most_similar(queries[q].descriptors[0], descriptors[holding[c]], shots)
                    chosen = [holding[c][j] for j in ranked]
                support_masks = [pool[i].masks[c] for i in chosen]
                parts = model.encode_examples([pool[i].image for i in chosen], support_masks)
                out = model.segment_encoded(queries[q], compose(parts))[0]
                truth = samples[q].masks[c]
                valid = samples[q].valid
                tallies.add(c, out.probability > out.threshold, truth, valid)
                copies.add(c, copy_support(support_masks, truth.shape), truth, valid)
            per_class, copy_per_class = tallies.per_class(), copies.per_class()
            results.append(ChoiceResult(
                shots=shots, pool_size=len(members), choice=choice, episodes=len(plan),
                miou=float(np.mean(list(per_class.values()))), copy_miou=float(np.mean(list(copy_per_class.values()))),
                fbiou=tallies.fbiou(), per_class=per_class, copy_per_class=copy_per_class))
    return results


def format_choices(results: Sequence[ChoiceResult]) -> str:
    """Markdown table: a row per shot count, pool size and choice; the model, copy-support from the same
    supports, and the difference (what the model adds to the supports' spatial prior)."""
    lines = ["| shots | pool | supports | episodes | classes | model mIoU | copy-support mIoU (same supports) | model - copy | FB-IoU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.shots} | {r.pool_size} | {r.choice} | {r.episodes} | {len(r.per_class)} | {r.miou:.2f} | "
                     f"{r.copy_miou:.2f} | {r.miou - r.copy_miou:+.2f} | {r.fbiou:.2f} |")
    return "\n".join(lines)

