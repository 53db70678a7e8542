"""Per-label score thresholds on CamVid: which masks to leave out of a prediction so that the annotator corrects the
fewest pixels, chosen on train-split episodes and reported on val-split episodes.

    python -m bench.bench_thresholds --shots 5 --episodes 300 --resolution 384

Cost model (pixels an annotator changes): a kept mask costs the pixels where it differs from the truth (erase what is
wrong, paint what is missing); a mask left out costs the truth's pixels (painted from nothing). A threshold t keeps a
mask when its score >= t. Rows: every mask kept (t = 0), one threshold for every label (the backend's default
MASK_MIN_SCORE), a threshold per label (what MASK_MIN_SCORES overrides), and copy-support with every mask kept (the
query-blind baseline), all on the same val episodes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model.data import load_label_map
from model.evaluate import episodes
from model.matcher import Matcher
from model.scoring import copy_support

from .scenarios import Row, matcher_on_camvid, print_table, write_csv

GRID = np.round(np.arange(0.0, 1.0001, 0.01), 2)


@dataclass
class Episode:
    """One predicted mask against its truth: score, pixel counts and the copy-support baseline's error."""

    label: str
    score: float
    inter: int
    union: int
    truth_px: int
    error_px: int
    copy_error_px: int


def run_episodes(model: Matcher, samples: list, classes: list[str], shots: int, count: int, seed: int, what: str) -> list[Episode]:
    """The model's mask, score and pixel counts on `count` few-shot episodes."""
    out = []
    for label, query, supports in tqdm(episodes(samples, classes, shots, count, seed), desc=what):
        memory = model.encode_support([samples[i].image for i in supports], [samples[i].masks[label] for i in supports])
        result = model.segment_encoded(model.encode_queries([samples[query].image]), memory)[0]
        pred = result.probability > result.threshold
        truth, valid = samples[query].masks[label], samples[query].valid
        copied = copy_support([samples[i].masks[label] for i in supports], truth.shape)
        out.append(Episode(label, float(result.score) if pred.any() else 0.0, int((pred & truth & valid).sum()),
                           int(((pred | truth) & valid).sum()), int((truth & valid).sum()),
                           int(((pred ^ truth) & valid).sum()), int(((copied ^ truth) & valid).sum())))
    return out


def cost(eps: list[Episode], threshold: float) -> int:
    """Pixels to correct when masks scoring below `threshold` are left out."""
    return sum(e.error_px if e.score >= threshold else e.truth_px for e in eps)


def best_threshold(eps: list[Episode]) -> float:
    """The grid threshold with the fewest pixels to correct (the lowest among equals)."""
    costs = [cost(eps, t) for t in GRID]
    return float(GRID[int(np.argmin(costs))])


def figures(eps: list[Episode], thresholds: dict[str, float], every_px: int) -> dict[str, str]:
    """Share kept, mean IoU of the kept masks, per-class IoU of what the annotator starts from, pixels to correct."""
    kept = [e for e in eps if e.score >= thresholds.get(e.label, 0.0)]
    total = sum(e.error_px if e in kept else e.truth_px for e in eps)
    ious = [e.inter / e.union for e in kept if e.union]
    return {"masks kept": f"{len(kept) / len(eps):.1%}", "mean IoU of kept": f"{100 * float(np.mean(ious)):.1f}" if ious else "-",
            "pixels to correct (M)": f"{total / 1e6:.2f}", "vs keeping all": f"{total / every_px - 1:+.1%}"}


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    matcher_on_camvid(parser, "bench/results/thresholds.csv")
    args = parser.parse_args(argv)
    model = Matcher.from_pretrained(args.backbone, resolution=args.resolution)
    classes, train = load_label_map(args.data, "train", args.resolution)
    _, val = load_label_map(args.data, "val", args.resolution)
    fit = run_episodes(model, train, classes, args.shots, args.episodes, args.seed, "train episodes (choose)")
    test = run_episodes(model, val, classes, args.shots, args.episodes, args.seed, "val episodes (report)")
    one = best_threshold(fit)
    per_label = {c: best_threshold([e for e in fit if e.label == c]) for c in sorted({e.label for e in fit})}
    every_px = cost(test, 0.0)
    params = {"shots": args.shots, "episodes": len(test)}
    rows = [Row("matcher, every mask kept", params, figures(test, {}, every_px)),
            Row(f"matcher, one threshold {one:.2f}", params, figures(test, {c: one for c in classes}, every_px)),
            Row("matcher, per-label thresholds", params, figures(test, per_label, every_px))]
    copy_px = sum(e.copy_error_px for e in test)
    rows.append(Row("copy support, every mask kept", params, {"masks kept": "100.0%", "mean IoU of kept": "-",
                                                             "pixels to correct (M)": f"{copy_px / 1e6:.2f}",
                                                             "vs keeping all": f"{copy_px / every_px - 1:+.1%}"}))
    print_table(rows, list(rows[0].figures))
    print("per-label thresholds (chosen on train episodes): " + ", ".join(f"{c} {t:.2f}" for c, t in per_label.items()))
    write_csv(rows, Path(args.csv))
    return rows


if __name__ == "__main__":
    main()
