"""Command lines: the Label Studio export converter feeding model.evaluate, and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from backend.__main__ import main as backend_main
from backend.core.errors import BadRequest
from backend.core.export import export_to_label_map
from backend.core.rle import mask_to_rle
from model.data import load_label_map

from bench.synthetic import square_scene


def _export(tmp_path, n=3):
    images = tmp_path / "media"
    images.mkdir()
    tasks = []
    for i in range(n):
        image, mask = square_scene(i, (40, 60))
        Image.fromarray(image).save(images / f"scene{i}.png")
        brush = {"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": 60, "original_height": 40,
                 "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": ["square"]}}
        poly = {"from_name": "poly", "to_name": "image", "type": "polygonlabels", "original_width": 60, "original_height": 40,
                "value": {"points": [[0, 0], [10, 0], [10, 10]], "polygonlabels": ["corner"]}}
        tasks.append({"id": i + 1, "data": {"image": f"/data/upload/1/0123abcd-scene{i}.png"},
                      "annotations": [{"was_cancelled": True, "result": []}, {"was_cancelled": False, "result": [brush, poly]}]})
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    return path, images


def test_export_to_label_map_round_trip(tmp_path):
    """An export with brush and polygon labels becomes a label-map dataset whose masks match the brushes."""
    export, images = _export(tmp_path)
    info = export_to_label_map(export, images, tmp_path / "ds")
    assert info == {"tasks": 3, "classes": ["background", "corner", "square"]}
    classes, samples = load_label_map(tmp_path / "ds", "val", 64)
    assert classes == ["corner", "square"] and len(samples) == 3
    _, mask = square_scene(0, (40, 60))
    small = np.asarray(Image.fromarray(mask).resize((64, 64), Image.NEAREST))
    assert (samples[0].masks["square"] == (small & ~samples[0].masks.get("corner", np.zeros_like(small)))).mean() > 0.99


def test_labelmap_cli_then_evaluate(tmp_path, capsys):
    """`python -m backend labelmap` then `python -m model.evaluate` print a table with mIoU."""
    from model.evaluate import main as evaluate_main

    export, images = _export(tmp_path, n=4)
    assert backend_main(["labelmap", "--export", str(export), "--images", str(images), "--out", str(tmp_path / "ds")]) == 0
    assert evaluate_main(["--data", str(tmp_path / "ds"), "--model", "tiny", "--resolution", "64", "--shots", "1",
                          "--episodes", "4", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "| shots | predictor | episodes | mIoU |" in out and "| 1 | model | 4 |" in out
    [result] = json.loads((tmp_path / "r.json").read_text())
    assert result["shots"] == 1 and result["episodes"] == 4 and 0 <= result["miou"] <= 100


def test_export_errors(tmp_path):
    """Missing images, no brush regions and a non-list export are reported."""
    export, images = _export(tmp_path)
    with pytest.raises(BadRequest, match="not in"):
        export_to_label_map(export, tmp_path, tmp_path / "ds")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(BadRequest, match="a list of tasks"):
        export_to_label_map(tmp_path / "bad.json", images, tmp_path / "ds")
    (tmp_path / "nobrush.json").write_text(json.dumps([{"id": 1, "data": {}, "annotations": []}]))
    with pytest.raises(BadRequest, match="no brushlabels"):
        export_to_label_map(tmp_path / "nobrush.json", images, tmp_path / "ds")


def test_evaluate_on_an_export_file_names_the_converter(tmp_path, capsys):
    """model.evaluate handed a Label Studio export (a file) exits 2 and says how to convert it."""
    from model.evaluate import main as evaluate_main

    export, _ = _export(tmp_path, n=2)
    assert evaluate_main(["--data", str(export), "--model", "tiny"]) == 2
    assert f"python -m backend labelmap --export {export}" in capsys.readouterr().err
