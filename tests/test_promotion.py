"""The promotion rule: a candidate replaces what a project predicts with unless an incumbent beats it beyond noise."""

from __future__ import annotations

import pytest

from backend.core.promotion import NOISE_SE, decide, paired


def test_promoted_when_not_worse_beyond_noise():
    """Slightly below one incumbent, well within the spread of the paired differences: promoted, with counts."""
    candidate = [0.50, 0.40, 0.70, 0.20, 0.60]
    v2 = [0.55, 0.35, 0.72, 0.25, 0.58]
    base = [0.30, 0.20, 0.50, 0.10, 0.40]
    decision = decide("v3", {"v3": candidate, "v2": v2, "base": base}, ["v2", "base"], images=5, folds=3)
    assert decision.promoted and decision.reason.startswith("promoted")
    assert "5 episodes on 5 labeled images, 3-fold cross-validation" in decision.reason
    assert decision.evidence["versus"]["v2"]["difference"] == pytest.approx(-1.0)
    assert decision.scores == {"v3": 48.0, "v2": 49.0, "base": 30.0}


def test_kept_back_when_worse_beyond_noise_naming_the_incumbent():
    candidate = [0.30, 0.35, 0.28, 0.40]
    v2 = [0.45, 0.50, 0.41, 0.52]
    decision = decide("v3", {"v3": candidate, "v2": v2, "base": candidate}, ["v2", "base"], images=4, folds=2)
    mean, se = paired(candidate, v2)
    assert mean < -NOISE_SE * se
    assert not decision.promoted and decision.reason.startswith("kept back") and "against v2" in decision.reason


def test_one_episode_has_no_spread_so_any_loss_counts():
    assert not decide("v1", {"v1": [0.4], "base": [0.5]}, ["base"], images=2, folds=2).promoted
    assert decide("v1", {"v1": [0.5], "base": [0.5]}, ["base"], images=2, folds=2).promoted


def test_not_evaluated_without_episodes_or_scores():
    assert "too few labeled images" in decide("v1", {"v1": []}, ["base"], images=2, folds=2).reason
    unscored = decide("v1", {"v1": [0.3], "base": None}, ["base"], images=3, folds=3)
    assert not unscored.promoted and "base could not be scored" in unscored.reason
    assert unscored.as_dict()["evidence"] == {"images": 3, "episodes": 1, "folds": 3, "versus": {}}


def test_a_chain_of_small_losses_is_stopped_by_the_root():
    """v2 lost to v1 within noise, and v3 loses to v2 within noise, but v3 is worse than the root beyond noise:
    scoring the root on the same episodes keeps v3 back, naming the root."""
    from backend.core.settings import Settings
    from backend.worker.training import incumbents

    settings = Settings(model_spec="tiny", tiny_resolution=64)
    root = "diffews-tiny-r64-untrained"
    assert incumbents(settings, {"active_version": "v2"}) == ["v2", root]
    assert incumbents(settings, {"active_version": "v2", "pinned_version": "v1"}) == ["v1", "v2", root]
    swing = [0.1, -0.1] * 4
    base = [0.6, 0.5, 0.7, 0.55, 0.65, 0.6, 0.5, 0.7]
    v2 = [b - 0.04 + z for b, z in zip(base, swing)]  # 4 points below the root, within noise
    v3 = [b - 0.08 for b in base]  # 4 more points below v2, within noise: 8 below the root on every episode
    for worse, better in ((v2, base), (v3, v2)):
        mean, se = paired(worse, better)
        assert -NOISE_SE * se < mean < 0  # each step within noise of its parent...
    decision = decide("v3", {"v3": v3, "v2": v2, root: base}, incumbents(settings, {"active_version": "v2"}),
                      images=8, folds=3)
    assert not decision.promoted and f"against {root}" in decision.reason  # ...but not of the root
