"""Loading DiffewS weights three ways, saving them, and the typed errors of bad checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from model import CheckpointNotFoundError, DiffewS, InvalidCheckpointError

from .checkpoints import write_official_layout, write_plain_sd_layout, write_separate_unet
from bench.synthetic import square_scene


def _masks_of(model: DiffewS) -> np.ndarray:
    image, mask = square_scene(0)
    memory = model.encode_support([image], [mask], use_cache=False)
    return model.segment([square_scene(1)[0]], memory)[0].probability


def test_official_layout_loads_conv_in_ref_from_weights(tmp_path):
    """An official pipeline folder loads conv_in_ref from its safetensors, not by surgery."""
    root = write_official_layout(tmp_path / "official")
    stored = load_file(root / "unet" / "diffusion_pytorch_model.safetensors")
    assert json.loads((root / "unet" / "config.json").read_text())["in_channels_ref"] == 8
    model = DiffewS.from_pretrained(root, device="cpu")
    torch.testing.assert_close(model.unet.conv_in_ref.weight, stored["conv_in_ref.weight"])
    torch.testing.assert_close(model.unet.conv_in_ref.bias, stored["conv_in_ref.bias"])
    assert model.prompt_embeds.shape == (1, 2, 32)
    assert model.config.trained and model.source == str(root)


def test_plain_sd_layout_gets_surgery(tmp_path):
    """A plain SD folder gets conv_in_ref = conv_in repeated over 2 input groups / 2, bias copied."""
    root = tmp_path / "sd"
    plain = write_plain_sd_layout(root)
    model = DiffewS.from_pretrained(root, device="cpu")
    expected = torch.cat([plain.conv_in.weight, plain.conv_in.weight], dim=1) / 2
    torch.testing.assert_close(model.unet.conv_in_ref.weight, expected)
    torch.testing.assert_close(model.unet.conv_in_ref.bias, plain.conv_in.bias)
    # With equal image and mask latents, the surgery conv reproduces conv_in exactly.
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.unet.conv_in_ref(torch.cat([z, z], 1)), model.unet.conv_in(z))


def test_empty_prompt_embedding_is_two_token_text_encoding(tmp_path):
    """The embedding is the text encoder's last hidden state for [BOS, EOS], and the encoder is not kept."""
    from transformers import CLIPTextModel

    root = write_official_layout(tmp_path / "official")
    model = DiffewS.from_pretrained(root, device="cpu")
    encoder = CLIPTextModel.from_pretrained(root / "text_encoder")
    with torch.no_grad():
        expected = encoder(torch.tensor([[0, 1]])).last_hidden_state
    torch.testing.assert_close(model.prompt_embeds, expected)
    assert not any(isinstance(v, CLIPTextModel) for v in vars(model).values())


def test_save_load_round_trip(tmp_path):
    """save_pretrained then from_pretrained gives the same outputs and config (tiny model)."""
    model = DiffewS.tiny(resolution=64)
    model.save_pretrained(tmp_path / "saved")
    files = {p.relative_to(tmp_path / "saved").as_posix() for p in (tmp_path / "saved").rglob("*") if p.is_file()}
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "empty_prompt_embeds.safetensors", "diffews_config.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    loaded = DiffewS.from_pretrained(tmp_path / "saved", device="cpu")
    assert loaded.config == model.config and not loaded.config.trained
    for net in ("unet", "vae"):
        saved, back = getattr(model, net).state_dict(), getattr(loaded, net).state_dict()
        assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved), net
    torch.testing.assert_close(loaded.prompt_embeds, model.prompt_embeds, rtol=0, atol=0)
    # Same weights; multi-threaded CPU kernels may still differ in the last float bits, which the
    # release's uint8 truncation can turn into one grey level (1/255) on a channel.
    np.testing.assert_allclose(_masks_of(model), _masks_of(loaded), atol=1 / 255 + 1e-6)


def test_separate_unet_over_base(tmp_path):
    """A coco_fold/incontext unet folder given over a base replaces the base UNet, conv_in_ref included."""
    root = write_official_layout(tmp_path / "base")
    fold = write_separate_unet(tmp_path / "coco_fold0" / "unet")
    model = DiffewS.from_pretrained(root, unet=tmp_path / "coco_fold0" / "unet", device="cpu")
    torch.testing.assert_close(model.unet.conv_in_ref.weight, fold.conv_in_ref.weight)
    torch.testing.assert_close(model.unet.conv_in.weight, fold.conv_in.weight)
    assert "coco_fold0" in model.source


def test_modelscope_download_layout(tmp_path):
    """The ModelScope folder (weight/<base>/ and weight/incontext/unet) loads with the in-context UNet."""
    root = tmp_path / "Diffews"
    write_official_layout(root / "weight" / "stable-diffusion-2-1-ref8inchannels-tag4inchannels")
    incontext = write_separate_unet(root / "weight" / "incontext" / "unet")
    model = DiffewS.from_pretrained(root, device="cpu")
    torch.testing.assert_close(model.unet.conv_in.weight, incontext.conv_in.weight)


def test_bin_weights_load_with_weights_only(tmp_path):
    """A unet saved as .bin (as some releases are) still yields its conv_in_ref tensors."""
    root = write_official_layout(tmp_path / "official")
    unet_dir = root / "unet"
    state = load_file(unet_dir / "diffusion_pytorch_model.safetensors")
    torch.save(state, unet_dir / "diffusion_pytorch_model.bin")
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    model = DiffewS.from_pretrained(root, device="cpu")
    torch.testing.assert_close(model.unet.conv_in_ref.weight, state["conv_in_ref.weight"])


# ---- bad checkpoints -----------------------------------------------------------------------


def test_missing_folder(tmp_path):
    """A path that does not exist raises CheckpointNotFoundError naming it."""
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        DiffewS.from_pretrained(tmp_path / "nope")


def test_hub_id_offline_fails_clearly(monkeypatch):
    """A hub id that cannot be fetched (offline here) raises CheckpointNotFoundError, not a raw hub error."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointNotFoundError, match="could not be fetched"):
        DiffewS.from_pretrained("nobody/no-such-diffews-model")


def test_not_a_checkpoint(tmp_path):
    """A folder without vae/ and unet/ raises InvalidCheckpointError saying what was expected."""
    (tmp_path / "random.txt").write_text("hello")
    with pytest.raises(InvalidCheckpointError, match="expected vae/config.json and unet/config.json"):
        DiffewS.from_pretrained(tmp_path)
    with pytest.raises(InvalidCheckpointError, match="is a file"):
        DiffewS.from_pretrained(tmp_path / "random.txt")


def test_unet_folder_alone(tmp_path):
    """A unet folder given as the model spec says to pass it as the separate UNet."""
    write_separate_unet(tmp_path / "unet")
    with pytest.raises(InvalidCheckpointError, match="UNet folder alone"):
        DiffewS.from_pretrained(tmp_path / "unet")


def test_config_claims_conv_in_ref_but_weights_lack_it(tmp_path):
    """in_channels_ref in config.json without conv_in_ref tensors is an error naming the config."""
    root = write_official_layout(tmp_path / "official")
    path = root / "unet" / "diffusion_pytorch_model.safetensors"
    state = {k: v for k, v in load_file(path).items() if not k.startswith("conv_in_ref")}
    save_file(state, path)
    with pytest.raises(InvalidCheckpointError, match="declares in_channels_ref=8 but the weights"):
        DiffewS.from_pretrained(root)


def test_conv_in_ref_of_wrong_shape(tmp_path):
    """A conv_in_ref whose shape does not fit the UNet names the folder and the expected shape."""
    root = write_official_layout(tmp_path / "official")
    path = root / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["conv_in_ref.weight"] = torch.zeros(16, 8, 3, 3)
    save_file(state, path)
    with pytest.raises(InvalidCheckpointError, match=r"expected weight \(32, 8, 3, 3\)"):
        DiffewS.from_pretrained(root)


def test_half_of_conv_in_ref(tmp_path):
    """conv_in_ref.weight without conv_in_ref.bias is reported."""
    root = write_official_layout(tmp_path / "official")
    path = root / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    del state["conv_in_ref.bias"]
    save_file(state, path)
    with pytest.raises(InvalidCheckpointError, match=r"lacks \['conv_in_ref.bias'\]"):
        DiffewS.from_pretrained(root)


def test_unet_weights_missing_or_shapes_wrong(tmp_path):
    """No weights file, or weights whose shapes do not match config.json, raise InvalidCheckpointError."""
    root = write_official_layout(tmp_path / "official")
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(InvalidCheckpointError, match="no diffusion_pytorch_model.safetensors"):
        DiffewS.from_pretrained(broken)
    config = json.loads((root / "unet" / "config.json").read_text())
    config["block_out_channels"] = [64, 128]
    (root / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidCheckpointError, match=r"unet/diffusion_pytorch_model.safetensors: tensor conv_in.weight "
                                                     r"is \[32, 4, 3, 3\] but the architecture of its config.json needs"):
        DiffewS.from_pretrained(root)


def test_inpainting_unet_rejected(tmp_path):
    """A UNet with 9 input channels (inpainting) is refused with the reason."""
    from diffusers import UNet2DConditionModel

    from model.tiny import TINY_UNET_CONFIG

    root = tmp_path / "sd"
    write_plain_sd_layout(root)
    shutil.rmtree(root / "unet")
    UNet2DConditionModel(**{**TINY_UNET_CONFIG, "in_channels": 9}).save_pretrained(root / "unet")
    with pytest.raises(InvalidCheckpointError, match="in_channels=9"):
        DiffewS.from_pretrained(root)


def test_text_encoder_of_other_width(tmp_path):
    """An embedding whose width is not the UNet's cross_attention_dim is refused, naming both."""
    root = write_official_layout(tmp_path / "official")
    shutil.rmtree(root / "text_encoder")
    save_file({"prompt_embeds": torch.zeros(1, 2, 48)}, root / "empty_prompt_embeds.safetensors")
    with pytest.raises(InvalidCheckpointError, match="cross_attention_dim=32 does not fit"):
        DiffewS.from_pretrained(root)


def test_missing_text_encoder(tmp_path):
    """Without text_encoder/ and without a stored embedding, the error says what is missing."""
    root = write_official_layout(tmp_path / "official")
    shutil.rmtree(root / "text_encoder")
    with pytest.raises(InvalidCheckpointError, match="text_encoder/config.json is missing"):
        DiffewS.from_pretrained(root)


def test_bad_config_file(tmp_path):
    """A diffews_config.json with unknown keys or bad values is refused."""
    model = DiffewS.tiny(resolution=64)
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "diffews_config.json").write_text(json.dumps({"resolution": 64, "colour": "red"}))
    with pytest.raises(InvalidCheckpointError, match="expected an object with keys"):
        DiffewS.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "diffews_config.json").write_text(json.dumps({"resolution": 60}))
    with pytest.raises(InvalidCheckpointError, match="multiple of 8"):
        DiffewS.from_pretrained(tmp_path / "m")


def test_separate_unet_missing(tmp_path):
    """A separate UNet path that does not exist raises CheckpointNotFoundError."""
    root = write_official_layout(tmp_path / "official")
    with pytest.raises(CheckpointNotFoundError, match="UNet folder"):
        DiffewS.from_pretrained(root, unet=tmp_path / "missing")
    with pytest.raises(InvalidCheckpointError, match="tiny"):
        DiffewS.from_pretrained("tiny", unet=root / "unet")


class _Payload:
    """An object a pickle may carry besides tensors (it could run code when unpickled)."""


def test_zip_pickle_bin_is_refused_without_unsafe_advice(tmp_path):
    """A .bin holding Python objects: InvalidCheckpointError naming the file, never advice to drop weights_only."""
    root = write_official_layout(tmp_path / "official")
    unet_dir = root / "unet"
    state = load_file(unet_dir / "diffusion_pytorch_model.safetensors")
    torch.save({**state, "extra": _Payload()}, unet_dir / "diffusion_pytorch_model.bin")
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(InvalidCheckpointError) as info:
        DiffewS.from_pretrained(root, device="cpu")
    message = str(info.value)
    assert str(unet_dir / "diffusion_pytorch_model.bin") in message and "not loaded" in message
    assert "weights_only=False" not in message
