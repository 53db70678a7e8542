"""Hot swap: the models one worker process holds, loaded on first use by version name, no restart.

Versions are deltas over the one base model: a LoRA version is an adapter on the base's UNet (megabytes),
a full version one more UNet; the VAE, the float32 decoder and the prompt embedding are always the base's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from model import DiffewSError, VersionInfo, attach_version, remove_adapter

from ..core.errors import VersionUnavailable
from ..core.registry import VersionRegistry

MAX_LOADED_UNETS = 2
"""Full versions (one UNet each) a worker keeps loaded besides the base model."""
MAX_LOADED_ADAPTERS = 16
"""LoRA versions (one adapter each, a few MB at SD 2.1 size) a worker keeps on the base UNet."""

logger = logging.getLogger(__name__)


class LoadedModels:
    """The base model and the most recently used fine-tuned versions of one process."""

    def __init__(self, base_name: str, load_base: Callable[[], object], registry: VersionRegistry,
                 base_ref: dict):
        self.base_name = base_name
        self.base_ref = base_ref
        """What the base is, as version.json names it: {"spec": ..., "unet": ...}."""
        self._load_base = load_base
        self.registry = registry
        self._base = None
        self._versions: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.RLock()

    @property
    def base(self):
        """The configured weights, loaded once for the life of the process."""
        with self._lock:
            if self._base is None:
                self._base = self._load_base()
            return self._base

    @base.setter
    def base(self, model) -> None:
        self._base = model

    def get(self, version: str):
        """The model of a version name: the base, or a fine-tuned version (VersionUnavailable if it cannot load)."""
        if version == self.base_name:
            return self.base
        with self._lock:
            if version in self._versions:
                self._versions.move_to_end(version)
                return self._versions[version]
            loaded = self._load(version)
            self._versions[version] = loaded
            self._evict()
            return loaded

    def _load(self, version: str):
        folder = self.registry.folder(version)
        started = time.perf_counter()
        try:
            info = VersionInfo.read(folder)
            parent = info.base_folder(folder)
            if parent is not None:
                loaded = attach_version(self.get(parent.name), folder, info)
            elif _same_base(info.base, self.base_ref):
                loaded = attach_version(self.base, folder, info)
            else:  # nothing but MODEL_DIR and the configured base is ever opened
                raise VersionUnavailable(
                    f"model version {version!r} was trained over {info.base}, not this backend's configured base "
                    f"{self.base_ref}: not loaded; serve that base (DIFFEWS_MODEL / MATCHER_BACKBONE) to use it")
        except DiffewSError as exc:
            raise VersionUnavailable(f"model version {version!r} in {folder} cannot be loaded: {exc}") from None
        logger.info("loaded model version %s from %s in %.2f s (%s)", version, folder, time.perf_counter() - started,
                    "an adapter on the shared UNet" if loaded.adapter else "its own UNet over the shared VAE")
        return loaded

    def _evict(self) -> None:
        adapters = [name for name, m in self._versions.items() if m.adapter is not None]
        unets = [name for name, m in self._versions.items() if m.adapter is None]
        for name in adapters[: max(0, len(adapters) - MAX_LOADED_ADAPTERS)]:
            model = self._versions.pop(name)
            remove_adapter(model, model.adapter)  # adapter names are unique per version folder
        for name in unets[: max(0, len(unets) - MAX_LOADED_UNETS)]:
            self._versions.pop(name)


def _same_base(a: dict, b: dict) -> bool:
    return str(a.get("spec")) == str(b.get("spec")) and (a.get("unet") or None) == (b.get("unet") or None)
