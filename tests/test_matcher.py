"""model/matcher.py: the matcher's contract (support memories, queries, outputs), bounds, versions and errors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from model import DiffewS
from model.errors import InvalidCheckpointError, InvalidInputError, SupportNotSetError
from model.matcher import Matcher, ProjectionHead, guided_upsample
from model.matcher_config import MatcherConfig
from model.scoring import copy_support, episode_iou
from model.support import compose

from bench.synthetic import square_scene


@pytest.fixture(scope="module")
def matcher() -> Matcher:
    """The default matcher (effnet-lite0 from its wheel) at 64 px."""
    return Matcher.from_pretrained("effnet-lite0", resolution=64)


def test_segments_the_square_better_than_copying_the_support(matcher):
    """On synthetic scenes whose square moves, the matcher finds it in the query where copying the support's
    mask (which never looks at the query) does not."""
    ious, copied = [], []
    for seed in range(4):
        image, mask = square_scene(seed, (96, 128))
        query, truth = square_scene(seed + 10, (96, 128))
        out = matcher.segment([query], matcher.encode_support([image], [mask]))[0]
        assert out.mask.shape == truth.shape and 0.0 <= out.score <= 1.0
        ious.append(episode_iou(out.mask, truth, np.ones_like(truth)))
        copied.append(episode_iou(copy_support([mask], truth.shape), truth, np.ones_like(truth)))
    assert np.mean(ious) > 0.6 and np.mean(ious) > np.mean(copied) + 0.3, (ious, copied)


def test_examples_compose_to_the_support_set(matcher):
    """encode_examples gives one cached memory per example; composed they segment exactly as encode_support."""
    pairs = [square_scene(i) for i in range(3)]
    images, masks = [p[0] for p in pairs], [p[1] for p in pairs]
    parts = matcher.encode_examples(images, masks)
    assert [p.num_shots for p in parts] == [1, 1, 1] and all(p.descriptors.shape[0] == 1 for p in parts)
    assert matcher.encode_examples(images[:1], masks[:1])[0] is parts[0]  # cached by content
    query = square_scene(9)[0]
    a = matcher.segment([query], compose(parts))[0]
    b = matcher.segment([query], matcher.encode_support(images, masks, use_cache=False))[0]
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.probability, b.probability, atol=1e-6)


def test_support_vectors_are_bounded():
    """Each example keeps at most max_vectors foreground and background vectors, whatever its resolution."""
    small = Matcher.from_pretrained("effnet-lite0", resolution=128)
    small.config = replace(small.config, max_vectors=10)
    image, mask = square_scene(0, (256, 256))
    memory = small.encode_support([image, image[::-1].copy()], [mask, mask[::-1].copy()])
    assert memory.kv["fg"][0].shape[1] == 20 and memory.kv["bg"][0].shape[1] == 20


def test_many_labels_and_per_query_supports(matcher):
    """segment_many_encoded takes one memory per label, or one mapping per query, and answers every pair."""
    (a, ma), (b, mb) = square_scene(1), square_scene(2)
    memories = {"x": matcher.encode_support([a], [ma]), "y": matcher.encode_support([b], [mb])}
    queries = matcher.encode_queries([square_scene(3)[0], square_scene(4, (40, 40))[0]])
    shared = matcher.segment_many_encoded(queries, memories)
    assert [sorted(o) for o in shared] == [["x", "y"], ["x", "y"]] and shared[1]["x"].mask.shape == (40, 40)
    own = matcher.segment_many_encoded(queries, [{"x": memories["x"]}, {"y": memories["y"]}])
    np.testing.assert_array_equal(own[0]["x"].mask, shared[0]["x"].mask)
    assert list(own[1]) == ["y"]
    picked = queries.select([1])
    assert len(picked) == 1 and picked.sizes == [(40, 40)] and picked.guides.shape[0] == 1
    assert queries.descriptors.shape == (2, 472 * 4)


def test_bad_inputs_raise_typed_errors(matcher):
    """Empty supports, mismatched counts, empty masks, a released memory and a bad threshold are named."""
    image, mask = square_scene(0)
    with pytest.raises(InvalidInputError, match="at least one"):
        matcher.encode_support([], [])
    with pytest.raises(InvalidInputError, match="1 support images but 2 masks"):
        matcher.encode_support([image], [mask, mask])
    with pytest.raises(InvalidInputError, match="support mask 0 is empty"):
        matcher.encode_support([image], [np.zeros_like(mask)])
    with pytest.raises(InvalidInputError, match="non-empty sequence"):
        matcher.encode_queries([])
    memory = matcher.encode_support([image], [mask], use_cache=False)
    with pytest.raises(InvalidInputError, match="threshold_ratio"):
        matcher.segment([image], memory, threshold_ratio=1.5)
    memory.release()
    with pytest.raises(SupportNotSetError):
        matcher.segment([image], memory)


def test_guided_upsampling_follows_the_guide_edge():
    """A blurry low-resolution step upsampled with a sharp guide keeps the guide's edge: the map changes most
    where the guide does, and radius 0 is plain bilinear upsampling."""
    guide = torch.zeros(1, 1, 64, 64)
    guide[..., 37:] = 1.0  # an edge between columns 36 and 37, off the 8-pixel grid
    low = torch.zeros(1, 1, 8, 8)
    low[..., 4:] = 1.0
    low[..., 4] = 0.5
    sharp = guided_upsample(low, guide, 4, 1e-3)[0, 0, 32]
    assert int(torch.argmax(sharp[1:] - sharp[:-1])) == 36
    plain = torch.nn.functional.interpolate(low, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(guided_upsample(low, guide, 0, 1e-3), plain)


def test_head_version_round_trip(tmp_path, matcher):
    """A matcher with a projection head saves as kilobytes-to-megabytes and loads back to the same masks."""
    head = ProjectionHead(472, 32)
    torch.nn.init.normal_(head.proj.weight, std=0.1, generator=torch.Generator().manual_seed(0))
    version = matcher.with_head(head)
    version.save_pretrained(tmp_path / "v1")
    size = sum(p.stat().st_size for p in (tmp_path / "v1").iterdir())
    assert 10_000 < size < 5_000_000
    loaded = Matcher.from_pretrained(tmp_path / "v1")
    assert loaded.config == version.config and loaded.config.head_dim == 32
    image, mask = square_scene(0)
    query = square_scene(5)[0]
    a = version.segment([query], version.encode_support([image], [mask]))[0]
    b = loaded.segment([query], loaded.encode_support([image], [mask]))[0]
    np.testing.assert_allclose(a.probability, b.probability, atol=1e-6)


def test_identity_head_is_the_training_free_matcher(matcher):
    """A fresh head starts as the identity on all channels: it changes nothing until trained."""
    version = matcher.with_head(ProjectionHead(472, 472))
    image, mask = square_scene(0)
    query = square_scene(5)[0]
    a = matcher.segment([query], matcher.encode_support([image], [mask]))[0]
    b = version.segment([query], version.encode_support([image], [mask]))[0]
    np.testing.assert_allclose(a.probability, b.probability, atol=1e-5)


def test_other_family_folders_are_refused(tmp_path, matcher):
    """A DiffewS folder given to the matcher, or a matcher folder given to DiffewS, is refused by name."""
    DiffewS.tiny(resolution=64).save_pretrained(tmp_path / "diffews")
    with pytest.raises(InvalidCheckpointError, match="not a matcher folder.*DIFFEWS_MODEL"):
        Matcher.from_pretrained(tmp_path / "diffews")
    matcher.save_pretrained(tmp_path / "matcher")
    with pytest.raises(InvalidCheckpointError, match="is a matcher folder"):
        DiffewS.from_pretrained(tmp_path / "matcher")


def test_damaged_version_files_are_refused(tmp_path, matcher):
    """A head file that is missing or damaged, or a config with an unknown key, is named when loading."""
    version = matcher.with_head(ProjectionHead(472, 16))
    version.save_pretrained(tmp_path / "v")
    (tmp_path / "v" / "matcher_head.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InvalidCheckpointError, match="matcher_head.safetensors: cannot read"):
        Matcher.from_pretrained(tmp_path / "v")
    (tmp_path / "v" / "matcher_head.safetensors").unlink()
    with pytest.raises(InvalidCheckpointError, match="is missing"):
        Matcher.from_pretrained(tmp_path / "v")
    (tmp_path / "v" / "matcher_config.json").write_text('{"backbone": "effnet-lite0", "colour": 1}')
    with pytest.raises(InvalidCheckpointError, match="keys among"):
        Matcher.from_pretrained(tmp_path / "v")
    with pytest.raises(InvalidCheckpointError, match="multiple of 32"):
        MatcherConfig(resolution=100)


def _square_samples(count: int) -> list:
    """Training samples of `count` 64 px square scenes, one label "square"."""
    from model.data import make_sample

    return [make_sample(image, {"square": mask}, 64) for image, mask in (square_scene(i, (64, 64)) for i in range(count))]


def _tuned(model: Matcher) -> dict[str, torch.Tensor]:
    """Clones of the weights of the model's backbone's last DEFAULT_TUNED_BLOCKS blocks."""
    from model.matcher_train import DEFAULT_TUNED_BLOCKS

    return {k: v.clone() for k, v in model.backbone.tuned_state(DEFAULT_TUNED_BLOCKS).items()}


def test_finetuning_trains_a_copy_of_the_head_and_blocks(matcher):
    """trainable_copy + finetune train a head and the backbone's last blocks on copies: the served matcher (with or
    without a head) is untouched, and training continues from a version's head and blocks."""
    from model.matcher_train import DEFAULT_TUNED_BLOCKS
    from model.train import TrainConfig, finetune
    from model.versions import trainable_copy

    samples = _square_samples(4)
    served = _tuned(matcher)
    first = trainable_copy(matcher, "lora")
    result = finetune(first, samples, TrainConfig(steps=4, seed=0))
    assert matcher.head is None and first.head is not None and result.config["mode"] == "head"
    assert first.config.tuned_blocks == DEFAULT_TUNED_BLOCKS == result.config["tuned_blocks"]
    assert set(result.weights) == {"proj.weight", *served} and result.steps == 4
    assert first.backbone is not matcher.backbone and first.descriptor_space != matcher.descriptor_space
    for name, weight in _tuned(matcher).items():
        torch.testing.assert_close(weight, served[name])
    assert any(not torch.equal(w, served[k]) for k, w in _tuned(first).items() if k.endswith("conv.weight"))
    assert all(torch.equal(w, served[k]) for k, w in _tuned(first).items() if "._bn" in k)  # batch norm as pretrained
    before, blocks = first.head.proj.weight.clone(), _tuned(first)
    second = trainable_copy(first, "lora")
    finetune(second, samples, TrainConfig(steps=4, seed=1, lr=0.1))
    torch.testing.assert_close(first.head.proj.weight, before)
    for name, weight in _tuned(first).items():
        torch.testing.assert_close(weight, blocks[name])
    assert not torch.equal(second.head.proj.weight, before) and second.config.tuned_blocks == DEFAULT_TUNED_BLOCKS
    assert any(not torch.equal(w, blocks[k]) for k, w in _tuned(second).items() if k.endswith("conv.weight"))


def test_head_only_training_shares_the_backbone(matcher):
    """TrainConfig(tuned_blocks=0) trains the head alone over the served backbone itself; a version with tuned
    blocks trained on that way keeps them (they are part of its features) without changing them."""
    from model.train import TrainConfig, finetune
    from model.versions import trainable_copy

    samples = _square_samples(3)
    head_only = trainable_copy(matcher, "lora")
    result = finetune(head_only, samples, TrainConfig(steps=2, seed=0, tuned_blocks=0))
    assert head_only.backbone is matcher.backbone and set(result.weights) == {"proj.weight"}
    assert head_only.config.tuned_blocks == 0 and head_only.descriptor_space == matcher.descriptor_space
    tuned = trainable_copy(matcher, "lora")
    finetune(tuned, samples, TrainConfig(steps=2, seed=0, tuned_blocks=2))
    blocks = {k: v.clone() for k, v in tuned.backbone.tuned_state(2).items()}
    again = trainable_copy(tuned, "lora")
    finetune(again, samples, TrainConfig(steps=2, seed=1, tuned_blocks=0, lr=0.1))
    assert again.config.tuned_blocks == 2 and again.backbone is tuned.backbone
    for name, weight in again.backbone.tuned_state(2).items():
        torch.testing.assert_close(weight, blocks[name])


def test_tuned_blocks_out_of_range_are_refused(matcher):
    """More blocks than the backbone has, or a negative count, is a typed error naming the backbone or setting."""
    from model.train import TrainConfig, finetune
    from model.versions import trainable_copy

    with pytest.raises(InvalidInputError, match="tuned_blocks must be >= 0"):
        TrainConfig(tuned_blocks=-1)
    with pytest.raises(InvalidInputError, match="'effnet-lite0' cannot train its last 99 blocks: at most its last 16"):
        finetune(trainable_copy(matcher, "lora"), _square_samples(2), TrainConfig(steps=1, tuned_blocks=99))
    with pytest.raises(InvalidCheckpointError, match="tuned_blocks must be >= 0"):
        MatcherConfig(tuned_blocks=-2)


def test_version_with_tuned_blocks_round_trip(tmp_path, matcher):
    """A version with tuned blocks saves them (matcher_blocks.safetensors), loads back to the same masks, and
    attached over a served base copies the base's backbone instead of changing it."""
    from model.train import TrainConfig, finetune
    from model.versions import attach_version, save_version, trainable_copy

    model = trainable_copy(matcher, "lora")
    result = finetune(model, _square_samples(3), TrainConfig(steps=3, seed=0, lr=0.05))
    folder = save_version(model, tmp_path, "v1", base={"spec": "effnet-lite0"}, parent=None, mode="head",
                          summary={}, weights=result.weights)
    assert (folder / "matcher_blocks.safetensors").is_file()
    served = _tuned(matcher)
    loaded = Matcher.from_pretrained(folder)
    attached = attach_version(matcher, folder)
    assert loaded.config.tuned_blocks == attached.config.tuned_blocks == model.config.tuned_blocks
    assert attached.backbone is not matcher.backbone
    assert loaded.descriptor_space == attached.descriptor_space == model.descriptor_space != matcher.descriptor_space
    for name, weight in _tuned(matcher).items():
        torch.testing.assert_close(weight, served[name])
    image, mask = square_scene(0)
    query = square_scene(5)[0]
    outs = [m.segment([query], m.encode_support([image], [mask]))[0] for m in (model, loaded, attached)]
    np.testing.assert_allclose(outs[0].probability, outs[1].probability, atol=1e-6)
    np.testing.assert_allclose(outs[0].probability, outs[2].probability, atol=1e-6)


def test_damaged_tuned_blocks_are_refused(tmp_path, matcher):
    """A blocks file that is missing, damaged, or of other blocks (another backbone's, or fewer blocks than the
    config names), or a config naming more blocks than the backbone has, is named when loading."""
    from safetensors.torch import save_file

    tuned = matcher.with_head(None, replace(matcher.config, tuned_blocks=2))
    tuned.save_pretrained(tmp_path / "v")
    blocks = tmp_path / "v" / "matcher_blocks.safetensors"
    good = blocks.read_bytes()
    blocks.write_bytes(b"damaged")
    with pytest.raises(InvalidCheckpointError, match="matcher_blocks.safetensors: cannot read"):
        Matcher.from_pretrained(tmp_path / "v")
    save_file({k: v.contiguous() for k, v in matcher.backbone.tuned_state(1).items()}, blocks)
    with pytest.raises(InvalidCheckpointError, match="does not fit the last 2 blocks of backbone 'effnet-lite0'"):
        Matcher.from_pretrained(tmp_path / "v")
    lite1 = {k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if v.ndim else v
             for k, v in matcher.backbone.tuned_state(2).items()}
    save_file(lite1, blocks)
    with pytest.raises(InvalidCheckpointError, match="does not fit .*first mismatch: net._blocks"):
        Matcher.from_pretrained(tmp_path / "v")
    blocks.unlink()
    with pytest.raises(InvalidCheckpointError, match="names 2 tuned backbone blocks but matcher_blocks.safetensors is missing"):
        Matcher.from_pretrained(tmp_path / "v")
    blocks.write_bytes(good)
    assert Matcher.from_pretrained(tmp_path / "v").config.tuned_blocks == 2
    (tmp_path / "v" / "matcher_config.json").write_text('{"backbone": "effnet-lite0", "tuned_blocks": 40}')
    with pytest.raises(InvalidCheckpointError, match="cannot train its last 40 blocks"):
        Matcher.from_pretrained(tmp_path / "v")


def test_mirrored_episodes_use_the_mirrored_images_features(matcher):
    """TRAIN_AUGMENT for the matcher's head: each episode image is drawn as it is or mirrored, with the features
    of the mirrored image (not mirrored features) and its mirrored mask; training with it runs."""
    from model.data import make_sample
    from model.matcher_train import _EpisodeData
    from model.train import TrainConfig, finetune
    from model.versions import trainable_copy

    image, mask = square_scene(3, (64, 64))
    data = _EpisodeData(matcher.backbone, [make_sample(image, {"square": mask}, 64)], 5, matcher.device, flip=True)
    mirrored = _EpisodeData(matcher.backbone, [make_sample(image[:, ::-1].copy(), {"square": mask[:, ::-1].copy()}, 64)],
                            5, matcher.device)
    torch.testing.assert_close(data.features([0], [1]), mirrored.features([0]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(data.cover[1][0]["square"], mirrored.cover[0][0]["square"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        drawn = {round(float(data.draw([0], gen)[1][0]["square"][:, :2].sum()), 4) for _ in range(20)}
    assert len(drawn) == 2  # both ways are drawn (the square sits off-centre)
    samples = _square_samples(3)
    result = finetune(trainable_copy(matcher, "lora"), samples, TrainConfig(steps=3, seed=0, augment=True))
    assert result.steps == 3 and result.config["augment"] is True


def test_episode_features_split_at_the_tuned_blocks_are_the_matchers(matcher):
    """Training runs the backbone in two parts (frozen, then the tuned blocks); at any split the features are the
    matcher's own."""
    from model.matcher_train import _EpisodeData

    samples = _square_samples(2)
    pixels = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float().div(255.0)
    whole = matcher.backbone_features(pixels)
    for tuned in (0, 1, 5, 16):
        with torch.no_grad():
            split = _EpisodeData(matcher.backbone, samples, tuned, matcher.device).features([0, 1])
        torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)


def test_a_support_without_background_and_split_halves(matcher):
    """A support mask covering the whole image has no background vector: queries still segment (nothing
    matches background); split_tokens gives both halves every entry even with a single vector."""
    from model.support import split_tokens

    image, _ = square_scene(0, (64, 64))
    full = np.ones((64, 64), bool)
    memory = matcher.encode_support([image], [full])
    assert memory.kv["bg"][0].shape[1] == 0
    assert matcher.segment([image], memory)[0].mask.all()
    small = np.zeros((64, 64), bool)
    small[:8, :8] = True  # one stride-8 cell of foreground
    halves = split_tokens(matcher.encode_support([image], [small]), 2, torch.Generator().manual_seed(0))
    assert all(set(h.kv) == {"fg", "bg"} for h in halves)
    assert [h.kv["fg"][0].shape[1] for h in halves] == [1, 0]
    assert matcher.segment([image], halves[1])[0].mask.shape == (64, 64)


def test_matcher_masks_are_scored_by_sharpness(matcher):
    """The matcher's score is the share of its mask drawn sharply (the candidate that ranked best), in [0, 1]."""
    from model.scoring import sharpness_score

    image, mask = square_scene(0, (64, 64))
    out = matcher.segment([square_scene(3, (64, 64))[0]], matcher.encode_support([image], [mask]))[0]
    small = out.probability > out.threshold
    assert 0.0 < out.score <= 1.0 and out.score == pytest.approx(sharpness_score(out.probability, out.threshold, small))
