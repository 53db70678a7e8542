"""Few-shot evaluation (HSNet protocol): per-class sum of intersections over sum of unions, mIoU and FB-IoU.

    python -m model.evaluate --data ../shared/data/camvid --split val --model tiny --shots 1 5 --episodes 300
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data import Sample, load_label_map
from .errors import DiffewSError, InvalidInputError
from .pipeline import DiffewS
from .scoring import (BASELINES, Tally, area_agreement, contrast_score, episode_iou, margin_score, mask_agreement,
                      ranking_quality, ranking_quality_within, sharpness_score)
from .prompts import box_of_mask, point_inside, segment_box, select_components
from .support import split_tokens
from .support_choice import CHOICES, compare_choices, format_choices
from .tiny import TINY_RESOLUTION


@dataclass
class EvalResult:
    """Scores of one evaluation run of one predictor (IoUs and foreground fractions in percent)."""

    shots: int
    episodes: int
    miou: float
    fbiou: float
    per_class: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    predictor: str = "model"
    fg_predicted: float = 0.0
    """Percent of the scored query pixels predicted foreground."""
    fg_true: float = 0.0
    """Percent of the scored query pixels that are truly foreground."""
    dropped: dict[str, str] = field(default_factory=dict)
    """Classes that got no episode, with the reason (too few images for this many shots, or too few episodes)."""
    baselines: list[EvalResult] = field(default_factory=list)
    """The trivial predictors (scoring.BASELINES) on exactly the same episodes, when asked for."""
    prompted: list[EvalResult] = field(default_factory=list)
    """The model given a prompt from the truth (a box around it, or a point inside it), same episodes."""
    score_ranking: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per candidate mask score (SCORES): how well it ranks the episodes' IoUs, when asked for."""


SCORES = {
    "contrast": "mean map inside the mask minus outside (the score before margin)",
    "margin": "mean height of the map above the threshold inside the mask, over the room above it (the default)",
    "agreement": "mean IoU with the masks from two disjoint random halves of the support tokens",
    "flip": "IoU with the mask predicted for the mirrored query, mirrored back (one more query pass)",
    "sharpness": "1 - share of the mask's pixels whose map lies within 0.05 of the threshold",
    "area": "closeness of the mask's area to its supports' mean area, exp(-|log ratio|)",
    "margin x area": "margin times area",
}
"""Candidate per-mask scores for active learning, compared by `evaluate(score_ranking=True)`."""


def _having(samples: Sequence[Sample], c: str) -> list[int]:
    return [i for i, s in enumerate(samples) if c in s.masks and s.masks[c].any()]


def eligible_classes(samples: Sequence[Sample], classes: Sequence[str], shots: int,
                     support_pool: Sequence[Sample] | None = None) -> tuple[list[str], dict[str, str]]:
    """The classes that can make `shots`-shot episodes, and each other class with why it cannot."""
    eligible, dropped = [], {}
    for c in classes:
        queries = len(_having(samples, c))
        if support_pool is None:
            if queries >= shots + 1:
                eligible.append(c)
            else:
                dropped[c] = f"{queries} image{'s' * (queries != 1)} hold it; {shots}-shot needs {shots + 1}"
        else:
            pool = len(_having(support_pool, c))
            if queries and pool >= shots:
                eligible.append(c)
            else:
                dropped[c] = f"{queries} query and {pool} support images hold it; {shots}-shot needs 1 and {shots}"
    return eligible, dropped


def episodes(samples: Sequence[Sample], classes: Sequence[str], shots: int, count: int, seed: int,
             support_pool: Sequence[Sample] | None = None) -> list[tuple[str, int, list[int]]]:
    """`count` episodes (class, query, supports), classes taken in turn, images drawn with a fixed seed.

    Supports come from the same images (a class needs shots + 1 of them) or, if given, from
    `support_pool` (indices then refer to it; a class needs one query image and `shots` pool images).
    """
    rng = random.Random(seed)
    eligible, _ = eligible_classes(samples, classes, shots, support_pool)
    if not eligible:
        raise InvalidInputError(f"no class has a query and {shots} support images: cannot build {shots}-shot episodes")
    queries = {c: _having(samples, c) for c in eligible}
    pool = {c: _having(support_pool, c) for c in eligible} if support_pool is not None else None
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
             support_pool: Sequence[Sample] | None = None, baselines: bool = False,
             score_ranking: bool = False, prompt: str | None = None) -> EvalResult:
    """Run few-shot episodes and score masks at the working resolution against the (nearest-resized) truth.

    With `support_pool`, queries come from `samples` and supports from the pool (held-out scoring). With
    `baselines`, the predictors of scoring.BASELINES are scored on the same episodes (in `.baselines`). With
    `score_ranking`, each candidate of SCORES is rated on how it ranks the episodes' IoUs (two extra query
    passes per episode, for "agreement"). With `prompt` "box" (the bounding box of the true mask: the query
    is cropped to it) or "point" (one point inside the true mask: components of the model's mask are kept by
    it), the prompted model is scored too (in `.prompted`).
    """
    if prompt not in (None, "box", "point"):
        raise InvalidInputError(f"prompt must be 'box' or 'point', got {prompt!r}")
    if any(s.image.shape[0] != model.config.resolution for s in [*samples, *(support_pool or [])]):
        raise InvalidInputError(f"samples must be at the model's working resolution {model.config.resolution}")
    plan = episodes(samples, classes, shots, episode_count, seed, support_pool)
    _, dropped = eligible_classes(samples, classes, shots, support_pool)
    drawn = {c for c, _, _ in plan}
    dropped.update({c: f"no episode drawn ({episode_count} episodes, classes taken in turn)"
                    for c in classes if c not in drawn and c not in dropped})
    pool = support_pool if support_pool is not None else samples
    tallies = {"model": Tally(), **({name: Tally() for name in BASELINES} if baselines else {})}
    prompted, box_itself = Tally(), Tally()
    ranked: dict[str, list] = {name: [] for name in ("iou", "label", *SCORES)} if score_ranking else {}
    generator = torch.Generator().manual_seed(seed)
    for c, query, supports in tqdm(plan, desc=f"{shots}-shot", disable=not progress):
        support_masks = [pool[i].masks[c] for i in supports]
        memory = model.encode_support([pool[i].image for i in supports], support_masks)
        encoded = model.encode_queries([samples[query].image])
        out = model.segment_encoded(encoded, memory)[0]
        pred = out.probability > out.threshold
        truth = samples[query].masks[c]
        valid = samples[query].valid
        tallies["model"].add(c, pred, truth, valid)
        for name in BASELINES if baselines else ():
            tallies[name].add(c, BASELINES[name](support_masks, truth.shape), truth, valid)
        if prompt == "box":
            box = box_of_mask(truth & valid) or box_of_mask(truth)
            prompted.add(c, segment_box(model, samples[query].image, memory, box)[0], truth, valid)
            filled = np.zeros_like(truth)
            filled[box.y0 : box.y1, box.x0 : box.x1] = True
            box_itself.add(c, filled, truth, valid)  # what the prompt alone is worth
        elif prompt == "point":
            point = point_inside(truth & valid) or point_inside(truth)
            prompted.add(c, select_components(pred, [point]) if pred.any() else pred, truth, valid)
        if score_ranking:
            halves = [model.segment_encoded(encoded, part)[0] for part in split_tokens(memory, 2, generator)]
            mirrored = model.segment([np.ascontiguousarray(samples[query].image[:, ::-1])], memory)[0]
            ranked["iou"].append(episode_iou(pred, truth, valid))
            ranked["label"].append(c)
            ranked["contrast"].append(contrast_score(out.probability, pred))
            ranked["margin"].append(margin_score(out.probability, out.threshold, pred))
            ranked["agreement"].append(mask_agreement(pred, [h.probability > h.threshold for h in halves]))
            ranked["flip"].append(mask_agreement(pred, [(mirrored.probability > mirrored.threshold)[:, ::-1]]))
            ranked["sharpness"].append(sharpness_score(out.probability, out.threshold, pred))
            ranked["area"].append(area_agreement(pred, support_masks))
            ranked["margin x area"].append(ranked["margin"][-1] * ranked["area"][-1])

    def result(name: str, tally: Tally) -> EvalResult:
        per_class = tally.per_class()
        fg_predicted, fg_true = tally.foreground()
        return EvalResult(shots=shots, episodes=len(plan), miou=float(np.mean(list(per_class.values()))),
                          fbiou=tally.fbiou(), per_class=per_class, seed=seed, predictor=name,
                          fg_predicted=fg_predicted, fg_true=fg_true, dropped=dict(dropped))

    main_result = result("model", tallies.pop("model"))
    main_result.baselines = [result(name, tally) for name, tally in tallies.items()]
    main_result.prompted = [result(f"model + {prompt} prompt", prompted)] if prompt else []
    if prompt == "box":
        main_result.prompted.append(result("the box itself (all foreground)", box_itself))
    main_result.score_ranking = {
        name: {**ranking_quality(ranked[name], ranked["iou"]),
               **{f"{k}_within_label": v for k, v in ranking_quality_within(ranked[name], ranked["iou"],
                                                                              ranked["label"]).items()}}
        for name in SCORES} if ranked else {}
    return main_result


def episode_ious(model: DiffewS, samples: Sequence[Sample], plan: Sequence[tuple[str, int, Sequence[int]]]) -> list[float]:
    """The IoU (over valid pixels, 0..1) of the model's mask in each planned episode: (label, query index,
    support indices), all indices into `samples` at the model's working resolution."""
    out = []
    for label, query, supports in plan:
        memory = model.encode_support([samples[i].image for i in supports], [samples[i].masks[label] for i in supports])
        result = model.segment_encoded(model.encode_queries([samples[query].image]), memory)[0]
        truth = samples[query].masks[label]
        valid = samples[query].valid
        out.append(episode_iou(result.probability > result.threshold, truth, valid))
    return out


def format_score_ranking(results: Sequence[EvalResult]) -> str:
    """Markdown table: per shot count and candidate score, Spearman with IoU and AUROC for IoU < 0.5, over all
    episodes and within each label (averaged over labels: what sorting one label's masks by score gives)."""
    lines = ["| shots | score | Spearman with IoU | AUROC, IoU < 0.5 | Spearman within label | AUROC within label | "
             "episodes with IoU < 0.5 |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for name, q in r.score_ranking.items():
            lines.append(f"| {r.shots} | {name} | {q['spearman']:.3f} | {q['auroc']:.3f} | {q['spearman_within_label']:.3f} "
                         f"| {q['auroc_within_label']:.3f} | {100 * q['bad_share']:.0f} % |")
    return "\n".join(lines)


def common_classes(results: Sequence[EvalResult]) -> list[str]:
    """The classes every result scored (so that 1-shot and 5-shot mIoU can be compared)."""
    sets = [set(r.per_class) for r in results]
    return sorted(set.intersection(*sets)) if sets else []


def common_miou(result: EvalResult, classes: Sequence[str]) -> float:
    """mIoU over `classes` only."""
    return float(np.mean([result.per_class[c] for c in classes])) if classes else float("nan")


def format_table(results: Sequence[EvalResult]) -> str:
    """Markdown table: a row per shot count and predictor (the model, then its baselines), a column per
    class; then the dropped classes of each shot count."""
    rows = [row for r in results for row in (r, *r.prompted, *r.baselines)]
    classes = sorted({c for r in rows for c in r.per_class})
    common = common_classes(results)
    header = ["shots", "predictor", "episodes", "mIoU", f"mIoU on {len(common)} common", "FB-IoU",
              "fg predicted %", "fg true %", *classes]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r.shots), r.predictor, str(r.episodes), f"{r.miou:.2f}", f"{common_miou(r, common):.2f}",
                 f"{r.fbiou:.2f}", f"{r.fg_predicted:.1f}", f"{r.fg_true:.1f}"]
        cells += [f"{r.per_class[c]:.2f}" if c in r.per_class else "-" for c in classes]
        lines.append("| " + " | ".join(cells) + " |")
    for r in results:
        if r.dropped:
            lines.append(f"\n{r.shots}-shot dropped: " + "; ".join(f"{c} ({why})" for c, why in r.dropped.items()))
    return "\n".join(lines)


class UsageError(Exception):
    """A bad command-line argument: printed as one line, exit status 2."""


def _check_arguments(args: argparse.Namespace) -> None:
    if min(args.shots) < 1:
        raise UsageError(f"--shots must be at least 1, got {min(args.shots)}")
    if args.episodes < 1:
        raise UsageError(f"--episodes must be at least 1, got {args.episodes}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise UsageError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.supports:
        if args.pool_split == args.split:
            raise UsageError(f"--pool-split {args.pool_split} is the query split: supports must come from other images")
        if not all(size == "all" or (size.isdigit() and int(size) >= 1) for size in args.pool_sizes):
            raise UsageError(f"--pool-sizes takes positive numbers or all, got {' '.join(args.pool_sizes)}")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise UsageError(f"--json {args.json}: its folder does not exist")
    data = Path(args.data)
    if data.is_file():
        raise UsageError(f"--data {args.data} is a file; it takes a label-map folder (classes.txt, <split>/images, "
                         "<split>/labels). A Label Studio JSON export with brush labels converts to one with: python -m "
                         f"backend labelmap --export {args.data} --images <folder of its images> --out <new folder>")
    if not data.is_dir():
        raise UsageError(f"--data {args.data}: no such folder")
    if not (data / "classes.txt").is_file():
        raise UsageError(f"--data {args.data}: classes.txt is missing (a label-map folder has classes.txt, "
                         "<split>/images, <split>/labels)")
    if not (data / args.split / "images").is_dir():
        splits = sorted(p.name for p in data.iterdir() if (p / "images").is_dir())
        raise UsageError(f"--split {args.split}: no such split in {args.data}; it has: {', '.join(splits) or 'none'}")


def _check_shots(samples: Sequence[Sample], classes: Sequence[str], shots: Sequence[int], split: str) -> None:
    for k in shots:
        if not eligible_classes(samples, classes, k)[0]:
            most = max(((len(_having(samples, c)), c) for c in classes), default=(0, "none"))
            raise UsageError(f"--shots {k}: needs a class held by {k + 1} images of split {split}; the most is "
                             f"{most[0]} ({most[1]})")


def estimate_seconds(model: DiffewS, samples: Sequence[Sample], classes: Sequence[str], shots: int,
                     episode_count: int, seed: int, **options) -> float:
    """Expected seconds for `episode_count` episodes of evaluate(**options): one warm-up episode, then one timed."""
    for _ in range(2):
        start = time.perf_counter()
        evaluate(model, samples, classes, shots=shots, episode_count=1, seed=seed, **options)
        seconds = time.perf_counter() - start
    return seconds * episode_count


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="label-map dataset folder (classes.txt, <split>/images, <split>/labels)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--model", default="tiny", help="model spec: tiny, a DiffewS / SD folder, a version folder")
    parser.add_argument("--unet", default=None)
    parser.add_argument("--resolution", type=int, default=None,
                        help=f"working resolution (default: the model's; {TINY_RESOLUTION} for tiny)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images of the split")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="leave out the copy-support, all-foreground and empty predictors")
    parser.add_argument("--prompt", choices=["box", "point"], default=None,
                        help="also score the model given the true mask's bounding box (the query cropped to it) or "
                             "one point inside it (the components under it kept), on the same episodes")
    parser.add_argument("--score-ranking", action="store_true",
                        help="also rate candidate mask scores on how they rank errors (Spearman, AUROC for IoU < 0.5)")
    parser.add_argument("--supports", nargs="+", choices=list(CHOICES), default=None,
                        help="compare how supports are chosen from a pool (--pool-split): random, or the most similar "
                             "to each query; same queries and pool for each, copy-support from the same supports")
    parser.add_argument("--pool-split", default="train", help="with --supports: the split supports come from")
    parser.add_argument("--pool-sizes", nargs="+", default=["10", "50", "all"],
                        help="with --supports: pool sizes (the first P images of a fixed shuffle), or all")
    parser.add_argument("--json", default=None, help="write the results here as JSON (after each shot setting)")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from .versions import load_model_or_version

    _check_arguments(args)
    try:
        model = load_model_or_version(args.model, unet=args.unet, resolution=args.resolution)
    except DiffewSError as exc:
        raise UsageError(f"--model {args.model}: {exc}") from None
    try:
        classes, samples = load_label_map(args.data, args.split, model.config.resolution, limit=args.limit)
    except InvalidInputError as exc:
        raise UsageError(f"--data {args.data}: {exc}") from None
    if args.supports:
        return _run_support_choices(args, model, classes, samples)
    _check_shots(samples, classes, args.shots, args.split)
    print(f"seed {args.seed}; {len(samples)} images, {len(classes)} classes; model {model.describe()}", file=sys.stderr)
    expected = {}
    for k in args.shots:
        try:
            expected[k] = estimate_seconds(model, samples, classes, k, args.episodes, args.seed,
                                           score_ranking=args.score_ranking, prompt=args.prompt)
        except DiffewSError as exc:
            raise UsageError(f"--shots {k}: {exc}") from None
    print(f"expected run time: about {_duration(sum(expected.values()))} ("
          + ", ".join(f"{k}-shot {_duration(t)}" for k, t in expected.items()) + ")", file=sys.stderr, flush=True)
    results = []
    for k in args.shots:
        try:
            results.append(evaluate(model, samples, classes, shots=k, episode_count=args.episodes, seed=args.seed,
                                    progress=True, baselines=args.baselines, score_ranking=args.score_ranking,
                                    prompt=args.prompt))
        except DiffewSError as exc:
            kept = f"; {args.json} keeps the finished settings" if args.json and results else ""
            raise UsageError(f"--shots {k}: {exc}{kept}") from None
        print(format_table(results[-1:]), flush=True)
        if args.score_ranking:
            print("\n" + format_score_ranking(results[-1:]), flush=True)
        if args.json:  # each finished setting is on disk before the next starts
            Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    if len(results) > 1:
        print("\nall settings:\n" + format_table(results))
        if args.score_ranking:
            print("\n" + format_score_ranking(results))
    return 0


def _run_support_choices(args: argparse.Namespace, model: DiffewS, classes: list[str], samples: list) -> int:
    try:
        _, pool = load_label_map(args.data, args.pool_split, model.config.resolution)
    except InvalidInputError as exc:
        raise UsageError(f"--pool-split {args.pool_split}: {exc}") from None
    sizes = [len(pool) if size == "all" else min(int(size), len(pool)) for size in args.pool_sizes]
    print(f"seed {args.seed}; {len(samples)} queries, pool of {len(pool)} ({args.pool_split}); "
          f"model {model.describe()}", file=sys.stderr)
    results = []
    for k in args.shots:
        found = compare_choices(model, samples, pool, classes, shots=k, pool_sizes=sizes, choices=args.supports,
                                episode_count=args.episodes, seed=args.seed, progress=True)
        if not found:
            raise UsageError(f"--shots {k}: no class has {k} images in any pool of {', '.join(map(str, sizes))}")
        results += found
        print(format_choices(found), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    if len(args.shots) > 1:
        print("\nall settings:\n" + format_choices(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
