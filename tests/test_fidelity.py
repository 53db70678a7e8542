"""Preprocessing as the release does it: mask resizing, the empty-prompt embedding's dtype, what counts as trained."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTextModel

from backend.core.settings import Settings
from backend.core.versions import PLAIN_SD_WARNING, describe_model
from model import DiffewS
from model import checkpoint as model_checkpoint
from model.images import resize_mask, to_mask
from model.train import TrainConfig, finetune
from model.versions import load_version, save_version

from .checkpoints import write_official_layout, write_plain_sd_layout


@pytest.mark.parametrize("shape,size", [((37, 53), 16), ((101, 75), 64), ((9, 7), 8), ((512, 384), 256)])
def test_mask_resize_is_torch_nearest(shape, size):
    """Support masks are resized as the release does (interpolate mode="nearest": source floor(i * in / out))."""
    rng = np.random.default_rng(sum(shape))
    mask = rng.random(shape) > 0.6
    expected = torch.nn.functional.interpolate(torch.tensor(mask, dtype=torch.float32)[None, None], size=(size, size),
                                               mode="nearest")[0, 0].numpy() > 0.5
    np.testing.assert_array_equal(resize_mask(mask, size), expected)


def test_mask_resize_pinned_for_an_odd_size():
    """Rows and columns sampled at floor(i * 5 / 3) = 0, 1, 3 (pixel centres, PIL NEAREST, would take 0, 2, 4)."""
    mask = np.zeros((5, 5), bool)
    mask[1, :] = True  # row 1 is sampled by torch nearest, never by pixel-centre nearest
    mask[:, 3] = True
    out = resize_mask(mask, 3)
    np.testing.assert_array_equal(out, [[0, 0, 1], [1, 1, 1], [0, 0, 1]])
    pil = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((3, 3), Image.NEAREST)) > 127
    assert not np.array_equal(out, pil)


def test_mask_thinner_than_a_cell_is_kept():
    """A one-pixel line that nearest would drop keeps the cells it touches (the release would get an empty mask)."""
    mask = np.zeros((40, 40), bool)
    mask[:, 2] = True
    assert resize_mask(mask, 8)[:, 0].all() and resize_mask(mask, 8).sum() == 8


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_opaque_rgba_mask_is_read_from_its_colours():
    """An RGBA mask opaque everywhere, drawn white on black in RGB: the drawing is the mask, not the alpha."""
    rgb = np.zeros((6, 6, 4), np.uint8)
    rgb[..., 3] = 255
    rgb[1:3, 1:4, :3] = 255
    mask = to_mask(_png(Image.fromarray(rgb, "RGBA")))
    assert mask.sum() == 6 and mask[1:3, 1:4].all()


def test_cut_out_rgba_mask_is_read_from_its_alpha():
    """An RGBA cut-out (colour everywhere, alpha varying) is read from the alpha."""
    rgba = np.full((6, 6, 4), 200, np.uint8)
    rgba[..., 3] = 0
    rgba[2:5, 2:4, 3] = 255
    mask = to_mask(_png(Image.fromarray(rgba, "RGBA")))
    assert mask.sum() == 6 and mask[2:5, 2:4].all()


def test_fp16_text_encoder_gives_a_float32_embedding(tmp_path):
    """An encoder saved in fp16 is run in float32: the embedding equals the fp32 run of the same weights."""
    root = write_official_layout(tmp_path / "official")
    encoder = CLIPTextModel.from_pretrained(root / "text_encoder")
    encoder.half().save_pretrained(root / "text_encoder")
    embeds = model_checkpoint._empty_prompt_embeds(root)
    reference = CLIPTextModel.from_pretrained(root / "text_encoder", dtype=torch.float32)
    with torch.no_grad():
        expected = reference(torch.tensor([[0, 1]])).last_hidden_state
    assert embeds.dtype == torch.float32
    torch.testing.assert_close(embeds, expected, rtol=0, atol=1e-6)


def test_plain_sd_folder_is_untrained(tmp_path):
    """conv_in_ref by surgery: trained=False in the model and in /health's description (with a warning)."""
    plain, official = tmp_path / "sd", tmp_path / "official"
    write_plain_sd_layout(plain)
    write_official_layout(official)
    assert DiffewS.from_pretrained(plain, device="cpu").config.trained is False
    assert DiffewS.from_pretrained(official, device="cpu").config.trained is True
    described = describe_model(Settings(model_spec=str(plain)))
    assert described["trained"] is False and described["warning"] == PLAIN_SD_WARNING
    assert describe_model(Settings(model_spec=str(official)))["trained"] is True



def test_versions_of_the_tiny_model_fine_tune_at_its_rate(tmp_path):
    """The default learning rate follows the architecture, not `trained`: 1e-3 for tiny and its versions."""
    from .test_train import shape_task

    model = DiffewS.tiny(resolution=64)
    first = finetune(model, shape_task(3, 1), TrainConfig(steps=1))
    path = save_version(model, tmp_path, "v1", base={"spec": "tiny"}, parent="tiny", mode="full", summary={})
    child = load_version(path)
    assert child.config.trained is True and child.config.family == "tiny"
    second = finetune(child, shape_task(3, 2), TrainConfig(steps=1))
    assert first.config["lr"] == second.config["lr"] == 1e-3
