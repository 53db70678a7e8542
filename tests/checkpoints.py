"""Build tiny checkpoint folders in the layouts users have: official DiffewS, plain SD 2.x, ModelScope."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from model.tiny import TINY_CROSS_DIM, TINY_UNET_CONFIG, build_tiny_components

VOCAB = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3}


def write_text_encoder(root: Path, seed: int = 0) -> None:
    """A tiny CLIP text encoder and tokenizer in SD's text_encoder/ and tokenizer/ folders."""
    tok_dir = root / "tokenizer"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps(VOCAB))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt")).save_pretrained(tok_dir)
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(VOCAB), hidden_size=TINY_CROSS_DIM, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    CLIPTextModel(config).save_pretrained(root / "text_encoder")


def write_official_layout(root: Path, seed: int = 0) -> Path:
    """An official DiffewS pipeline folder: vae/, text_encoder/, tokenizer/, unet/ with conv_in_ref."""
    vae, unet, _ = build_tiny_components(seed)
    with torch.no_grad():  # make conv_in_ref differ from the surgery so loading it is observable
        unet.conv_in_ref.weight.normal_(generator=torch.Generator().manual_seed(seed + 1))
    vae.save_pretrained(root / "vae")
    unet.save_pretrained(root / "unet")
    write_text_encoder(root, seed)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


def write_plain_sd_layout(root: Path, seed: int = 0) -> UNet2DConditionModel:
    """A plain SD 2.x pipeline folder (no conv_in_ref); returns its UNet for numeric checks."""
    vae, _, _ = build_tiny_components(seed)
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    vae.save_pretrained(root / "vae")
    unet.save_pretrained(root / "unet")
    write_text_encoder(root, seed)
    return unet


def write_separate_unet(folder: Path, seed: int = 5) -> UNet2DConditionModel:
    """A coco_fold*/incontext-style unet/ folder alone, with conv_in_ref; returns the UNet."""
    _, unet, _ = build_tiny_components(seed)
    unet.save_pretrained(folder)
    return unet
