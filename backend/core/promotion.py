"""The promotion rule: when a freshly trained version replaces what a project predicts with.

Evidence comes from cross-validation over all labeled images (backend.worker.training): every image is a query
at least once, scored by a model trained without it, and every version is scored on the very same episodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

NOISE_SE = 2.0
"""The candidate is "worse beyond noise" when its mean IoU difference to an incumbent is below -NOISE_SE
standard errors of the paired per-episode differences."""


@dataclass(frozen=True)
class Decision:
    """Whether a candidate version is promoted, and why, with every score it was compared on and its evidence."""

    promoted: bool
    reason: str
    scores: dict[str, float | None]
    """Mean per-episode IoU in percent per version name (the candidate included), over the same episodes."""
    evidence: dict = field(default_factory=dict)
    """images, episodes, folds, and per incumbent the mean difference and its standard error (percent)."""

    def as_dict(self) -> dict:
        """JSON form for the registry and /status."""
        return {"promoted": self.promoted, "reason": self.reason, "scores": self.scores, "evidence": self.evidence}


def paired(candidate: list[float], incumbent: list[float]) -> tuple[float, float]:
    """Mean of the per-episode differences (candidate - incumbent) and its standard error (0 for one episode)."""
    diffs = [a - b for a, b in zip(candidate, incumbent)]
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, 0.0
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(variance / len(diffs))


def decide(candidate: str, ious: dict[str, list[float] | None], incumbents: list[str], *, images: int,
           folds: int) -> Decision:
    """Promote `candidate` unless an incumbent beats it beyond the noise of the shared episodes.

    `ious[name]` holds each version's IoU (0..1) per episode, the same episodes in the same order for all
    (None: it could not be scored). Without any episode the candidate is kept, unpromoted, saying why.
    """
    scores = {name: None if values is None or not values else round(100 * sum(values) / len(values), 4)
              for name, values in ious.items()}
    mine = ious.get(candidate)
    episodes = len(mine or [])
    evidence: dict = {"images": images, "episodes": episodes, "folds": folds, "versus": {}}
    if not mine:
        return Decision(False, "not evaluated: too few labeled images for cross-validation (a label needs an image "
                               "to query and two others to train without it); kept as a candidate: label more, or pin "
                               "it by hand", scores, evidence)
    unscored = [name for name in incumbents if not ious.get(name)]
    if unscored:
        return Decision(False, f"not evaluated: {', '.join(unscored)} could not be scored; kept as a candidate",
                        scores, evidence)
    worse = []
    for name in incumbents:
        mean, se = paired(mine, ious[name])
        evidence["versus"][name] = {"difference": round(100 * mean, 4), "standard_error": round(100 * se, 4)}
        if mean < -NOISE_SE * se or (se == 0.0 and mean < 0.0):
            worse.append((mean, name, se))
    on = f"{episodes} episodes on {images} labeled images, {folds}-fold cross-validation"
    if worse:
        mean, name, se = min(worse)
        return Decision(False, f"kept back: mean IoU {100 * mean:+.2f} points against {name} (standard error "
                               f"{100 * se:.2f}), worse beyond noise; {on}", scores, evidence)
    against = ", ".join(f"{name} {evidence['versus'][name]['difference']:+.2f} ± {evidence['versus'][name]['standard_error']:.2f}"
                        for name in incumbents)
    return Decision(True, f"promoted: not worse beyond noise than {against} (mean IoU points ± standard error); {on}",
                    scores, evidence)
