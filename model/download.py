"""Fetch the official DiffewS release (ModelScope `zzzmmz/Diffews`) into a cache folder and check what arrived.

    python -m model.download                          # base pipeline + the in-context UNet, ~/.cache/diffews
    python -m model.download --unet coco_fold0 --cache-dir /weights

The files come through ModelScope's own client (`modelscope.snapshot_download`): it shows a progress bar
per file, resumes partial downloads and skips files already complete, so running the command again
finishes an interrupted download. Afterwards every file the loader needs is checked to be present, and
a manifest of what arrived (`diffews-manifest.json`: size and SHA-256 per file) is written. Every later
call checks the files against it (sizes always; SHA-256 too with --verify, the command's default): a
truncated or corrupted file is deleted and fetched again, and if it still differs the error names it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .release import MODELSCOPE_BASE, RELEASE_ID, RELEASE_UNETS
from .errors import CheckpointNotFoundError
from .file_digests import file_entry, mismatch

DEFAULT_CACHE = Path(os.environ.get("DIFFEWS_CACHE", "~/.cache/diffews")).expanduser()
"""Where downloads go unless told otherwise (DIFFEWS_CACHE)."""

Downloader = Callable[..., str]
"""`snapshot_download(model_id, local_dir=..., allow_patterns=[...])` or a stand-in with that signature."""


MANIFEST = "diffews-manifest.json"
"""Size and SHA-256 of every file fetched, written after the first complete download."""


class IncompleteDownloadError(CheckpointNotFoundError):
    """The release folder lacks files the loader needs (an interrupted or filtered download)."""


class CorruptDownloadError(IncompleteDownloadError):
    """A file of the release differs from its manifest (truncated or corrupted) even after fetching it again."""


def is_release_id(spec: str) -> bool:
    """True for the ModelScope id of the official weights (any letter case)."""
    return spec.strip().lower() == RELEASE_ID.lower()


def release_folder(cache_dir: str | Path | None = None) -> Path:
    """The folder the release is (or will be) downloaded to."""
    return Path(cache_dir or DEFAULT_CACHE).expanduser() / "zzzmmz--Diffews"


def release_patterns(unets: Sequence[str]) -> list[str]:
    """Download filters: the base pipeline and the named UNets, nothing else of the repository."""
    return [f"{MODELSCOPE_BASE}/*", *(f"weight/{name}/unet/*" for name in unets)]


def _weights(folder: Path, names: Sequence[str]) -> list[str]:
    return [] if any((folder / n).is_file() for n in names) else [str(folder / f"{names[0]} (or {names[1]})")]


def missing_files(root: Path, unets: Sequence[str]) -> list[str]:
    """Files the loader needs that `root` (a release folder) lacks."""
    base = root / MODELSCOPE_BASE
    missing = [str(p) for p in (base / "vae" / "config.json", base / "unet" / "config.json",
                                base / "text_encoder" / "config.json", base / "tokenizer" / "vocab.json",
                                base / "tokenizer" / "merges.txt") if not p.is_file()]
    diffusers_weights = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    missing += _weights(base / "vae", diffusers_weights) + _weights(base / "unet", diffusers_weights)
    missing += _weights(base / "text_encoder", ("model.safetensors", "pytorch_model.bin"))
    for name in unets:
        unet = root / "weight" / name / "unet"
        missing += ([] if (unet / "config.json").is_file() else [str(unet / "config.json")])
        missing += _weights(unet, diffusers_weights)
    return missing


def _fetched_files(root: Path, unets: Sequence[str]) -> list[Path]:
    folders = [root / MODELSCOPE_BASE, *(root / "weight" / name / "unet" for name in unets)]
    return sorted(p for folder in folders if folder.is_dir() for p in folder.rglob("*")
                  if p.is_file() and "/." not in p.relative_to(root).as_posix())  # not the client's own temp files


def write_manifest(root: Path, unets: Sequence[str]) -> dict:
    """Record size and SHA-256 of every fetched file (kept entries of other UNets stay)."""
    path = root / MANIFEST
    manifest = read_manifest(root)
    for file in _fetched_files(root, unets):
        key = file.relative_to(root).as_posix()
        if key not in manifest or manifest[key]["size"] != file.stat().st_size:
            manifest[key] = file_entry(file)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return manifest


def read_manifest(root: Path) -> dict:
    """The manifest of a release folder ({} when none was written yet)."""
    try:
        data = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # unreadable: treated as absent, and written anew after the next check
    return data if isinstance(data, dict) else {}


def damaged_files(root: Path, unets: Sequence[str], *, verify: bool = False) -> list[str]:
    """Files (relative to root) of the base and `unets` that differ from the manifest: wrong size, or with
    `verify` a wrong SHA-256. Files the manifest does not list are not judged."""
    manifest = read_manifest(root)
    prefixes = (f"{MODELSCOPE_BASE}/", *(f"weight/{name}/unet/" for name in unets))
    damaged = []
    for key, entry in sorted(manifest.items()):
        if not key.startswith(prefixes):
            continue
        file = root / key
        if not file.is_file():
            continue  # missing files are found by missing_files and fetched
        if mismatch(file, entry, hashes=verify):
            damaged.append(key)
    return damaged


def _modelscope_downloader() -> Downloader:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise CheckpointNotFoundError(
            f"downloading {RELEASE_ID} needs the ModelScope client: pip install modelscope "
            "(or download the release yourself and point DIFFEWS_MODEL at its folder)") from None
    return snapshot_download


def download_release(cache_dir: str | Path | None = None, unets: Sequence[str] = ("incontext",), *,
                     downloader: Downloader | None = None, verify: bool = False) -> Path:
    """The release folder with the base pipeline and `unets`, fetched only if something is missing or differs
    from the manifest (sizes; SHA-256 too with `verify`)."""
    unknown = [u for u in unets if u not in RELEASE_UNETS]
    if unknown:
        raise CheckpointNotFoundError(f"the release has no UNet {unknown[0]!r}; it has {', '.join(RELEASE_UNETS)}")
    root = release_folder(cache_dir)
    damaged = damaged_files(root, unets, verify=verify)
    if not missing_files(root, unets) and not damaged:
        if not read_manifest(root):
            write_manifest(root, unets)  # a release fetched before manifests existed
        return root
    for key in damaged:  # fetched again below: the client skips files that are present
        (root / key).unlink()
    fetch = downloader or _modelscope_downloader()
    try:
        fetch(RELEASE_ID, local_dir=str(root), allow_patterns=release_patterns(unets))
    except (OSError, ValueError, RuntimeError) as exc:  # the client's network and HTTP errors derive from these
        raise CheckpointNotFoundError(f"could not download {RELEASE_ID} into {root}: {exc} "
                                      "(run the command again to resume)") from None
    missing = missing_files(root, unets)
    if missing:
        raise IncompleteDownloadError(f"{root}: the download lacks {len(missing)} needed files, e.g. {missing[0]} "
                                      "(run `python -m model.download` again to resume)")
    still = [key for key in damaged if key in damaged_files(root, unets, verify=True)]
    if still:
        raise CorruptDownloadError(f"{root / still[0]} differs from {MANIFEST} (size or SHA-256) even after fetching "
                                   "it again: delete the folder and download anew, or check the disk")
    write_manifest(root, unets)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.download", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=None, help=f"download root (default: DIFFEWS_CACHE or {DEFAULT_CACHE})")
    parser.add_argument("--unet", nargs="+", default=["incontext"], choices=RELEASE_UNETS,
                        help="which of the release's UNets to fetch besides the base pipeline")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="check every file's SHA-256 against the manifest (--no-verify: sizes only)")
    args = parser.parse_args(argv)
    try:
        root = download_release(args.cache_dir, args.unet, verify=args.verify)
    except CheckpointNotFoundError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    print(f"{RELEASE_ID} is complete in {root}")
    print(f"use it with: DIFFEWS_MODEL={root}" + ("" if args.unet == ["incontext"] else
                                                   f" DIFFEWS_UNET={root / 'weight' / args.unet[0] / 'unet'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
