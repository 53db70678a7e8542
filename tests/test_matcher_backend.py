"""The matcher as the backend's default model: /health, loading, clicks, smart tools, training and versions."""

from __future__ import annotations

import time

import numpy as np
import pytest

from backend.core.rle import rle_to_mask
from backend.core.settings import Settings
from backend.core.versions import base_version, describe_model
from backend.worker.runtime import load_model
from model.matcher import Matcher

from .conftest import serving
from bench.synthetic import CONFIG_XML, annotation_event, png_data_uri, square_scene

SETUP = {"project": "1.1", "schema": CONFIG_XML}
VERSION = "matcher-effnet-lite0-r64"


@pytest.fixture(scope="module")
def matcher() -> Matcher:
    return Matcher.from_pretrained("effnet-lite0", resolution=64)


@pytest.fixture
def matcher_settings(settings) -> Settings:
    """The test settings with DIFFEWS_MODEL unset: the matcher at 64 px."""
    return settings.replace(model_spec="", matcher_resolution=64, train_steps=30, train_seed=0)


@pytest.fixture
def matcher_client(matcher_settings, redis, matcher):
    """The backend app and one worker thread on all queues, serving the matcher."""
    from backend.web.app import create_app

    with serving(matcher_settings, redis, matcher):
        yield create_app(matcher_settings, redis).test_client()


def test_default_settings_serve_the_matcher(tmp_path):
    """With no DIFFEWS_MODEL the configured model is the matcher: its version names backbone and resolution,
    /health's model block says why it runs and how to switch to DiffewS."""
    settings = Settings(model_dir=tmp_path)
    assert base_version(settings) == "matcher-effnet-lite0-r384"
    info = describe_model(settings)
    assert info["family"] == "matcher" and info["trained"] is True and "DIFFEWS_MODEL=zzzmmz/Diffews" in info["note"]
    assert describe_model(settings.replace(model_spec="tiny"))["family"] == "diffews"


def test_load_model_builds_the_configured_matcher(tmp_path):
    """load_model gives the matcher with MATCHER_BACKBONE at MATCHER_RESOLUTION; a bad backbone is named."""
    model = load_model(Settings(model_dir=tmp_path, matcher_resolution=96))
    assert isinstance(model, Matcher) and model.config.resolution == 96 and model.config.backbone == "effnet-lite0"
    from model.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="unknown backbone 'vgg'"):
        load_model(Settings(model_dir=tmp_path, matcher_backbone="vgg"))


def test_health_names_the_matcher(matcher_client):
    """/health says the matcher runs (model_class, family, version)."""
    body = matcher_client.get("/health").json
    assert body["model_class"] == "Matcher" and body["model"]["family"] == "matcher"
    assert body["model"]["version"] == VERSION


def _label(client, n: int) -> None:
    assert client.post("/setup", json=SETUP).status_code == 200
    for i in range(n):
        assert client.post("/webhook", json=annotation_event(10 + i, 100 + i, *square_scene(i, (96, 128)))).status_code == 200


def test_click_predicts_the_square_with_the_matcher(matcher_client):
    """A click is answered with brush regions of the matcher's version that overlap the true square."""
    _label(matcher_client, 3)
    query, truth = square_scene(7, (96, 128))
    r = matcher_client.post("/predict", json={"tasks": [{"id": 300, "data": {"image": png_data_uri(query)}}],
                                              "project": "1.1795549122", "label_config": CONFIG_XML})
    assert r.status_code == 200, r.json
    [prediction] = r.json["results"]
    assert prediction["model_version"] == VERSION and 0.0 < prediction["score"] <= 1.0
    [region] = prediction["result"]
    mask = rle_to_mask(region["value"]["rle"], 128, 96)
    assert (mask & truth).sum() / (mask | truth).sum() > 0.5


def test_smart_tool_box_with_the_matcher(matcher_client):
    """An interactive box prompt is answered by the matcher inside the box."""
    _label(matcher_client, 2)
    query, truth = square_scene(8, (96, 128))
    ys, xs = np.nonzero(truth)
    box = {"x": 100 * xs.min() / 128, "y": 100 * ys.min() / 96, "width": 100 * (xs.max() + 1 - xs.min()) / 128,
           "height": 100 * (ys.max() + 1 - ys.min()) / 96}
    context = {"result": [{"type": "rectanglelabels", "from_name": "tag", "to_name": "image", "original_width": 128,
                           "original_height": 96, "value": {**box, "rectanglelabels": ["square"]}}]}
    r = matcher_client.post("/predict", json={"tasks": [{"id": 301, "data": {"image": png_data_uri(query)}}],
                                              "project": "1.1", "label_config": CONFIG_XML, "params": {"context": context}})
    assert r.status_code == 200, r.json
    [region] = r.json["results"][0]["result"]
    mask = rle_to_mask(region["value"]["rle"], 128, 96)
    assert mask.any() and (mask & truth).sum() / mask.sum() > 0.8


def test_training_writes_a_head_version_and_serves_it(matcher_client, redis):
    """START_TRAINING with the matcher trains a projection head, scores it by cross-validation, and the version
    (a head of kilobytes to megabytes over the shared backbone) loads and predicts when pinned."""
    _label(matcher_client, 6)
    job = matcher_client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).json
    assert job["status"] == "queued", job
    deadline = time.monotonic() + 300
    while (state := matcher_client.get(f"/jobs/{job['job']}").json)["status"] not in ("finished", "failed"):
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
    assert state["status"] == "finished", state
    [version] = matcher_client.get("/projects/1/versions").json["versions"]
    assert version["name"] == f"{VERSION}-p1-v1" and version["mode"] == "head"
    assert set(version["scores"]) == {version["name"], VERSION}
    assert matcher_client.post("/projects/1/pin", json={"version": version["name"]}).status_code == 200
    query, _ = square_scene(9, (96, 128))
    r = matcher_client.post("/predict", json={"tasks": [{"id": 302, "data": {"image": png_data_uri(query)}}],
                                              "project": "1.1", "label_config": CONFIG_XML})
    assert r.status_code == 200 and r.json["results"][0]["model_version"] == version["name"], r.json


def test_a_diffews_version_is_refused_by_a_matcher_worker(tmp_path, matcher):
    """A DiffewS version folder cannot be attached to the matcher: the error names both families."""
    from model import DiffewS, attach_version, save_version
    from model.errors import InvalidCheckpointError

    tiny = DiffewS.tiny(resolution=64)
    folder = save_version(tiny, tmp_path, "v1", base={"spec": "tiny"}, parent=None, mode="full", summary={})
    with pytest.raises(InvalidCheckpointError, match="DiffewS version; it cannot run over the matcher"):
        attach_version(matcher, folder)


def test_health_says_how_to_switch_when_a_gpu_is_visible(tmp_path, monkeypatch):
    """With the matcher serving and an NVIDIA GPU visible, /health's model block says to switch to DiffewS."""
    from backend.core import versions

    monkeypatch.setattr(versions, "gpu_visible", lambda: True)
    info = versions.describe_model(Settings(model_dir=tmp_path))
    assert "DIFFEWS_MODEL=zzzmmz/Diffews" in info["warning"] and "GPU" in info["warning"]
    monkeypatch.setattr(versions, "gpu_visible", lambda: False)
    assert "warning" not in versions.describe_model(Settings(model_dir=tmp_path))


@pytest.fixture
def similar_client(matcher_settings, redis, matcher):
    """As matcher_client, with SUPPORT_POLICY=similar (supports chosen per query by the matcher's descriptors)."""
    from backend.web.app import create_app

    settings = matcher_settings.replace(support_policy="similar", max_shots=2)
    with serving(settings, redis, matcher):
        yield create_app(settings, redis).test_client()


def test_similar_supports_with_the_matcher(similar_client, redis, matcher):
    """SUPPORT_POLICY=similar with the matcher: descriptors of its pooled features are stored once per example and
    space, and clicks are answered from the chosen examples."""
    _label(similar_client, 4)
    query, truth = square_scene(11, (96, 128))
    r = similar_client.post("/predict", json={"tasks": [{"id": 303, "data": {"image": png_data_uri(query)}}],
                                              "project": "1.1", "label_config": CONFIG_XML})
    assert r.status_code == 200, r.json
    [region] = r.json["results"][0]["result"]
    mask = rle_to_mask(region["value"]["rle"], 128, 96)
    assert (mask & truth).sum() / (mask | truth).sum() > 0.5
    from backend.core.descriptors import DescriptorStore

    assert redis.hlen(DescriptorStore.key(1, matcher.descriptor_space)) == 4, "one descriptor per example, in Redis"
