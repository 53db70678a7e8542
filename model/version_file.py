"""The version.json of a fine-tuned model version: its schema, read and written here only (no torch needed)."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import CheckpointNotFoundError, InvalidCheckpointError
from .file_digests import file_entry, mismatch

VERSION_FILE = "version.json"
SCHEMA = 2
"""1: LoRA folders held `unet_lora.safetensors` and `lora_config.json` with the rank only; 2: a peft adapter
folder (`adapter_config.json` with the whole LoraConfig, `adapter_model.safetensors`) and the project."""
MODES = ("full", "lora", "head")
"""full / lora: DiffewS UNet weights or adapter; head: the matcher's projection head (matcher_head.safetensors) and
the weights of its backbone's tuned blocks (matcher_blocks.safetensors, when it has any)."""
FULL_WEIGHTS = "unet.safetensors"
"""A full version's UNet weights (float32 master weights); it shares everything else with its base."""
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
"""A LoRA version's peft adapter, with the names peft's own save_pretrained gives them."""
LEGACY_ADAPTER_WEIGHTS = "unet_lora.safetensors"
LEGACY_ADAPTER_CONFIG = "lora_config.json"
LEGACY_LORA = {"init_lora_weights": "gaussian", "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
"""What schema-1 LoRA versions were trained with besides their rank, alpha being the rank (the code constants
of that time)."""


MAX_VERSION_FILE_BYTES = 1 << 20
"""version.json holds a name, a base and a summary of scores: a larger one is refused unread."""
VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""What a version name may be: it names a folder, a Redis field and what Label Studio shows (no path parts)."""


def check_version_name(name: object) -> str:
    """`name` if it is a valid version name; InvalidCheckpointError saying what is allowed otherwise."""
    if not isinstance(name, str) or not VERSION_NAME.fullmatch(name) or ".." in name:
        raise InvalidCheckpointError(f"version name {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or "
                                     "'-', starting with a letter or digit, without '..'")
    return name


def file_digests(folder: str | Path) -> dict[str, dict]:
    """Size and SHA-256 of every file of a version folder but version.json."""
    digests = {}
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and path.name != VERSION_FILE:
            digests[path.name] = file_entry(path)
    return digests


@dataclass(frozen=True)
class VersionInfo:
    """What a version folder holds and what its weights apply to.

    base: {"spec": model spec, "unet": separate UNet folder or None} or {"version": folder of another version,
    relative to the versions' root}: the weights this version's UNet weights or adapter apply to.
    """

    name: str
    mode: str
    base: dict
    parent: str | None = None
    project: int | None = None
    created_at: float = field(default_factory=time.time)
    summary: dict = field(default_factory=dict)
    schema: int = SCHEMA
    files: dict = field(default_factory=dict)
    """File name -> {"size", "sha256"} of the folder's other files when it was saved (empty in older folders)."""

    def __post_init__(self) -> None:
        check_version_name(self.name)
        if self.mode not in MODES:
            raise InvalidCheckpointError(f"version {self.name!r}: mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.base, dict) or not ({"spec", "version"} & set(self.base)):
            raise InvalidCheckpointError(f"version {self.name!r}: base must name a 'spec' or a 'version', got {self.base!r}")

    def base_folder(self, folder: Path) -> Path | None:
        """The folder of the version this one applies to (relative to the versions' root), or None for a spec."""
        if "version" not in self.base:
            return None
        return Path(folder).parent / self.base["version"]  # an absolute path stays as is

    def verify_files(self, folder: str | Path, *, hashes: bool = True) -> None:
        """InvalidCheckpointError naming the first file that is missing, or whose size (and with `hashes`, SHA-256)
        differs from what version.json recorded; folders saved before files were recorded pass unchecked."""
        for name, expected in self.files.items():
            path = Path(folder) / Path(str(name)).name
            if not path.is_file():
                raise InvalidCheckpointError(f"version {self.name!r}: {path} is missing")
            if problem := mismatch(path, expected, hashes=hashes):
                raise InvalidCheckpointError(f"version {self.name!r}: {path} {problem}")

    def write(self, folder: Path) -> None:
        """Write version.json into `folder` (save_version syncs the whole folder before it appears)."""
        (Path(folder) / VERSION_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, folder: str | Path) -> VersionInfo:
        """version.json of a version folder; CheckpointNotFoundError if absent, InvalidCheckpointError if unreadable."""
        path = Path(folder) / VERSION_FILE
        try:
            if path.stat().st_size > MAX_VERSION_FILE_BYTES:
                raise InvalidCheckpointError(f"{path}: {path.stat().st_size} bytes, more than a version.json may hold "
                                             f"({MAX_VERSION_FILE_BYTES}); not read")
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{path} does not exist: not a model version folder") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidCheckpointError(f"{path}: cannot read ({exc})") from None
        if not isinstance(data, dict):
            raise InvalidCheckpointError(f"{path}: expected a JSON object")
        data.setdefault("schema", 1)  # folders written before the schema had a number
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise InvalidCheckpointError(f"{path}: {exc}") from None


def is_version_folder(folder: str | Path) -> bool:
    """True when `folder` holds a version.json."""
    return (Path(folder) / VERSION_FILE).is_file()
