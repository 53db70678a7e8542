"""model.evaluate --supports: random against similar supports on the same queries, with copy-support from the same supports."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from model import DiffewS, InvalidInputError
from model.data import Sample
from model.evaluate import main
from model.support_choice import compare_choices, pool_order

RES = 64


def _scenes(n: int, seed: int) -> list[Sample]:
    """Half dark pictures with the "disc" on the left, half bright ones with it on the right."""
    yy, xx = np.mgrid[:RES, :RES]
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        bright = i % 2 == 1
        centre = 46 if bright else 18
        mask = (yy - 32) ** 2 + (xx - centre) ** 2 < 12**2
        image = rng.integers(150, 255, (RES, RES, 3), dtype=np.uint8) if bright else rng.integers(0, 90, (RES, RES, 3), dtype=np.uint8)
        image[mask] = (200, 40, 40)
        samples.append(Sample(image, {"disc": mask}, name=f"s{seed}-{i}"))
    return samples


@pytest.fixture(scope="module")
def model() -> DiffewS:
    return DiffewS.tiny(resolution=RES)


def test_similar_supports_match_the_query_and_copy_support_shows_it(model):
    """Similar picks the same kind of scene, so even copying its supports' masks beats copying random ones;
    both choices run the very same episodes."""
    queries, pool = _scenes(6, 0), _scenes(12, 1)
    rows = compare_choices(model, queries, pool, ["disc"], shots=1, pool_sizes=[12], episode_count=12, seed=0)
    by_choice = {r.choice: r for r in rows}
    assert set(by_choice) == {"random", "similar"}
    assert by_choice["random"].episodes == by_choice["similar"].episodes == 12
    assert by_choice["similar"].copy_miou > 95.0, "similar chose scenes with the disc where the query has it"
    assert by_choice["random"].copy_miou < by_choice["similar"].copy_miou - 20


def test_pools_nest_and_small_pools_drop_classes(model):
    """A pool of P is the first P images of one shuffle; a pool without `shots` images of a class skips it."""
    pool = _scenes(12, 1)
    order = pool_order(pool, 3)
    assert sorted(order) == list(range(12)) and order[:4] == pool_order(pool, 3)[:4]
    rows = compare_choices(model, _scenes(4, 0), pool, ["disc"], shots=5, pool_sizes=[3, 12], episode_count=4, seed=0)
    assert {r.pool_size for r in rows} == {12}
    with pytest.raises(InvalidInputError, match="support choice"):
        compare_choices(model, _scenes(4, 0), pool, ["disc"], shots=1, pool_sizes=[12], choices=["nearest"])


def _split(root, name: str, samples: list[Sample]) -> None:
    (root / name / "images").mkdir(parents=True)
    (root / name / "labels").mkdir(parents=True)
    for s in samples:
        Image.fromarray(s.image).save(root / name / "images" / f"{s.name}.png")
        Image.fromarray(s.masks["disc"].astype(np.uint8)).save(root / name / "labels" / f"{s.name}.png")


def test_cli_prints_the_side_by_side_table(tmp_path, capsys):
    root = tmp_path / "ds"
    _split(root, "val", _scenes(4, 0))
    _split(root, "train", _scenes(8, 1))
    (root / "classes.txt").write_text("background\ndisc\n")
    out = tmp_path / "r.json"
    assert main(["--data", str(root), "--resolution", "64", "--supports", "random", "similar", "--pool-sizes", "4", "all",
                 "--shots", "1", "--episodes", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 1 | 4 | random | 4 |" in printed and "| 1 | 8 | similar | 4 |" in printed
    assert [(r["pool_size"], r["choice"]) for r in json.loads(out.read_text())] == \
        [(4, "random"), (4, "similar"), (8, "random"), (8, "similar")]


@pytest.mark.parametrize("args,named", [
    (["--pool-split", "val"], "--pool-split val is the query split"),
    (["--pool-sizes", "0"], "--pool-sizes takes positive numbers or all"),
    (["--pool-split", "test"], "--pool-split test"),
    (["--shots", "9"], "--shots 9: no class has 9 images"),
], ids=["same-split", "pool-size-0", "missing-split", "too-many-shots"])
def test_cli_bad_support_arguments_exit_2(tmp_path, capsys, args, named):
    root = tmp_path / "ds"
    _split(root, "val", _scenes(4, 0))
    _split(root, "train", _scenes(4, 1))
    (root / "classes.txt").write_text("background\ndisc\n")
    assert main(["--data", str(root), "--resolution", "64", "--supports", "random", "--episodes", "2", *args]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert named in line and "Traceback" not in line
