"""Fetch the official DiffewS release (ModelScope `zzzmmz/Diffews`) into a cache folder and check what arrived.

    python -m model.download                          # base pipeline + the in-context UNet, ~/.cache/diffews
    python -m model.download --unet coco_fold0 --cache-dir /weights

The files come through ModelScope's own client (`modelscope.snapshot_download`): it shows a progress bar
per file, resumes partial downloads and skips files already complete, so running the command again
finishes an interrupted download. Afterwards every file the loader needs is checked to be present.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .checkpoint import MODELSCOPE_BASE
from .errors import CheckpointNotFoundError

RELEASE_ID = "zzzmmz/Diffews"
"""The ModelScope id of the official weights."""
RELEASE_UNETS = ("incontext", "coco_fold0", "coco_fold1", "coco_fold2", "coco_fold3")
"""UNets of the release: the generalist and the four COCO-20i folds (strict setting)."""
DEFAULT_CACHE = Path(os.environ.get("DIFFEWS_CACHE", "~/.cache/diffews")).expanduser()
"""Where downloads go unless told otherwise (DIFFEWS_CACHE)."""

Downloader = Callable[..., str]
"""`snapshot_download(model_id, local_dir=..., allow_patterns=[...])` or a stand-in with that signature."""


class IncompleteDownloadError(CheckpointNotFoundError):
    """The release folder lacks files the loader needs (an interrupted or filtered download)."""


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


def _modelscope_downloader() -> Downloader:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise CheckpointNotFoundError(
            f"downloading {RELEASE_ID} needs the ModelScope client: pip install modelscope "
            "(or download the release yourself and point DIFFEWS_MODEL at its folder)") from None
    return snapshot_download


def download_release(cache_dir: str | Path | None = None, unets: Sequence[str] = ("incontext",), *,
                     downloader: Downloader | None = None) -> Path:
    """The release folder with the base pipeline and `unets`, fetched only if something is missing."""
    unknown = [u for u in unets if u not in RELEASE_UNETS]
    if unknown:
        raise CheckpointNotFoundError(f"the release has no UNet {unknown[0]!r}; it has {', '.join(RELEASE_UNETS)}")
    root = release_folder(cache_dir)
    if not missing_files(root, unets):
        return root
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
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.download", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=None, help=f"download root (default: DIFFEWS_CACHE or {DEFAULT_CACHE})")
    parser.add_argument("--unet", nargs="+", default=["incontext"], choices=RELEASE_UNETS,
                        help="which of the release's UNets to fetch besides the base pipeline")
    args = parser.parse_args(argv)
    try:
        root = download_release(args.cache_dir, args.unet)
    except CheckpointNotFoundError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    print(f"{RELEASE_ID} is complete in {root}")
    print(f"use it with: DIFFEWS_MODEL={root}" + ("" if args.unet == ["incontext"] else
                                                   f" DIFFEWS_UNET={root / 'weight' / args.unet[0] / 'unet'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
