"""model/versions.py: versions as deltas over one base: fp32 master weights, adapters by name, full versions sharing the VAE."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model import DiffewS, InvalidCheckpointError
from model.adapters import adapter_key
from model.train import TrainConfig, finetune
from model.unet_weights import plain_unet_state
from model.version_file import ADAPTER_CONFIG, ADAPTER_WEIGHTS, VersionInfo
from model.versions import attach_version, load_version, save_version, trainable_copy

from .test_train import shape_task


def changed_share(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Share of elements that differ between two state dicts of the same keys."""
    changed = sum(int((before[k].float() != after[k].float()).sum()) for k in before)
    return changed / sum(v.numel() for v in before.values())


def lora_version(base: DiffewS, folder, name: str, steps: int) -> tuple[DiffewS, object]:
    """A LoRA fine-tuned copy of `base` (rank 4) and the version folder it was saved to."""
    lora = trainable_copy(base, "lora")
    result = finetune(lora, shape_task(4, 0), TrainConfig(steps=steps, mode="lora", lora_rank=4, seed=0, lr=1e-2))
    return lora, save_version(lora, folder, name, base={"spec": "tiny"}, parent=None, mode="lora", summary={},
                              weights=result.weights)


def probability(model: DiffewS, seed: int = 3) -> np.ndarray:
    """The model's 1-shot map of a fixed synthetic query (support memory encoded afresh)."""
    samples = shape_task(2, seed)
    memory = model.encode_support([samples[1].image], [samples[1].masks["disc"]], use_cache=False)
    return model.segment([samples[0].image], memory)[0].probability


def test_bf16_served_model_trains_like_fp32():
    """Served in bf16, fine-tuning keeps fp32 masters: they move like the fp32 run's (lr 1e-5, 6 steps).

    Trained in place in bf16, about 6 % of elements moved (an AdamW step below half a bf16 step rounds
    away); with masters every element moves, as in fp32, and the losses agree.
    """
    config = TrainConfig(steps=6, seed=0, lr=1e-5)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = DiffewS.tiny(resolution=64, dtype=dtype)
        start = {k: v.float().clone() for k, v in plain_unet_state(model.unet).items()}
        result = finetune(model, shape_task(4, 0), config)
        assert all(v.dtype == torch.float32 for v in result.weights.values())
        assert model.unet.dtype == dtype  # handed back in the serving dtype
        runs[dtype] = (changed_share(start, result.weights), result.losses)
    share32, losses32 = runs[torch.float32]
    share16, losses16 = runs[torch.bfloat16]
    assert share32 > 0.95 and abs(share16 - share32) < 0.02, (share32, share16)
    np.testing.assert_allclose(losses16, losses32, rtol=0.05)


def test_bf16_lora_adapter_is_float32_and_moves():
    """LoRA on a bf16 model: the adapter is float32 and every one of its B matrices moves."""
    model = DiffewS.tiny(resolution=64, dtype=torch.bfloat16)
    result = finetune(model, shape_task(4, 0), TrainConfig(steps=4, seed=0, lr=1e-4, mode="lora", lora_rank=4))
    b = {k: v for k, v in result.weights.items() if "lora_B" in k}
    assert b and all(v.dtype == torch.float32 for v in result.weights.values())
    assert all(v.abs().sum() > 0 for v in b.values())  # B starts at zero: each moved
    assert model.unet.dtype == torch.bfloat16


def test_lora_version_is_an_adapter_on_the_shared_base(tmp_path):
    """A saved LoRA version is a peft adapter folder with its whole LoraConfig; loaded over a base it adds a named
    adapter to base's UNet, shares its VAE, and the base still predicts as before."""
    base = DiffewS.tiny(resolution=64)
    samples = shape_task(3, 5)
    memory_args = ([samples[1].image], [samples[1].masks["disc"]])
    before = base.segment([samples[0].image], base.encode_support(*memory_args, use_cache=False))[0].probability

    trained = trainable_copy(base, "lora")
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(plain_unet_state(trained.unet).values(),
                                                             plain_unet_state(base.unet).values()))
    result = finetune(trained, shape_task(6, 0), TrainConfig(steps=10, mode="lora", lora_rank=4, seed=0, lr=1e-2))
    folder = save_version(trained, tmp_path, "p1-v1", base={"spec": "tiny"}, parent=None, mode="lora", summary={},
                          project=1, weights=result.weights)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4 and sorted(config["target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
    assert (folder / ADAPTER_WEIGHTS).stat().st_size < 200_000
    assert VersionInfo.read(folder).project == 1

    version = attach_version(base, folder)
    assert version.unet is base.unet and version.vae is base.vae and version.adapter.startswith(adapter_key("p1-v1"))
    mine = version.segment([samples[0].image], version.encode_support(*memory_args, use_cache=False))[0].probability
    expected = trained.segment([samples[0].image], trained.encode_support(*memory_args, use_cache=False))[0].probability
    np.testing.assert_allclose(mine, expected, atol=1e-5)
    again = base.segment([samples[0].image], base.encode_support(*memory_args, use_cache=False))[0].probability
    np.testing.assert_array_equal(again, before)  # the base runs without the adapter
    assert not np.allclose(mine, before)


def test_full_version_shares_vae_and_decoder(tmp_path):
    """A full version is UNet weights only; loaded over the base it gets its own UNet and the base's VAE."""
    base = DiffewS.tiny(resolution=64, dtype=torch.bfloat16)
    trained = trainable_copy(base, "full")
    assert trained.unet.dtype == torch.float32 and trained.unet is not base.unet
    result = finetune(trained, shape_task(4, 0), TrainConfig(steps=3, seed=0))
    folder = save_version(trained, tmp_path, "v1", base={"spec": "tiny"}, parent=None, mode="full", summary={},
                          weights=result.weights)
    version = attach_version(base, folder)
    assert version.vae is base.vae and version.decode_vae is base.decode_vae and version.unet is not base.unet
    assert version.unet.dtype == torch.bfloat16
    for name, value in plain_unet_state(version.unet).items():
        torch.testing.assert_close(value, result.weights[name].to(torch.bfloat16))
    standalone = load_version(folder)  # fp32 on its own: the saved masters exactly
    for name, value in plain_unet_state(standalone.unet).items():
        torch.testing.assert_close(value, result.weights[name], rtol=0, atol=0)


def test_full_copy_of_a_lora_version_merges_the_adapter(tmp_path):
    """trainable_copy(..., "full") of a model running a LoRA version gives the merged weights (same outputs)."""
    base = DiffewS.tiny(resolution=64)
    _, folder = lora_version(base, tmp_path, "v1", steps=5)
    version = attach_version(base, folder)
    merged = trainable_copy(version, "full")
    assert merged.adapter is None and not getattr(merged.unet, "peft_config", None)
    np.testing.assert_allclose(probability(version), probability(merged), atol=2e-3)


def test_schema_1_lora_version_still_loads(tmp_path):
    """A LoRA folder written before version.json had a schema (rank only) loads with the constants of its time."""
    lora, folder = lora_version(DiffewS.tiny(resolution=64), tmp_path, "old", steps=3)
    (folder / ADAPTER_WEIGHTS).rename(folder / "unet_lora.safetensors")
    (folder / ADAPTER_CONFIG).unlink()
    (folder / "lora_config.json").write_text('{"rank": 4}')
    info = json.loads((folder / "version.json").read_text())
    del info["schema"], info["project"], info["files"]  # none of these existed then
    (folder / "version.json").write_text(json.dumps(info))
    np.testing.assert_allclose(probability(load_version(folder)), probability(lora), atol=1e-5)


def test_damaged_version_files_are_named(tmp_path):
    """A truncated full version, and adapter weights of another shape, raise InvalidCheckpointError naming the file."""
    base = DiffewS.tiny(resolution=64)
    folder = save_version(base, tmp_path, "v1", base={"spec": "tiny"}, parent=None, mode="full", summary={})
    weights = folder / "unet.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(InvalidCheckpointError, match="unet.safetensors"):
        attach_version(base, folder)

    _, folder = lora_version(base, tmp_path, "v2", steps=1)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**config, "r": 8}))  # weights are rank 4
    with pytest.raises(InvalidCheckpointError, match="adapter_config.json holds .* bytes"):
        attach_version(base, folder)  # version.json recorded each file's size
    info = json.loads((folder / "version.json").read_text())
    (folder / "version.json").write_text(json.dumps({**info, "files": {}}))  # as folders saved before sizes were
    with pytest.raises(InvalidCheckpointError, match="does not fit"):
        attach_version(base, folder)


def test_version_file_errors(tmp_path):
    """version.json: missing, unreadable, or with an unknown mode."""
    from model import CheckpointNotFoundError

    with pytest.raises(CheckpointNotFoundError, match="not a model version folder"):
        VersionInfo.read(tmp_path)
    (tmp_path / "version.json").write_text("{")
    with pytest.raises(InvalidCheckpointError, match="cannot read"):
        VersionInfo.read(tmp_path)
    (tmp_path / "version.json").write_text(json.dumps({"name": "x", "mode": "half", "base": {"spec": "tiny"}}))
    with pytest.raises(InvalidCheckpointError, match="mode must be"):
        VersionInfo.read(tmp_path)


def test_full_fine_tuning_of_a_model_running_an_adapter_is_refused(tmp_path):
    """finetune(mode="full") on a model that runs with a LoRA adapter says to take trainable_copy first."""
    from model import InvalidInputError

    base = DiffewS.tiny(resolution=64)
    _, folder = lora_version(base, tmp_path, "v1", steps=1)
    with pytest.raises(InvalidInputError, match="trainable_copy"):
        finetune(attach_version(base, folder), shape_task(4, 0), TrainConfig(steps=1, mode="full"))
