"""model.evaluate: trivial baselines on the model's own episodes, dropped classes, clean CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from model import DiffewS
from model.data import Sample
from model.evaluate import common_classes, evaluate, format_table, main
from model.scoring import all_foreground, copy_support, empty

RES = 64


def _same_mask_samples(n: int = 5) -> list[Sample]:
    """Different noisy pictures that all share one mask of class "disc" (and a second class on two of them)."""
    yy, xx = np.mgrid[:RES, :RES]
    mask = (yy - 30) ** 2 + (xx - 24) ** 2 < 15**2
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        image = rng.integers(0, 90, (RES, RES, 3), dtype=np.uint8)
        image[mask] = (200, 60 + 10 * i, 40)
        masks = {"disc": mask.copy()}
        if i < 2:
            masks["corner"] = (yy < 8) & (xx < 8)
        samples.append(Sample(image, masks, name=f"s{i}"))
    return samples


@pytest.fixture(scope="module")
def model() -> DiffewS:
    return DiffewS.tiny(resolution=RES)


def test_baselines_on_identical_masks(model):
    """Support and query masks identical: copy scores 100, all-foreground the foreground fraction, empty 0."""
    samples = _same_mask_samples()
    result = evaluate(model, samples, ["disc"], shots=2, episode_count=6, seed=1, baselines=True)
    by_name = {b.predictor: b for b in result.baselines}
    assert set(by_name) == {"copy support", "all foreground", "empty"}
    fraction = 100.0 * samples[0].masks["disc"].mean()
    assert by_name["copy support"].miou == pytest.approx(100.0)
    assert by_name["all foreground"].miou == pytest.approx(fraction)
    assert by_name["empty"].miou == 0.0
    assert by_name["all foreground"].fg_predicted == pytest.approx(100.0)
    assert by_name["empty"].fg_predicted == 0.0
    for r in (result, *result.baselines):
        assert r.fg_true == pytest.approx(fraction) and r.episodes == 6
    assert result.predictor == "model" and 0.0 <= result.miou <= 100.0


def test_baseline_predictors():
    """copy_support is the majority of the supports; the others ignore them."""
    a, b, c = (np.zeros((4, 4), bool) for _ in range(3))
    a[0, :] = b[0, :2] = c[1, :] = True
    assert copy_support([a, b, c], (4, 4)).sum() == 2  # only (0,0) and (0,1) are in two of three
    assert all_foreground([a], (4, 4)).all() and not empty([a], (4, 4)).any()


def test_dropped_classes_are_named_and_common_miou(model):
    """A class on two images cannot make 2-shot episodes: dropped with the reason; common mIoU uses the shared class."""
    samples = _same_mask_samples()
    one = evaluate(model, samples, ["disc", "corner"], shots=1, episode_count=4, seed=0)
    two = evaluate(model, samples, ["disc", "corner"], shots=2, episode_count=4, seed=0)
    assert one.dropped == {} and set(one.per_class) == {"disc", "corner"}
    assert two.dropped == {"corner": "2 images hold it; 2-shot needs 3"} and set(two.per_class) == {"disc"}
    assert common_classes([one, two]) == ["disc"]
    table = format_table([one, two])
    assert "mIoU on 1 common" in table and "2-shot dropped: corner (2 images hold it; 2-shot needs 3)" in table
    row = next(line for line in table.splitlines() if line.startswith("| 1 | model"))
    assert f"| {one.per_class['disc']:.2f} |" in row  # common mIoU of the 1-shot row is disc's IoU alone


def _dataset(root, n: int = 5):
    """A label-map folder (val split only) of the identical-mask samples."""
    (root / "val" / "images").mkdir(parents=True)
    (root / "val" / "labels").mkdir(parents=True)
    (root / "classes.txt").write_text("background\ndisc\ncorner\n")
    for s in _same_mask_samples(n):
        label = np.zeros((RES, RES), np.uint8)
        label[s.masks["disc"]] = 1
        if "corner" in s.masks:
            label[s.masks["corner"]] = 2
        Image.fromarray(s.image).save(root / "val" / "images" / f"{s.name}.png")
        Image.fromarray(label).save(root / "val" / "labels" / f"{s.name}.png")
    return root


def test_cli_prints_baselines_and_writes_json(tmp_path, capsys):
    data = _dataset(tmp_path / "ds")
    out_json = tmp_path / "r.json"
    assert main(["--data", str(data), "--resolution", "64", "--shots", "1", "--episodes", "4",
                 "--json", str(out_json)]) == 0
    captured = capsys.readouterr()
    assert "| 1 | copy support |" in captured.out and "| 1 | empty |" in captured.out
    assert "expected run time: about" in captured.err
    [result] = json.loads(out_json.read_text())
    assert result["episodes"] == 4 and [b["predictor"] for b in result["baselines"]] == \
        ["copy support", "all foreground", "empty"]


@pytest.mark.parametrize("args,named", [
    (["--shots", "0"], "--shots must be at least 1, got 0"),
    (["--episodes", "0"], "--episodes must be at least 1, got 0"),
    (["--resolution", "100"], "--resolution must be a positive multiple of 8, got 100"),
    (["--split", "test"], "--split test: no such split"),
    (["--shots", "9"], "--shots 9: needs a class held by 10 images of split val; the most is 5 (disc)"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--model", "/nonexistent/weights"], "--model /nonexistent/weights:"),
], ids=["shots-0", "episodes-0", "resolution", "split", "too-many-shots", "limit", "model"])
def test_cli_bad_arguments_exit_2_with_one_line(tmp_path, capsys, args, named):
    data = _dataset(tmp_path / "ds")
    assert main(["--data", str(data), "--resolution", "64", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    [line] = captured.err.strip().splitlines()
    assert named in line
    if "split" in args:
        assert line.endswith("it has: val")


def test_cli_data_errors(tmp_path, capsys):
    """A missing folder or one without classes.txt: exit 2 naming --data."""
    assert main(["--data", str(tmp_path / "nope")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["--data", str(tmp_path / "empty")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "--data" in lines[0] and "no such folder" in lines[0] and "classes.txt is missing" in lines[1]


def test_second_setting_failing_keeps_the_first(tmp_path, capsys, monkeypatch):
    """Shots 1 then 2; the 2-shot run fails: exit 2, and the JSON already holds the 1-shot result."""
    import model.evaluate as evaluate_module
    from model.errors import InvalidInputError

    real = evaluate_module.evaluate

    def failing_second(*args, shots, episode_count, **kwargs):
        if shots == 2 and episode_count == 3:  # the run itself, not the one-episode timing before it
            raise InvalidInputError("a query image could not be read")
        return real(*args, shots=shots, episode_count=episode_count, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", failing_second)
    data, out_json = _dataset(tmp_path / "ds"), tmp_path / "r.json"
    assert main(["--data", str(data), "--resolution", "64", "--shots", "1", "2", "--episodes", "3",
                 "--json", str(out_json)]) == 2
    assert [r["shots"] for r in json.loads(out_json.read_text())] == [1]
    err = capsys.readouterr().err
    assert "--shots 2: a query image could not be read" in err and "keeps the finished settings" in err


def test_ranking_quality_of_perfect_and_reversed_scores():
    from model.scoring import ranking_quality

    ious = [0.1, 0.2, 0.3, 0.6, 0.8, 0.9]
    perfect = ranking_quality([0.05, 0.1, 0.2, 0.5, 0.7, 0.9], ious)
    assert perfect["spearman"] == pytest.approx(1.0) and perfect["auroc"] == 1.0 and perfect["bad_share"] == 0.5
    reversed_ = ranking_quality([0.9, 0.7, 0.5, 0.2, 0.1, 0.05], ious)
    assert reversed_["spearman"] == pytest.approx(-1.0) and reversed_["auroc"] == 0.0
    assert np.isnan(ranking_quality([0.5, 0.6], [0.9, 0.8])["auroc"])  # no bad mask: nothing to tell apart


def test_split_tokens_partitions_every_layer(model):
    import torch

    from model.support import split_tokens

    s = _same_mask_samples(3)
    memory = model.encode_support([x.image for x in s], [x.masks["disc"] for x in s])
    parts = split_tokens(memory, 2, torch.Generator().manual_seed(0))
    for name, (k, _) in memory.kv.items():
        halves = [p.kv[name][0] for p in parts]
        assert sum(h.shape[1] for h in halves) == k.shape[1]
        rows = {tuple(r.tolist()) for h in halves for r in h[0]}
        assert rows == {tuple(r.tolist()) for r in k[0]}  # disjoint and complete


def test_score_ranking_rates_each_candidate(model, tmp_path, capsys):
    from model.evaluate import SCORES

    samples = _same_mask_samples()
    result = evaluate(model, samples, ["disc", "corner"], shots=1, episode_count=8, seed=0, score_ranking=True)
    assert set(result.score_ranking) == set(SCORES)
    for q in result.score_ranking.values():
        assert set(q) == {"spearman", "auroc", "bad_share", "spearman_within_label", "auroc_within_label",
                          "labels_within_label"} and 0.0 <= q["bad_share"] <= 1.0
    data = _dataset(tmp_path / "ds")
    assert main(["--data", str(data), "--resolution", "64", "--shots", "1", "--episodes", "4", "--score-ranking"]) == 0
    assert "| 1 | agreement |" in capsys.readouterr().out


@pytest.mark.parametrize("prompt", ["box", "point"])
def test_prompted_model_on_the_same_episodes(model, prompt):
    """--prompt adds the prompted model beside the plain one; a box prompt never marks pixels outside the box."""
    samples = _same_mask_samples()
    result = evaluate(model, samples, ["disc"], shots=1, episode_count=4, seed=0, prompt=prompt)
    prompted = result.prompted[0]
    assert [p.predictor for p in result.prompted[1:]] == (["the box itself (all foreground)"] if prompt == "box" else [])
    assert prompted.predictor == f"model + {prompt} prompt" and prompted.episodes == result.episodes == 4
    assert prompted.fg_true == result.fg_true
    if prompt == "box":  # the disc's box is 31% of the image: nothing predicted beyond it
        assert prompted.fg_predicted <= 100.0 * (29 * 29) / (64 * 64) + 1e-6
    table = format_table([result])
    assert f"| 1 | model + {prompt} prompt |" in table
    with pytest.raises(Exception, match="prompt must be 'box' or 'point'"):
        evaluate(model, samples, ["disc"], shots=1, episode_count=1, prompt="scribble")


def test_within_label_ranking_sees_through_a_score_that_only_tells_labels_apart():
    """A score equal to each label's mean IoU ranks all masks well but none within a label; a score that
    follows IoU inside each label ranks both ways."""
    from model.scoring import ranking_quality, ranking_quality_within

    labels = ["sky"] * 6 + ["car"] * 6
    ious = [0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0]
    by_label = [0.75 if label == "sky" else 0.2 for label in labels]
    assert ranking_quality(by_label, ious)["spearman"] > 0.8
    assert np.isnan(ranking_quality_within(by_label, ious, labels)["spearman"])  # constant inside each label
    noisy = [m + 0.01 * ((-1) ** i) for i, m in enumerate(by_label)]
    assert abs(ranking_quality_within(noisy, ious, labels)["spearman"]) < 0.3
    following = [iou + (0.5 if label == "sky" else 0.0) for iou, label in zip(ious, labels)]
    within = ranking_quality_within(following, ious, labels)
    assert within["spearman"] == pytest.approx(1.0) and within["labels"] == 2
