"""Fine-tuning: it learns, it is deterministic and resumable, LoRA and checkpointing work, versions are atomic."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from model import DiffewS, InvalidInputError
from model.data import Sample, make_sample
from model.evaluate import evaluate
from model.train import TrainConfig, finetune
from model.versions import load_version, save_version


def shape_task(n: int, seed: int, size: int = 64) -> list[Sample]:
    """Images with a red disc (label "disc") at a random place on textured noise; masks at `size`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    samples = []
    for i in range(n):
        image = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
        cy, cx, r = rng.integers(14, size - 14), rng.integers(14, size - 14), rng.integers(7, 13)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        image[disc] = (220, 40, 40)
        samples.append(Sample(image, {"disc": disc}, name=f"s{i}"))
    return samples


def iou(model: DiffewS, samples: list[Sample]) -> float:
    return evaluate(model, samples, ["disc"], shots=1, episode_count=12, seed=3).miou


def test_training_lowers_loss_and_raises_iou():
    """A few hundred episodes on a synthetic task: loss falls and 1-shot IoU rises well above the untrained model's."""
    model = DiffewS.tiny(resolution=64)
    train, held_out = shape_task(12, 0), shape_task(8, 1)
    before = iou(model, held_out)
    result = finetune(model, train, TrainConfig(steps=300, max_shots=2, seed=0))
    after = iou(model, held_out)
    first, last = np.mean(result.losses[:30]), np.mean(result.losses[-30:])
    assert last < 0.7 * first, (first, last)
    chance = 100 * np.mean([s.masks["disc"].mean() for s in held_out])  # IoU of guessing "all foreground"
    assert after > max(2 * chance, before + 20), (before, after, chance)


def test_deterministic_with_seed():
    """Two runs with one seed give identical losses."""
    runs = []
    for _ in range(2):
        model = DiffewS.tiny(resolution=64)
        runs.append(finetune(model, shape_task(4, 0), TrainConfig(steps=6, seed=7)).losses)
    assert runs[0] == runs[1]


def test_resume_continues_the_same_run(tmp_path):
    """A 6-step run killed after step 3 and resumed gives the losses of an unbroken 6-step run."""
    config = TrainConfig(steps=6, seed=1, checkpoint_every=3)
    full = finetune(DiffewS.tiny(resolution=64), shape_task(4, 0), config).losses

    def killed_at_3(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(DiffewS.tiny(resolution=64), shape_task(4, 0), config, state_dir=tmp_path / "state", on_step=killed_at_3)
    resumed = finetune(DiffewS.tiny(resolution=64), shape_task(4, 0), config, state_dir=tmp_path / "state")
    np.testing.assert_allclose(resumed.losses, full, rtol=1e-5)


def test_gradient_checkpointing_gives_same_gradients():
    """With checkpointing (recomputation sees the KV-fusion state of its pass) the gradients are unchanged."""
    grads = []
    for checkpointing in (False, True):
        model = DiffewS.tiny(resolution=64)
        captured = {}

        def grab(step, loss, model=model, captured=captured):
            if step == 1:  # gradients of the first episode, before any optimizer step (grad_accum=4)
                captured.update({n: p.grad.clone() for n, p in model.unet.named_parameters() if p.grad is not None})

        finetune(model, shape_task(4, 0), TrainConfig(steps=2, seed=2, gradient_checkpointing=checkpointing,
                                                      grad_accum=4), on_step=grab)
        grads.append(captured)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4)


def test_grad_accum_updates_once_per_group_of_episodes():
    """With grad_accum=3 over 7 episodes the weights move after episodes 3, 6 and the last one only."""
    model = DiffewS.tiny(resolution=64)
    weight = model.unet.conv_out.weight
    seen = [weight.detach().clone()]
    finetune(model, shape_task(4, 0), TrainConfig(steps=7, grad_accum=3, seed=0),
             on_step=lambda step, loss: seen.append(weight.detach().clone()))
    moved = [step for step in range(1, 8) if not torch.equal(seen[step], seen[step - 1])]
    assert moved == [3, 6, 7]


def test_lora_trains_adapters_only_and_round_trips(tmp_path):
    """LoRA mode changes only adapter weights; a saved LoRA version reloads to the same outputs."""
    model = DiffewS.tiny(resolution=64)
    base = {k: v.clone() for k, v in model.unet.state_dict().items()}
    finetune(model, shape_task(6, 0), TrainConfig(steps=20, mode="lora", lora_rank=4, seed=0))
    for name, value in model.unet.state_dict().items():
        if "lora_" not in name:
            torch.testing.assert_close(value, base[name.replace(".base_layer", "")])
    folder = save_version(model, tmp_path, "v1", base={"spec": "tiny"}, parent=None, mode="lora", summary={})
    assert sum(f.stat().st_size for f in folder.iterdir()) < 200_000  # adapters, not the UNet
    loaded = load_version(folder)
    samples = shape_task(3, 5)
    a = model.segment([samples[0].image], model.encode_support([samples[1].image], [samples[1].masks["disc"]]))[0]
    b = loaded.segment([samples[0].image], loaded.encode_support([samples[1].image], [samples[1].masks["disc"]]))[0]
    np.testing.assert_allclose(a.probability, b.probability, atol=1e-5)
    assert loaded.config.trained and loaded.config.name == "v1"


def test_full_version_round_trip_and_never_overwritten(tmp_path):
    """A full version reloads exactly; saving the same name again is refused."""
    model = DiffewS.tiny(resolution=64)
    finetune(model, shape_task(4, 0), TrainConfig(steps=3, seed=0))
    folder = save_version(model, tmp_path, "v1", base={"spec": "tiny"}, parent=None, mode="full", summary={"steps": 3})
    loaded = load_version(folder)
    for name, value in model.unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[name], value)
    from model import InvalidCheckpointError

    with pytest.raises(InvalidCheckpointError, match="never overwritten"):
        save_version(model, tmp_path, "v1", base={"spec": "tiny"}, parent=None, mode="full", summary={})


def test_crash_mid_save_leaves_previous_version_usable(tmp_path, monkeypatch):
    """A failure while writing a version leaves no partial folder, and the previous version still loads."""
    model = DiffewS.tiny(resolution=64)
    save_version(model, tmp_path, "v1", base={"spec": "tiny"}, parent=None, mode="full", summary={})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="disk full"):
        save_version(model, tmp_path, "v2", base={"spec": "tiny"}, parent="v1", mode="full", summary={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]
    load_version(tmp_path / "v1")


@pytest.mark.parametrize(
    "samples,message",
    [
        ([], "empty"),
        ([Sample(np.zeros((64, 64, 3), np.uint8), {})], "without any mask"),
        ([Sample(np.zeros((64, 64, 3), np.uint8), {"a": np.ones((32, 32), bool)})], "mask 'a' is"),
        ([Sample(np.zeros((64, 64, 3), np.uint8), {"a": np.ones((64, 64), bool)})], "two or more images"),
    ],
    ids=["empty", "no-mask", "mask-size", "one-image-per-label"],
)
def test_bad_training_data(samples, message):
    """Unusable training sets raise InvalidInputError saying why."""
    with pytest.raises(InvalidInputError, match=message):
        finetune(DiffewS.tiny(resolution=64), samples, TrainConfig(steps=1))


def test_make_sample_errors():
    """make_sample refuses an image without masks and a mask of another size."""
    with pytest.raises(InvalidInputError, match="without any mask"):
        make_sample(np.zeros((8, 8, 3), np.uint8), {}, 64)
    with pytest.raises(InvalidInputError, match="is 9x8 but its image is 8x8"):
        make_sample(np.zeros((8, 8, 3), np.uint8), {"a": np.ones((8, 9), bool)}, 64)
    with pytest.raises(InvalidInputError, match="mode"):
        TrainConfig(mode="half")


def test_augmentation_keeps_masks_aligned():
    """Flips and scale-crops move image and mask together: the painted pixels stay under the mask."""
    import random

    from model.train import flip_scale_crop

    [sample] = shape_task(1, 4)
    rng = random.Random(0)
    for _ in range(10):
        image, masks = flip_scale_crop(sample.image, sample.masks, rng)
        red = (image[..., 0] > 180) & (image[..., 1] < 90)
        assert image.shape == sample.image.shape and masks["disc"].shape == sample.masks["disc"].shape
        assert (red & masks["disc"]).sum() / max(1, (red | masks["disc"]).sum()) > 0.8


def test_colour_change_is_shared_by_an_episode():
    """One episode's colour change maps equal colours to equal colours in every picture; identity leaves pictures be."""
    import random

    from model.train import colour_change, recolour

    a, b = shape_task(2, 6)
    change = colour_change(random.Random(1))
    assert not np.allclose(change, [1, 1, 1, 1, 1])
    new_a, new_b = recolour(a.image, change), recolour(b.image, change)
    red_a, red_b = new_a[a.masks["disc"]], new_b[b.masks["disc"]]  # both discs were painted (220, 40, 40)
    assert (red_a == red_a[0]).all() and (red_b == red_a[0]).all()
    assert not np.array_equal(red_a[0], [220, 40, 40])
    assert np.array_equal(recolour(a.image, np.ones(5)), a.image)


def test_train_cli_writes_a_loadable_version(tmp_path, capsys):
    """`python -m model.train` on a label-map folder writes a version that loads."""
    from PIL import Image

    from model.train import main

    (tmp_path / "ds" / "train" / "images").mkdir(parents=True)
    (tmp_path / "ds" / "train" / "labels").mkdir(parents=True)
    (tmp_path / "ds" / "classes.txt").write_text("background\ndisc\n")
    for i, s in enumerate(shape_task(4, 9)):
        Image.fromarray(s.image).save(tmp_path / "ds" / "train" / "images" / f"{i}.png")
        Image.fromarray(s.masks["disc"].astype(np.uint8)).save(tmp_path / "ds" / "train" / "labels" / f"{i}.png")
    common = ["--data", str(tmp_path / "ds"), "--resolution", "64", "--out", str(tmp_path / "v")]
    assert main([*common, "--name", "cli1", "--steps", "4", "--grad-accum", "2", "--max-shots", "2", "--augment"]) == 0
    out = capsys.readouterr().out
    assert "4 episodes, 2 optimizer updates" in out and "wrote" in out
    assert load_version(tmp_path / "v" / "cli1").config.name == "cli1"
    summary = json.loads((tmp_path / "v" / "cli1" / "version.json").read_text())
    assert summary["summary"]["steps"] == 4


@pytest.mark.parametrize("args,message", [(["--grad-accum", "0"], "grad_accum must be >= 1, got 0"),
                                          (["--max-shots", "0"], "max_shots must be >= 1, got 0"),
                                          (["--resolution", "60"], "resolution must be a positive multiple of 8")])
def test_train_cli_bad_arguments_exit_2(tmp_path, capsys, args, message):
    """A bad argument ends the CLI with exit status 2 and one line naming it, before any training."""
    from model.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(tmp_path), "--out", str(tmp_path / "v"), "--name", "x", *args])
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert message in line
