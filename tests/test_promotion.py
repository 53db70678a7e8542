"""The promotion rule: a candidate replaces what a project predicts with only when no incumbent scores better."""

from __future__ import annotations

from backend.core.promotion import decide


def test_promoted_when_not_worse_than_every_incumbent():
    decision = decide("v3", {"v3": 0.50, "v2": 0.50, "base": 0.40}, ["v2", "base"], held_out=4)
    assert decision.promoted and decision.reason.startswith("promoted") and "v2 0.5000" in decision.reason


def test_kept_back_naming_the_best_incumbent():
    decision = decide("v3", {"v3": 0.30, "v2": 0.45, "base": 0.40}, ["v2", "base"], held_out=4)
    assert not decision.promoted and "below v2 (0.4500)" in decision.reason


def test_not_evaluated_without_held_out_images_or_scores():
    assert "too few labeled images" in decide("v1", {"v1": None}, ["base"], held_out=0).reason
    assert "no label has both" in decide("v1", {"v1": None, "base": 0.2}, ["base"], held_out=2).reason
    unscored = decide("v1", {"v1": 0.3, "base": None}, ["base"], held_out=2)
    assert not unscored.promoted and "base could not be scored" in unscored.reason
    assert unscored.as_dict() == {"promoted": False, "reason": unscored.reason, "scores": {"v1": 0.3, "base": None}}
