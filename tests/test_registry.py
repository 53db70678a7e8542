"""backend/core/registry.py: version files are checked when read (names, paths, sizes, hashes, choices), refused ones
are named in /health; names, pins and pages of the registry."""

from __future__ import annotations

import json

import pytest

from model import InvalidCheckpointError, VersionInfo
from model.versions import save_version

from bench.synthetic import CONFIG_XML

BASE = "diffews-tiny-r64-untrained"
SETUP = {"project": "1.1", "schema": CONFIG_XML}


def _version(model, settings, name: str, *, pid: int = 1, promoted: bool = False):
    return save_version(model, settings.model_dir / "versions" / str(pid), name, base={"spec": "tiny"}, parent=None,
                        mode="full", summary={"decision": {"promoted": promoted}}, project=pid)


def _registry(redis, settings):
    from backend.core.registry import VersionRegistry
    from backend.core.store import SupportStore

    return VersionRegistry(redis, SupportStore(redis, settings.model_dir))


def test_a_version_name_with_path_parts_is_refused(tmp_path):
    """VersionInfo refuses names that are not plain folder names, wherever they come from."""
    for name in ("../../etc", "a/b", "", ".hidden", "x" * 129, "a..b"):
        with pytest.raises(InvalidCheckpointError, match="is not allowed"):
            VersionInfo(name=name, mode="full", base={"spec": "tiny"})
    VersionInfo(name="diffews-tiny-r64-p1-v2", mode="full", base={"spec": "tiny"})


def test_an_oversized_version_file_is_refused_unread(tmp_path):
    """A version.json over 1 MiB is an InvalidCheckpointError before it is parsed."""
    (tmp_path / "version.json").write_bytes(b" " * (2 << 20))
    with pytest.raises(InvalidCheckpointError, match="more than a version.json may hold"):
        VersionInfo.read(tmp_path)


def test_refused_version_folders_are_not_registered_and_are_named_in_health(client, redis, settings, tiny_model,
                                                                            monkeypatch):
    """A folder whose version.json names another version, one whose weights were truncated, and one over a base
    version given as a path are skipped at registration; /health names each with the reason."""
    good = _version(tiny_model, settings, f"{BASE}-p1-v1")
    renamed = _version(tiny_model, settings, f"{BASE}-p1-v2")
    info = json.loads((renamed / "version.json").read_text())
    (renamed / "version.json").write_text(json.dumps({**info, "name": f"{BASE}-p1-v9"}))
    truncated = _version(tiny_model, settings, f"{BASE}-p1-v3")
    weights = truncated / "unet.safetensors"
    saved = weights.read_bytes()
    weights.write_bytes(saved[:-10])
    escaping = _version(tiny_model, settings, f"{BASE}-p1-v4")
    info = json.loads((escaping / "version.json").read_text())
    (escaping / "version.json").write_text(json.dumps({**info, "base": {"version": "../../../etc"}}))
    tampered = _version(tiny_model, settings, f"{BASE}-p1-v5")
    data = bytearray((tampered / "unet.safetensors").read_bytes())
    data[-1] ^= 1  # same size, other bytes
    (tampered / "unet.safetensors").write_bytes(bytes(data))

    registry = _registry(redis, settings)
    registry.rebuild()
    assert [v["name"] for v in registry.list()] == [good.name]
    rejected = client.get("/health").json["rejected_version_files"]
    assert set(rejected) == {f"versions/1/{p.name}" for p in (renamed, truncated, escaping, tampered)}
    assert "not its folder's name" in rejected[f"versions/1/{renamed.name}"]
    assert "truncated or replaced" in rejected[f"versions/1/{truncated.name}"]
    assert "is not allowed" in rejected[f"versions/1/{escaping.name}"]
    assert "SHA-256" in rejected[f"versions/1/{tampered.name}"]
    import shutil

    shutil.rmtree(tampered)  # deleted: no longer reported
    registry.rebuild()
    assert f"versions/1/{tampered.name}" not in client.get("/health").json["rejected_version_files"]
    assert client.post("/setup", json=SETUP).status_code == 200
    assert client.post("/projects/1/pin", json={"version": truncated.name}).status_code == 404  # never served

    import model.version_file

    checked = []
    original = model.version_file.VersionInfo.verify_files
    monkeypatch.setattr(model.version_file.VersionInfo, "verify_files",
                        lambda self, *a, **k: checked.append(self.name) or original(self, *a, **k))
    assert registry.get("not-a-version") is None and checked == []  # a miss does not hash refused folders again
    weights.write_bytes(saved)  # the truncated one is restored: it changed, so it is checked again, and accepted
    registry.rebuild()
    assert checked == [truncated.name] and truncated.name in [v["name"] for v in registry.list()]


def test_pins_and_choices_of_bad_names_are_refused(client, redis, settings, tiny_model):
    """A pin of "../../etc" is a 404; a choices.json holding one is not restored, and /health names the file."""
    assert client.post("/setup", json=SETUP).status_code == 200
    r = client.post("/projects/1/pin", json={"version": "../../etc"})
    assert r.status_code == 404 and "no version" in r.json["error"]
    choices = settings.model_dir / "versions" / "1" / "choices.json"
    choices.parent.mkdir(parents=True, exist_ok=True)
    choices.write_text(json.dumps({"pinned_version": "../../etc", "active_version": "not-a-version-of-1"}))
    redis.flushall()  # Redis lost everything: /setup restores the choices from the file
    assert client.post("/setup", json=SETUP).status_code == 200
    info = client.get("/projects/1/versions").json
    assert info["pinned"] is None and info["active"] is None and info["current"] == BASE
    reason = client.get("/health").json["rejected_version_files"]["versions/1/choices.json"]
    assert "pinned_version" in reason or "active_version" in reason


def test_a_version_over_another_base_is_not_loaded(redis, settings, tiny_model):
    """version.json naming a base spec other than the configured one: the worker refuses it instead of opening
    that path."""
    from backend.core.errors import VersionUnavailable
    from backend.core.store import SupportStore
    from backend.worker.runtime import WorkerContext

    folder = _version(tiny_model, settings, f"{BASE}-p1-v1")
    info = json.loads((folder / "version.json").read_text())
    (folder / "version.json").write_text(json.dumps({**info, "base": {"spec": "/etc/some-model"}}))
    context = WorkerContext(settings, redis, SupportStore(redis, settings.model_dir))
    context.models.base = tiny_model
    with pytest.raises(VersionUnavailable, match="not this backend's configured base"):
        context.models.get(folder.name)


def test_a_file_truncated_after_registration_is_named_at_load(redis, settings, tiny_model):
    """Registered, then truncated: every worker that loads it names the file (sizes are checked at load)."""
    from backend.core.errors import VersionUnavailable
    from backend.core.store import SupportStore
    from backend.worker.runtime import WorkerContext

    folder = _version(tiny_model, settings, f"{BASE}-p1-v1")
    _registry(redis, settings).add(folder)
    (folder / "unet.safetensors").write_bytes(b"\0" * 100)
    context = WorkerContext(settings, redis, SupportStore(redis, settings.model_dir))
    context.models.base = tiny_model
    with pytest.raises(VersionUnavailable, match="unet.safetensors holds 100 bytes"):
        context.models.get(folder.name)


def test_the_version_list_is_paged(client, redis, settings, tiny_model):
    """GET /projects/<id>/versions takes ?offset= and ?limit= (at most 1000) and says the total; bad values are 400."""
    assert client.post("/setup", json=SETUP).status_code == 200
    registry = _registry(redis, settings)
    for i in range(3):
        registry.add(_version(tiny_model, settings, f"{BASE}-p1-v{i + 1}"))
    page = client.get("/projects/1/versions?offset=1&limit=1").json
    assert page["total"] == 3 and [v["name"] for v in page["versions"]] == [f"{BASE}-p1-v2"]
    assert len(client.get("/projects/1/versions").json["versions"]) == 3
    for query in ("limit=0", "limit=1001", "offset=-1", "limit=x"):
        r = client.get(f"/projects/1/versions?{query}")
        assert r.status_code == 400 and query.split("=")[0] in r.json["error"], query


def test_a_promoted_choice_lost_with_redis_and_its_file_is_reported(client, redis, settings, tiny_model):
    """Redis and choices.json both lost: the project silently predicts with the base; /health says so."""
    assert client.post("/setup", json=SETUP).status_code == 200
    registry = _registry(redis, settings)
    promoted = registry.add(_version(tiny_model, settings, f"{BASE}-p1-v1", promoted=True))
    registry.promote(1, promoted["name"])
    assert not [w for w in client.get("/health").json["warnings"] if "choice is lost" in w]
    redis.flushall()
    registry.store.choices_path(1).unlink()
    from backend.web.app import create_app

    fresh = create_app(settings, redis).test_client()  # a restarted web process
    assert fresh.post("/setup", json=SETUP).status_code == 200
    assert fresh.get("/projects/1/versions").json["current"] == BASE
    [warning] = [w for w in fresh.get("/health").json["warnings"] if "choice is lost" in w]
    assert promoted["name"] in warning and "pin" in warning


def test_next_names_count_past_disk_and_redis_and_pins_take_only_own_versions(redis, settings, tiny_model):
    """A project's next version is one past every number on disk or recorded ("-untrained" is not carried over, but
    versions named with it count); a pin takes the base or one of the project's own versions, NotFound otherwise."""
    from backend.core.errors import NotFound

    registry = _registry(redis, settings)
    registry.store.register_project(1, CONFIG_XML)
    assert registry.next_name(1, BASE) == "diffews-tiny-r64-p1-v1"
    registry.add(_version(tiny_model, settings, f"{BASE}-p1-v3"))
    (settings.model_dir / "versions" / "1" / "diffews-tiny-r64-p1-v7").mkdir()  # a folder not (yet) recorded
    assert registry.next_name(1, BASE) == "diffews-tiny-r64-p1-v8" and registry.next_name(2, BASE).endswith("-p2-v1")
    registry.add(_version(tiny_model, settings, f"{BASE}-p2-v1", pid=2))
    with pytest.raises(NotFound, match=f"project 1 has no version '{BASE}-p2-v1'"):
        registry.pin(1, f"{BASE}-p2-v1", BASE)
    registry.pin(1, BASE, BASE)
    assert registry.store.project(1)["pinned_version"] == BASE
    registry.pin(1, None, BASE)
    assert "pinned_version" not in registry.store.project(1)
