"""Checks of human labels: each labeled image's masks predicted from the other labeled images (leave one out) and
compared with its annotation, so that the annotations the model disagrees with most are reviewed first."""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy.stats import mannwhitneyu

from .data import Sample
from .errors import InvalidInputError
from .prompts import Box, box_of_mask
from .scoring import episode_iou
from .similarity import most_similar

CHECK_SHOTS = 5
"""Other labeled images used as the supports of each check (fewer when a label has fewer)."""


@dataclass(frozen=True)
class LabelCheck:
    """How one annotated mask (sample, label) agrees with the model's mask predicted without that sample."""

    index: int
    """Index of the sample in the checked list."""
    label: str
    iou: float
    """IoU (0..1, valid pixels) of the annotation and the leave-one-out mask."""
    covered: float
    """Share of the annotation inside the mask (low: the annotation covers what the model does not see there)."""
    explained: float
    """Share of the mask inside the annotation (low: the annotation misses part of what the model finds)."""
    gap: float
    """The label's median IoU over all checks minus this IoU (labels the model segments poorly everywhere, such as
    thin poles, are not all listed first)."""
    outside_gap: float
    """The label's median `explained` minus this one: how much more of the mask than usual falls outside the
    annotation (an annotation missing part of its region)."""
    score: float
    """The leave-one-out mask's own score (model.outputs.SegmentationOutput.score)."""
    suspicion: float
    """(gap + outside_gap) x score: the larger, the likelier the annotation is wrong. A confident mask that disagrees
    counts; an unsure or empty one (its supports may be the wrong ones) counts little (bench.bench_label_checks
    compares the candidates)."""
    region: Box | None
    """Where they disagree (pixels in one mask and not the other), at the working resolution; None if nowhere."""
    supports: tuple[int, ...]
    """Indices of the samples used as supports."""
    rank: float = 0.0
    """Share (0..1) of the label's other checked annotations that are less suspicious: checks are listed by it, so
    each label's worst come first even for labels the model segments poorly everywhere."""


def check_labels(model, samples: Sequence[Sample], *, shots: int = CHECK_SHOTS, choose: str = "similar",
                 seed: int = 0, on_sample: Callable[[int, int], object] | None = None) -> list[LabelCheck]:
    """Check every (sample, label) that at least one other sample also labels, most suspicious first (by rank within
    the label, then suspicion).

    Supports are up to `shots` other samples with the label: the most similar images (`choose="similar"`, by the
    model's image descriptors) or drawn with `seed` ("random"); `on_sample(done, total)` reports progress. Works
    with any segmenter of the package's contract (encode_support / encode_queries / segment_encoded /
    describe_images) at its working resolution.
    """
    if shots < 1:
        raise InvalidInputError(f"shots must be at least 1, got {shots}")
    if choose not in ("similar", "random"):
        raise InvalidInputError(f"choose must be 'similar' or 'random', got {choose!r}")
    resolution = model.config.resolution
    if any(s.image.shape[0] != resolution for s in samples):
        raise InvalidInputError(f"samples must be at the model's working resolution {resolution}")
    rng = random.Random(seed)
    descriptors = model.describe_images([s.image for s in samples]) if choose == "similar" and samples else None
    having: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        for label, mask in sample.masks.items():
            if mask.any():
                having.setdefault(label, []).append(i)
    raw: list[tuple] = []
    for i, sample in enumerate(samples):
        labels = [c for c in sorted(sample.masks) if sample.masks[c].any() and len(having.get(c, ())) > 1]
        if labels:
            encoded = model.encode_queries([sample.image])
            for label in labels:
                others = [j for j in having[label] if j != i]
                if descriptors is None:
                    chosen = tuple(sorted(rng.sample(others, min(shots, len(others)))))
                else:
                    nearest = most_similar(descriptors[i], descriptors[others], min(shots, len(others)))
                    chosen = tuple(sorted(others[k] for k in nearest))
                memory = model.encode_support([samples[j].image for j in chosen], [samples[j].masks[label] for j in chosen])
                out = model.segment_encoded(encoded, memory)[0]
                predicted = out.probability > out.threshold
                annotated, valid = sample.masks[label] & sample.valid, sample.valid
                both = float((predicted & annotated).sum())
                raw.append((i, label, episode_iou(predicted, annotated, valid), both / max(1.0, float(annotated.sum())),
                            both / max(1.0, float((predicted & valid).sum())), float(out.score),
                            box_of_mask((predicted ^ annotated) & valid), chosen))
        if on_sample is not None:
            on_sample(i + 1, len(samples))
    labels = {r[1] for r in raw}
    medians = {c: statistics.median(r[2] for r in raw if r[1] == c) for c in labels}
    usual = {c: statistics.median(r[4] for r in raw if r[1] == c) for c in labels}
    checks = [LabelCheck(i, c, iou, covered, explained, medians[c] - iou, usual[c] - explained, score,
                         (medians[c] - iou + usual[c] - explained) * score, region, chosen)
              for i, c, iou, covered, explained, score, region, chosen in raw]
    ranks = within_label_ranks([check.label for check in checks], [check.suspicion for check in checks])
    ranked = [replace(check, rank=rank) for check, rank in zip(checks, ranks)]
    return sorted(ranked, key=lambda check: (-check.rank, -check.suspicion, check.index, check.label))


def within_label_ranks(labels: Sequence[str], suspicions: Sequence[float]) -> list[float]:
    """Each suspicion's rank (0..1) among those of its label: the share of the label's others below it, ties counting
    half (equal suspicions get equal ranks)."""
    out = [0.0] * len(labels)
    for label in set(labels):
        mine = [i for i, other in enumerate(labels) if other == label]
        values = np.asarray([suspicions[i] for i in mine], dtype=np.float64)
        below = (values[None, :] < values[:, None]).sum(1) + 0.5 * ((values[None, :] == values[:, None]).sum(1) - 1)
        for i, b in zip(mine, below):
            out[i] = float(b) / max(1, len(mine) - 1)
    return out


def ranking_auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Probability that a random positive scores above a random negative (ties count half); NaN without both."""
    s, p = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    if p.all() or not p.any():
        return float("nan")
    return float(mannwhitneyu(s[p], s[~p]).statistic / (p.sum() * (~p).sum()))
