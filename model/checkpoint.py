"""Resolve a model spec (DiffewS folder, SD 2.x folder, hub id, ModelScope download, "tiny") into components."""

from __future__ import annotations

import json
import logging
import pickle
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file

from .config import CONFIG_NAME, EMBEDS_NAME, DiffewSConfig
from .matcher_config import MATCHER_CONFIG_NAME
from .errors import CheckpointNotFoundError, InvalidCheckpointError
from .tiny import build_tiny_components
from .unet_ref import (  # quiet_diffusers is imported from here by the rest of the package
    add_conv_in_ref_by_surgery,
    load_conv_in_ref,
    pickled_objects_message,
    quiet_diffusers,
    read_ref_tensors,
    unet_weight_file,
)
from .release import MODELSCOPE_BASE, MODELSCOPE_DEFAULT_UNET
from .unet_weights import check_folder_fits

logger = logging.getLogger(__name__)

TINY_SPEC = "tiny"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = [
    "*.json", "tokenizer/*.txt", EMBEDS_NAME, "vae/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
]
"""What is fetched of a hub repository: configs and safetensors only, never pickles."""


@dataclass
class Components:
    """Everything DiffewS needs at inference, plus where it came from."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    prompt_embeds: torch.Tensor
    config: DiffewSConfig
    source: str
    conv_in_ref: str
    """"checkpoint" when conv_in_ref came with the weights, "surgery" when derived from conv_in, "tiny" for the tiny model."""


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise InvalidCheckpointError(f"{path} is missing: expected {what}")
    return path


def _load_vae(folder: Path) -> AutoencoderKL:
    _need(folder / "config.json", "the VAE's diffusers config")
    check_folder_fits(folder, AutoencoderKL)
    try:
        with quiet_diffusers():
            return AutoencoderKL.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InvalidCheckpointError(f"{folder}: cannot load the VAE ({exc})") from None


def load_unet(folder: Path) -> tuple[UNet2DConditionModel, str]:
    """A UNet folder -> stock UNet with conv_in_ref attached, from the weights or by surgery."""
    config_path = _need(folder / "config.json", "the UNet's diffusers config")
    try:
        declared = json.loads(config_path.read_text()).get("in_channels_ref")
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidCheckpointError(f"{config_path}: cannot read ({exc})") from None
    tensors = read_ref_tensors(folder)
    check_folder_fits(folder, UNet2DConditionModel, ignore=("conv_in_ref.",))
    try:
        with quiet_diffusers():
            unet = UNet2DConditionModel.from_pretrained(folder)
    except pickle.UnpicklingError:
        raise InvalidCheckpointError(pickled_objects_message(unet_weight_file(folder) or folder)) from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise InvalidCheckpointError(f"{folder}: cannot load the UNet ({exc})") from None
    if unet.config.in_channels != 4 or unet.config.out_channels != 4:
        raise InvalidCheckpointError(
            f"{config_path}: in_channels={unet.config.in_channels}, out_channels={unet.config.out_channels}; "
            "DiffewS needs a text-to-image UNet with 4 in and 4 out (not an inpainting or depth UNet)"
        )
    if tensors is None:
        if declared:
            raise InvalidCheckpointError(
                f"{config_path} declares in_channels_ref={declared} but the weights next to it have no "
                "conv_in_ref.weight / conv_in_ref.bias"
            )
        add_conv_in_ref_by_surgery(unet)
        return unet, "surgery"
    load_conv_in_ref(unet, folder, tensors)
    return unet, "checkpoint"


def _empty_prompt_embeds(root: Path) -> torch.Tensor:
    """The [1, 2, D] empty-prompt embedding: stored next to the weights, or computed once by the text encoder."""
    stored = root / EMBEDS_NAME
    if stored.is_file():
        try:
            return load_file(stored)["prompt_embeds"]
        except (OSError, KeyError, ValueError) as exc:
            raise InvalidCheckpointError(f"{stored}: expected a safetensors file with 'prompt_embeds' ({exc})") from None
    _need(root / "text_encoder" / "config.json", f"a text encoder (or {EMBEDS_NAME}) to embed the empty prompt")
    _need(root / "tokenizer", "the CLIP tokenizer that goes with text_encoder/")
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
        # float32 always: transformers 5 keeps the stored dtype, and an fp16 encoder moves the embedding ~2e-3
        encoder = CLIPTextModel.from_pretrained(root / "text_encoder", use_safetensors=None, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InvalidCheckpointError(f"{root}: cannot load text_encoder/ or tokenizer/ ({exc})") from None
    # The release embeds "" in its 2-token form: BOS, EOS, no padding.
    ids = tokenizer("", padding="do_not_pad", return_tensors="pt").input_ids
    if ids.shape != (1, 2):
        raise InvalidCheckpointError(f"{root / 'tokenizer'}: empty prompt gave token ids {ids.tolist()}, expected [BOS, EOS]")
    with torch.no_grad():
        embeds = encoder(ids).last_hidden_state.float()
    del encoder  # not needed again: the embedding is all inference uses
    return embeds


def _is_pipeline_folder(folder: Path) -> bool:
    return (folder / "vae" / "config.json").is_file() and (folder / "unet" / "config.json").is_file()


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise CheckpointNotFoundError(
            f"{repo_id!r} is not a local folder and could not be fetched from the Hugging Face hub ({exc})"
        ) from None


def tiny_components(pretrained: bool = True) -> Components:
    """The tiny model's components (its UNet freshly initialised with `pretrained=False`), marked untrained."""
    vae, unet, embeds = build_tiny_components(pretrained=pretrained)
    return Components(vae, unet, embeds, DiffewSConfig(trained=False, name="tiny", family="tiny"), TINY_SPEC, "tiny")


def load_components(spec: str | Path, unet: str | Path | None = None) -> Components:
    """Load a DiffewS model from a spec: "tiny", a folder (DiffewS, SD 2.x pipeline, ModelScope download) or a hub id.

    `unet` names a separate UNet folder (e.g. `coco_fold0/unet`) used over the spec's base.
    """
    spec_str = str(spec)
    if spec_str == TINY_SPEC:
        if unet is not None:
            raise InvalidCheckpointError("a separate UNet cannot be combined with the tiny model")
        return tiny_components()
    from .download import RELEASE_UNETS, download_release, is_release_id

    if is_release_id(spec_str) and not Path(spec_str).exists():  # the official weights, fetched once into the cache
        named = str(unet) if unet is not None and str(unet) in RELEASE_UNETS else None
        spec_str = str(download_release(unets=[named or "incontext"]))
        unet = Path(spec_str) / "weight" / named / "unet" if named else unet
    root = Path(spec_str).expanduser()
    if not root.exists():
        if HUB_ID.match(spec_str) and not spec_str.startswith((".", "/", "~")):
            root = _from_hub(spec_str)
        else:
            raise CheckpointNotFoundError(f"model folder {root} does not exist")
    if not root.is_dir():
        raise InvalidCheckpointError(f"{root} is a file; expected a model folder")
    if (root / MATCHER_CONFIG_NAME).is_file():
        raise InvalidCheckpointError(f"{root} is a matcher folder ({MATCHER_CONFIG_NAME}), not a DiffewS checkpoint: load "
                                     "it as the matcher (python -m model.evaluate --model <folder>)")
    if (root / MODELSCOPE_BASE).is_dir():  # a ModelScope download: its base pipeline, and its in-context UNet unless told
        if unet is None and (root / MODELSCOPE_DEFAULT_UNET).is_dir():
            unet = root / MODELSCOPE_DEFAULT_UNET
        root = root / MODELSCOPE_BASE
    if not _is_pipeline_folder(root):
        if (root / "config.json").is_file() and "UNet" in (root / "config.json").read_text():
            raise InvalidCheckpointError(
                f"{root} is a UNet folder alone; pass it as the separate UNet (DIFFEWS_UNET) over a base pipeline folder"
            )
        raise InvalidCheckpointError(
            f"{root} is not a model folder: expected vae/config.json and unet/config.json "
            f"(a DiffewS or Stable Diffusion 2.x pipeline), or {MODELSCOPE_BASE}/ of a ModelScope download"
        )
    config = DiffewSConfig.load(root) if (root / CONFIG_NAME).is_file() else DiffewSConfig(name=root.name)
    vae = _load_vae(root / "vae")
    unet_folder = Path(unet).expanduser() if unet is not None else root / "unet"
    if not unet_folder.is_dir():
        raise CheckpointNotFoundError(f"UNet folder {unet_folder} does not exist")
    loaded_unet, ref_origin = load_unet(unet_folder)
    embeds = _empty_prompt_embeds(root)
    _check_fit(vae, loaded_unet, embeds, root, unet_folder)
    source = str(root) if unet is None else f"{root} + {unet_folder}"
    if ref_origin == "surgery":  # plain SD weights: not a segmenter until fine-tuned on labels
        config = replace(config, trained=False)
        logger.warning("%s has no conv_in_ref: derived from conv_in (plain SD weights, untrained for segmentation; "
                       "fine-tune before use)", unet_folder)
    return Components(vae, loaded_unet, embeds, config, source, ref_origin)


def _check_fit(vae: AutoencoderKL, unet: UNet2DConditionModel, embeds: torch.Tensor, root: Path, unet_folder: Path) -> None:
    if vae.config.latent_channels != unet.config.in_channels:
        raise InvalidCheckpointError(
            f"{unet_folder / 'config.json'}: in_channels={unet.config.in_channels} does not fit the VAE's "
            f"latent_channels={vae.config.latent_channels} in {root / 'vae'}"
        )
    if embeds.ndim != 3 or embeds.shape[:2] != (1, 2) or embeds.shape[-1] != unet.config.cross_attention_dim:
        raise InvalidCheckpointError(
            f"{unet_folder / 'config.json'}: cross_attention_dim={unet.config.cross_attention_dim} does not fit the "
            f"empty-prompt embedding {tuple(embeds.shape)} from {root}; expected (1, 2, cross_attention_dim)"
        )
