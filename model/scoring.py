"""HSNet-style running sums of masks against truth, and the trivial predictors every model is shown beside."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import mannwhitneyu, spearmanr

Baseline = Callable[[Sequence[np.ndarray], tuple[int, int]], np.ndarray]
"""A predictor that never looks at the query: (support masks, query shape) -> boolean mask."""


def copy_support(support_masks: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """The support prior: pixels that are foreground in more than half of the support masks."""
    return np.mean(np.stack([m.astype(np.float32) for m in support_masks]), axis=0) > 0.5


def all_foreground(support_masks: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Every pixel is the class."""
    return np.ones(shape, dtype=bool)


def empty(support_masks: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """No pixel is the class."""
    return np.zeros(shape, dtype=bool)


BASELINES: dict[str, Baseline] = {"copy support": copy_support, "all foreground": all_foreground, "empty": empty}
"""Predictors that know nothing of the query, scored on the model's own episodes."""


class Tally:
    """One predictor's sums over episodes: per-class intersections and unions, FB-IoU terms, foreground pixels."""

    def __init__(self) -> None:
        self.inter: dict[str, int] = {}
        self.union: dict[str, int] = {}
        self.fb_inter = np.zeros(2)
        self.fb_union = np.zeros(2)
        self.predicted = 0
        self.true = 0
        self.scored = 0

    def add(self, label: str, pred: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> None:
        """Count one episode's mask against its truth, void pixels (valid False) left out."""
        self.inter[label] = self.inter.get(label, 0) + int((pred & truth & valid).sum())
        self.union[label] = self.union.get(label, 0) + int(((pred | truth) & valid).sum())
        for j, (p, t) in enumerate(((~pred, ~truth), (pred, truth))):  # background, foreground
            self.fb_inter[j] += (p & t & valid).sum()
            self.fb_union[j] += ((p | t) & valid).sum()
        self.predicted += int((pred & valid).sum())
        self.true += int((truth & valid).sum())
        self.scored += int(valid.sum())

    def per_class(self) -> dict[str, float]:
        """IoU in percent per class: sum of intersections over sum of unions."""
        return {c: 100.0 * self.inter[c] / self.union[c] if self.union[c] else 0.0 for c in self.inter}

    def fbiou(self) -> float:
        """Mean of background and foreground IoU, in percent."""
        return float(100.0 * np.mean(self.fb_inter / np.maximum(self.fb_union, 1)))

    def foreground(self) -> tuple[float, float]:
        """Percent of the scored pixels predicted foreground, and percent truly foreground."""
        scored = max(self.scored, 1)
        return 100.0 * self.predicted / scored, 100.0 * self.true / scored


def episode_iou(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> float:
    """One mask's IoU with its truth over the valid pixels (1.0 when both are empty)."""
    union = int(((pred | truth) & valid).sum())
    return float((pred & truth & valid).sum() / union) if union else 1.0


def contrast_score(probability: np.ndarray, mask: np.ndarray) -> float:
    """Mean decoded map inside the mask minus outside it (0 for an empty or full mask); the score before margin."""
    if not mask.any() or mask.all():
        return 0.0
    return float(np.clip(probability[mask].mean() - probability[~mask].mean(), 0.0, 1.0))


def margin_score(probability: np.ndarray, threshold: float, mask: np.ndarray) -> float:
    """Mean height of the decoded map above the threshold inside the mask, as a share of the room above it."""
    if not mask.any() or threshold >= 1.0:
        return 0.0
    return float(np.clip((probability[mask] - threshold).mean() / (1.0 - threshold), 0.0, 1.0))


def mask_agreement(mask: np.ndarray, others: Sequence[np.ndarray]) -> float:
    """Mean IoU of `mask` with masks predicted from other support subsets (1.0 when all are empty)."""
    everywhere = np.ones_like(mask, dtype=bool)
    return float(np.mean([episode_iou(mask, other, everywhere) for other in others]))


def sharpness_score(probability: np.ndarray, threshold: float, mask: np.ndarray, band: float = 0.05) -> float:
    """1 minus the share of the mask's pixels whose map value lies within `band` of the threshold: a mask whose
    edge the map draws sharply scores near 1, one that a small shift of the threshold would redraw near 0."""
    if not mask.any():
        return 0.0
    ambiguous = np.abs(probability - threshold) < band
    return float(np.clip(1.0 - ambiguous.sum() / mask.sum(), 0.0, 1.0))


def share_agreement(share: float, support_share: float) -> float:
    """How close a mask's share of the image is to its supports' mean share: exp(-|log ratio|), 0 for empty."""
    if share <= 0.0 or support_share <= 0.0:
        return 0.0
    return float(np.exp(-abs(np.log(share / support_share))))


def area_agreement(mask: np.ndarray, support_masks: Sequence[np.ndarray]) -> float:
    """share_agreement of a mask with its support masks."""
    return share_agreement(float(mask.mean()), float(np.mean([m.mean() for m in support_masks])) if len(support_masks) else 0.0)


def ranking_quality_within(scores: Sequence[float], ious: Sequence[float], labels: Sequence[str],
                           bad_below: float = 0.5) -> dict[str, float]:
    """ranking_quality inside each label, averaged over the labels where it is defined (a score that only
    tells labels apart scores near 0 here); "labels" counts those labels."""
    scores, ious, labels = np.asarray(scores, float), np.asarray(ious, float), np.asarray(labels)
    rhos, aurocs = [], []
    for label in np.unique(labels):
        inside = labels == label
        quality = ranking_quality(scores[inside], ious[inside], bad_below)
        if not np.isnan(quality["spearman"]):
            rhos.append(quality["spearman"])
        if not np.isnan(quality["auroc"]):
            aurocs.append(quality["auroc"])
    return {"spearman": float(np.mean(rhos)) if rhos else float("nan"),
            "auroc": float(np.mean(aurocs)) if aurocs else float("nan"), "labels": float(len(rhos))}


def ranking_quality(scores: Sequence[float], ious: Sequence[float], bad_below: float = 0.5) -> dict[str, float]:
    """How well a score ranks errors: Spearman correlation with IoU, and the AUROC of the score for telling
    masks with IoU >= `bad_below` from worse ones (0.5 = chance, 1 = every bad mask scores below every good one)."""
    scores, ious = np.asarray(scores, float), np.asarray(ious, float)
    good, bad = scores[ious >= bad_below], scores[ious < bad_below]
    rho = float(spearmanr(scores, ious).statistic) if len(scores) > 2 and scores.std() and ious.std() else float("nan")
    auroc = float(mannwhitneyu(good, bad).statistic / (len(good) * len(bad))) if len(good) and len(bad) else float("nan")
    return {"spearman": rho, "auroc": auroc, "bad_share": float(len(bad) / max(len(scores), 1))}
