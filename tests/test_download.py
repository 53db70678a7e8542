"""model.download: the official release fetched through a stand-in for ModelScope's client (no network)."""

from __future__ import annotations

import shutil
from fnmatch import fnmatch
from pathlib import Path

import pytest

from backend.core.settings import Settings
from backend.core.versions import base_version, describe_model
from model import DiffewS
from model import download as download_module
from model.release import MODELSCOPE_BASE
from model.download import (RELEASE_ID, CheckpointNotFoundError, IncompleteDownloadError, download_release,
                            missing_files, release_folder, release_patterns)

from .checkpoints import write_official_layout, write_separate_unet


class StandInModelScope:
    """Acts as snapshot_download: copies the files of a tiny release that local_dir lacks (a resumed download
    fetches only those), records each call and, if told, leaves one file out."""

    def __init__(self, skip: str | None = None):
        self.calls: list[dict] = []
        self.fetched: list[str] = []
        self.skip = skip

    def __call__(self, model_id: str, *, local_dir: str, allow_patterns: list[str]) -> str:
        self.calls.append({"model_id": model_id, "local_dir": local_dir, "allow_patterns": allow_patterns})
        remote = Path(local_dir).parent / "remote"
        if not remote.is_dir():
            write_official_layout(remote / MODELSCOPE_BASE)
            for name in ("incontext", "coco_fold0", "coco_fold1", "coco_fold2", "coco_fold3"):
                write_separate_unet(remote / "weight" / name / "unet")
        for source in sorted(p for p in remote.rglob("*") if p.is_file()):
            relative = source.relative_to(remote).as_posix()
            target = Path(local_dir) / relative
            if relative == self.skip or target.exists() or not any(fnmatch(relative, p) for p in allow_patterns):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            self.fetched.append(relative)
        return local_dir


def test_download_fetches_base_and_unet_then_loads(tmp_path):
    fake = StandInModelScope()
    root = download_release(tmp_path, ["incontext"], downloader=fake)
    assert root == release_folder(tmp_path) and missing_files(root, ["incontext"]) == []
    [call] = fake.calls
    assert call["model_id"] == RELEASE_ID
    assert call["allow_patterns"] == release_patterns(["incontext"]) == [f"{MODELSCOPE_BASE}/*", "weight/incontext/unet/*"]
    model = DiffewS.from_pretrained(root, device="cpu")
    assert model.config.trained is True and "incontext" in model.source
    download_release(tmp_path, ["incontext"], downloader=fake)
    assert len(fake.calls) == 1  # complete already: the client is not asked again


def test_interrupted_download_is_reported_and_resumed(tmp_path):
    skip = f"{MODELSCOPE_BASE}/text_encoder/model.safetensors"
    with pytest.raises(IncompleteDownloadError, match="lacks 1 needed files.*text_encoder.*run `python -m model.download` again"):
        download_release(tmp_path, downloader=StandInModelScope(skip=skip))
    resumed = StandInModelScope()
    root = download_release(tmp_path, downloader=resumed)
    assert resumed.fetched == [skip] and (root / skip).is_file()  # only what was missing


def test_fold_unet_and_unknown_unet(tmp_path):
    fake = StandInModelScope()
    root = download_release(tmp_path, ["coco_fold2"], downloader=fake)
    assert (root / "weight" / "coco_fold2" / "unet" / "config.json").is_file()
    with pytest.raises(CheckpointNotFoundError, match="no UNet 'coco_fold9'; it has incontext, coco_fold0"):
        download_release(tmp_path, ["coco_fold9"], downloader=fake)


def test_client_failure_names_the_release(tmp_path):
    def offline(model_id, **kwargs):
        raise OSError("connection refused")

    with pytest.raises(CheckpointNotFoundError, match="could not download zzzmmz/Diffews into .*connection refused"):
        download_release(tmp_path, downloader=offline)


def test_release_id_as_model_spec_downloads_on_first_start(tmp_path, monkeypatch):
    """DIFFEWS_MODEL=zzzmmz/Diffews: the loader fetches into the cache once, then loads; DIFFEWS_UNET=coco_fold0 too."""
    fake = StandInModelScope()
    monkeypatch.setattr(download_module, "DEFAULT_CACHE", tmp_path)
    monkeypatch.setattr(download_module, "_modelscope_downloader", lambda: fake)
    monkeypatch.chdir(tmp_path)  # the id must not resolve as a relative folder
    model = DiffewS.from_pretrained(RELEASE_ID, device="cpu")
    assert str(release_folder(tmp_path)) in model.source and len(fake.calls) == 1
    fold = DiffewS.from_pretrained(RELEASE_ID, unet="coco_fold0", device="cpu")
    assert "coco_fold0" in fold.source
    assert base_version(Settings(model_spec=RELEASE_ID)) == "diffews-incontext"
    assert base_version(Settings(model_spec=RELEASE_ID, model_unet="coco_fold0")) == "diffews-coco_fold0"
    assert describe_model(Settings(model_spec=RELEASE_ID))["trained"] is True


def test_cli(tmp_path, monkeypatch, capsys):
    fake = StandInModelScope()
    monkeypatch.setattr(download_module, "_modelscope_downloader", lambda: fake)
    assert download_module.main(["--cache-dir", str(tmp_path), "--unet", "coco_fold1"]) == 0
    out = capsys.readouterr().out
    assert f"DIFFEWS_MODEL={release_folder(tmp_path)}" in out and "coco_fold1" in out
    shutil.rmtree(release_folder(tmp_path))

    def offline(model_id, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(download_module, "_modelscope_downloader", lambda: offline)
    assert download_module.main(["--cache-dir", str(tmp_path)]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "no route to host" in line and "resume" in line


def test_manifest_finds_and_refetches_damaged_files(tmp_path):
    """The first download writes a manifest (size, SHA-256); a truncated file (sizes) and a same-size corrupted
    one (SHA-256, with verify) are deleted and fetched again; the loader then works."""
    from model.download import MANIFEST, read_manifest
    from model.file_digests import sha256_of

    fake = StandInModelScope()
    root = download_release(tmp_path, downloader=fake)
    manifest = read_manifest(root)
    weights = f"{MODELSCOPE_BASE}/unet/diffusion_pytorch_model.safetensors"
    assert (root / MANIFEST).is_file() and manifest[weights]["sha256"] == sha256_of(root / weights)
    assert manifest[weights]["size"] == (root / weights).stat().st_size

    good = (root / weights).read_bytes()
    (root / weights).write_bytes(good[: len(good) // 2])  # truncated
    fake.fetched.clear()
    download_release(tmp_path, downloader=fake)
    assert fake.fetched == [weights] and (root / weights).read_bytes() == good

    flipped = bytearray(good)
    flipped[-10] ^= 0xFF  # same size, other bytes: only the SHA-256 finds it
    (root / weights).write_bytes(bytes(flipped))
    fake.fetched.clear()
    download_release(tmp_path, downloader=fake)
    assert fake.fetched == []  # sizes alone (the quick check on every start) cannot see it
    download_release(tmp_path, downloader=fake, verify=True)
    assert fake.fetched == [weights] and (root / weights).read_bytes() == good
    DiffewS.from_pretrained(root, device="cpu")


def test_file_still_damaged_after_refetch_is_named(tmp_path):
    """When the fetched file still differs from the manifest, the error names it (nothing loads it silently)."""
    from model.download import CorruptDownloadError

    fake = StandInModelScope()
    root = download_release(tmp_path, downloader=fake)
    weights = f"{MODELSCOPE_BASE}/vae/diffusion_pytorch_model.safetensors"
    remote = Path(fake.calls[0]["local_dir"]).parent / "remote" / weights
    remote.write_bytes(remote.read_bytes()[:-100])  # the source itself now serves a shorter file
    (root / weights).write_bytes(b"x")
    with pytest.raises(CorruptDownloadError, match="vae/diffusion_pytorch_model.safetensors differs from"):
        download_release(tmp_path, downloader=fake)


def test_weights_that_do_not_fit_the_architecture_name_file_and_tensor(tmp_path):
    """A UNet or VAE whose safetensors do not fit its config.json: the error names the file and the first tensor."""
    from safetensors.torch import load_file, save_file

    from model import InvalidCheckpointError

    from .checkpoints import write_official_layout

    root = write_official_layout(tmp_path / "pipe")
    path = root / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["conv_out.weight"] = state["conv_out.weight"][:, :2].contiguous()
    save_file(state, path)
    with pytest.raises(InvalidCheckpointError, match=r"unet/diffusion_pytorch_model.safetensors: tensor conv_out.weight is "):
        DiffewS.from_pretrained(root, device="cpu")
    write_official_layout(tmp_path / "pipe2")
    path = tmp_path / "pipe2" / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    del state["decoder.conv_out.bias"]
    save_file(state, path)
    with pytest.raises(InvalidCheckpointError, match="vae/diffusion_pytorch_model.safetensors: tensor decoder.conv_out.bias .* is missing"):
        DiffewS.from_pretrained(tmp_path / "pipe2", device="cpu")
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(InvalidCheckpointError, match="truncated or corrupted"):
        DiffewS.from_pretrained(tmp_path / "pipe2", device="cpu")
