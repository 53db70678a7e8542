"""Few-shot evaluation (HSNet protocol): per-class sum of intersections over sum of unions, mIoU and FB-IoU.

    python -m model.evaluate --data ../shared/data/camvid --split val --model tiny --shots 1 5 --episodes 300
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .data import Sample, load_label_map
from .errors import InvalidInputError
from .pipeline import DiffewS


@dataclass
class EvalResult:
    """Scores of one evaluation run (IoUs in percent)."""

    shots: int
    episodes: int
    miou: float
    fbiou: float
    per_class: dict[str, float] = field(default_factory=dict)
    seed: int = 0


def _having(samples: Sequence[Sample], c: str) -> list[int]:
    return [i for i, s in enumerate(samples) if c in s.masks and s.masks[c].any()]


def episodes(samples: Sequence[Sample], classes: Sequence[str], shots: int, count: int, seed: int,
             support_pool: Sequence[Sample] | None = None) -> list[tuple[str, int, list[int]]]:
    """`count` episodes (class, query, supports), classes taken in turn, images drawn with a fixed seed.

    Supports come from the same images (a class needs shots + 1 of them) or, if given, from
    `support_pool` (indices then refer to it; a class needs one query image and `shots` pool images).
    """
    rng = random.Random(seed)
    queries = {c: _having(samples, c) for c in classes}
    pool = {c: _having(support_pool, c) for c in classes} if support_pool is not None else None
    if pool is None:
        eligible = [c for c in classes if len(queries[c]) >= shots + 1]
    else:
        eligible = [c for c in classes if queries[c] and len(pool[c]) >= shots]
    if not eligible:
        raise InvalidInputError(f"no class has a query and {shots} support images: cannot build {shots}-shot episodes")
    out = []
    for n in range(count):
        c = eligible[n % len(eligible)]
        if pool is None:
            query, *supports = rng.sample(queries[c], shots + 1)
        else:
            query, supports = rng.choice(queries[c]), rng.sample(pool[c], shots)
        out.append((c, query, supports))
    return out


def evaluate(model: DiffewS, samples: Sequence[Sample], classes: Sequence[str], *, shots: int = 1,
             episode_count: int = 1000, seed: int = 0, progress: bool = False,
             support_pool: Sequence[Sample] | None = None) -> EvalResult:
    """Run few-shot episodes and score masks at the working resolution against the (nearest-resized) truth.

    With `support_pool`, queries come from `samples` and supports from the pool (held-out scoring).
    """
    if any(s.image.shape[0] != model.config.resolution for s in [*samples, *(support_pool or [])]):
        raise InvalidInputError(f"samples must be at the model's working resolution {model.config.resolution}")
    plan = episodes(samples, classes, shots, episode_count, seed, support_pool)
    pool = support_pool if support_pool is not None else samples
    inter: dict[str, int] = {}
    union: dict[str, int] = {}
    fb_i, fb_u = np.zeros(2), np.zeros(2)
    for c, query, supports in tqdm(plan, desc=f"{shots}-shot", disable=not progress):
        memory = model.encode_support([pool[i].image for i in supports], [pool[i].masks[c] for i in supports])
        out = model.segment([samples[query].image], memory)[0]
        pred = out.probability > out.threshold
        truth = samples[query].masks[c]
        valid = ~samples[query].ignore if samples[query].ignore is not None else np.ones_like(truth)
        inter[c] = inter.get(c, 0) + int((pred & truth & valid).sum())
        union[c] = union.get(c, 0) + int(((pred | truth) & valid).sum())
        for j, (p, t) in enumerate(((~pred, ~truth), (pred, truth))):  # background, foreground
            fb_i[j] += (p & t & valid).sum()
            fb_u[j] += ((p | t) & valid).sum()
    per_class = {c: 100.0 * inter[c] / union[c] if union[c] else 0.0 for c in inter}
    return EvalResult(
        shots=shots, episodes=len(plan), miou=float(np.mean(list(per_class.values()))),
        fbiou=float(100.0 * np.mean(fb_i / np.maximum(fb_u, 1))), per_class=per_class, seed=seed,
    )


def format_table(results: Sequence[EvalResult]) -> str:
    """Markdown table: one row per shot count, one column per class."""
    classes = sorted({c for r in results for c in r.per_class})
    lines = ["| shots | episodes | mIoU | FB-IoU | " + " | ".join(classes) + " |", "|" + "---|" * (4 + len(classes))]
    for r in results:
        cells = [str(r.shots), str(r.episodes), f"{r.miou:.2f}", f"{r.fbiou:.2f}"]
        cells += [f"{r.per_class[c]:.2f}" if c in r.per_class else "-" for c in classes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="label-map dataset folder (classes.txt, <split>/images, <split>/labels)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--model", default="tiny", help="model spec: tiny, a DiffewS / SD folder, a version folder")
    parser.add_argument("--unet", default=None)
    parser.add_argument("--resolution", type=int, default=None, help="working resolution (default: the model's)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images of the split")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if Path(args.data).is_file():
        parser.error(f"--data {args.data} is a file; it takes a label-map folder (classes.txt, <split>/images, "
                     "<split>/labels). A Label Studio JSON export with brush labels converts to one with: python -m "
                     f"backend labelmap --export {args.data} --images <folder of its images> --out <new folder>")
    from .versions import load_model_or_version

    model = load_model_or_version(args.model, unet=args.unet, resolution=args.resolution)
    classes, samples = load_label_map(args.data, args.split, model.config.resolution, limit=args.limit)
    print(f"seed {args.seed}; {len(samples)} images, {len(classes)} classes; model {model.describe()}", file=sys.stderr)
    results = [evaluate(model, samples, classes, shots=k, episode_count=args.episodes, seed=args.seed, progress=True)
               for k in args.shots]
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in results], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
