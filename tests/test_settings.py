"""backend/core/settings.py: every numeric setting is bounded, and a bad value stops the start in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from backend.core.settings import Settings

from bench.ls_harness import REPO


@pytest.mark.parametrize("variable, value, says", [
    ("BULK_BATCH_SIZE", "0", ">= 1"), ("BULK_BATCH_SIZE", "-1", ">= 1"), ("MODEL_BATCH_SIZE", "0", ">= 1"),
    ("REFRESH_DELAY_S", "1e12", "<= 86400"), ("SYNC_MAX_TASKS", "0", ">= 1"), ("PREDICT_WAIT_S", "0", "> 0"),
    ("CV_FOLDS", "1", ">= 2"), ("JOB_TIMEOUT_S", "0", ">= 1"), ("REFRESH_DELAY_S", "-5", ">= 0"),
    ("MATCHER_RESOLUTION", "100", "multiple of 32"), ("PORT", "70000", "<= 65535"),
    ("MASK_MIN_SCORE", "1.5", "<= 1"),
])
def test_out_of_range_values_are_refused_naming_the_range(variable, value, says):
    """A value outside its field's bounds is refused naming the variable, the value and the allowed range."""
    with pytest.raises(ValueError) as caught:
        Settings.from_env({variable: value})
    message = str(caught.value)
    assert message.startswith(f"{variable}={value!r} is not a valid value") and "(allowed: " in message and says in message


def test_per_label_score_thresholds_are_read_as_json():
    """MASK_MIN_SCORES overrides MASK_MIN_SCORE for its labels; unset, the model's default applies."""
    settings = Settings.from_env({"MASK_MIN_SCORES": '{"pole": 0.3, "road": 0}', "MASK_MIN_SCORE": "0.1"})
    assert (settings.min_score("pole", 0.5), settings.min_score("road", 0.5), settings.min_score("car", 0.5)) == (0.3, 0.0, 0.1)
    assert Settings.from_env({}).min_score("car", 0.25) == 0.25
    for bad in ('{"pole": 2}', '["pole"]', "pole=0.3", '{"pole": true}'):
        with pytest.raises(ValueError, match=r'^MASK_MIN_SCORES must be a JSON object of label: score from 0 to 1'):
            Settings.from_env({"MASK_MIN_SCORES": bad})


def test_every_numeric_setting_has_bounds():
    """Each int or float field carries a lower and an upper bound."""
    for name, field in Settings.model_fields.items():
        if field.annotation in (int, float, int | None, float | None):
            kinds = {type(m).__name__ for m in field.metadata}
            assert kinds & {"Ge", "Gt"} and "Le" in kinds, f"{field.alias} has no bounds"


@pytest.mark.parametrize("command", [["_wsgi.py"], ["-m", "backend", "status", "--project", "1"]])
def test_a_bad_value_stops_the_start_in_one_line(tmp_path, command):
    """The one-command backend and the CLI stop at a bad value with one line naming it, exit status 2."""
    env = {**os.environ, "MODEL_DIR": str(tmp_path), "BULK_BATCH_SIZE": "0"}
    env.pop("REDIS_URL", None)
    out = subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "configuration error: BULK_BATCH_SIZE='0' is not a valid value: it must be greater than or equal to 1 "
        "(allowed: >= 1 and <= 10000)"]


def test_the_settings_page_is_generated_from_the_fields():
    """docs/settings.md is what `python -m backend.core.settings_table --write` makes of the Settings fields: a new or
    changed setting without a regenerated page fails here; every field has a row with its variable and meaning."""
    from backend.core.settings import Settings
    from backend.core.settings_table import DOC, render

    assert DOC.read_text() == render(), "docs/settings.md is stale: run python -m backend.core.settings_table --write"
    for field in Settings.model_fields.values():
        assert f"| `{field.alias}` |" in render() and field.description, field.alias
