"""Settings for CPU-only installations and real-scale runs: DIFFEWS_RESOLUTION, SCORE_EPISODES."""

from __future__ import annotations

import pytest

from backend.core.settings import Settings
from backend.core.versions import base_version
from backend.worker.runtime import load_model

from .checkpoints import write_official_layout


def test_working_resolution_setting_reaches_the_model_and_its_version_name(tmp_path):
    """DIFFEWS_RESOLUTION=R makes a real model work at R px, and the version name says so (other masks)."""
    folder = write_official_layout(tmp_path / "weights")
    settings = Settings.from_env({"DIFFEWS_MODEL": str(folder), "DIFFEWS_RESOLUTION": "64", "MODEL_DIR": str(tmp_path)})
    model = load_model(settings)
    assert model.config.resolution == 64
    assert base_version(settings) == "diffews-weights-r64"
    assert base_version(Settings.from_env({"DIFFEWS_MODEL": str(folder)})) == "diffews-weights"


@pytest.mark.parametrize("env,message", [
    ({"DIFFEWS_RESOLUTION": "100"}, r"DIFFEWS_RESOLUTION='100' is not a valid value: it must be a multiple of 8 \(allowed: >= 64 and <= 2048, a multiple of 8\)"),
    ({"DIFFEWS_RESOLUTION": "big"}, "DIFFEWS_RESOLUTION='big' is not a valid"),
    ({"SCORE_EPISODES": "0"}, r"SCORE_EPISODES='0' is not a valid value: it must be greater than or equal to 1 \(allowed: >= 1"),
])
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


def test_lora_is_the_default_training_mode():
    """LoRA by default: it fits a 24 GB machine at SD 2.1 size (full fine-tuning needs ~14 GB of AdamW state alone)."""
    assert Settings.from_env({}).train_mode == "lora"
