"""The promotion rule: when a freshly trained version replaces what a project predicts with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    """Whether a candidate version is promoted, and why, with every score it was compared on."""

    promoted: bool
    reason: str
    scores: dict[str, float | None]
    """Held-out mIoU per version name (the candidate included)."""

    def as_dict(self) -> dict:
        """JSON form for the registry and /status."""
        return {"promoted": self.promoted, "reason": self.reason, "scores": self.scores}


def decide(candidate: str, scores: dict[str, float | None], incumbents: list[str], held_out: int) -> Decision:
    """Promote `candidate` only if it scores no worse than every incumbent on the same held-out images.

    `incumbents` are the versions the project could be using instead (what it predicts with now, its
    active version): none may be better. Without held-out images or a computable score the candidate
    is kept, unpromoted, and the reason says what is missing.
    """
    if held_out == 0:
        return Decision(False, "not evaluated: too few labeled images to hold any out (every HELD_OUT_EVERY-th "
                               "is held out); kept as a candidate: label more, or pin it by hand", scores)
    mine = scores.get(candidate)
    if mine is None:
        return Decision(False, "not evaluated: no label has both a held-out image and a training image; "
                               "kept as a candidate", scores)
    unscored = [name for name in incumbents if scores.get(name) is None]
    if unscored:
        return Decision(False, f"not evaluated: {', '.join(unscored)} could not be scored; kept as a candidate", scores)
    better = [name for name in incumbents if scores[name] > mine]
    if better:
        best = max(better, key=lambda name: scores[name])
        return Decision(False, f"kept back: held-out mIoU {mine:.4f} is below {best} ({scores[best]:.4f})", scores)
    against = ", ".join(f"{name} {scores[name]:.4f}" for name in incumbents)
    return Decision(True, f"promoted: held-out mIoU {mine:.4f} is not below {against}", scores)
