"""Size and SHA-256 of files, recorded when they are written and compared when they are read (release downloads,
version folders). No torch: the web process reads version folders too."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, read in 8 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path) -> dict:
    """{"size", "sha256"} of a file, as manifests and version.json record it."""
    return {"size": path.stat().st_size, "sha256": sha256_of(path)}


def mismatch(path: Path, entry: dict, *, hashes: bool) -> str | None:
    """How an existing file differs from its recorded entry (size, then with `hashes` SHA-256), or None."""
    size = path.stat().st_size
    if size != entry.get("size"):
        return f"holds {size} bytes, {entry.get('size')} were recorded (truncated or replaced)"
    if hashes and sha256_of(path) != entry.get("sha256"):
        return "does not have the recorded SHA-256 (changed after it was written)"
    return None
