"""Hot swap: the models one worker process holds, loaded on first use by version name, no restart."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

from .errors import VersionUnavailable
from .registry import VersionRegistry

MAX_LOADED_VERSIONS = 2
"""Fine-tuned versions a worker keeps loaded besides the base model."""

logger = logging.getLogger(__name__)


class LoadedModels:
    """The base model and the most recently used fine-tuned versions of one process."""

    def __init__(self, base_name: str, load_base: Callable[[], object], registry: VersionRegistry, device: str | None,
                 support_cache_bytes: int):
        self.base_name = base_name
        self._load_base = load_base
        self.registry = registry
        self.device = device
        self.support_cache_bytes = support_cache_bytes
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
            from model.errors import DiffewSError
            from model.versions import load_version

            folder = self.registry.folder(version)
            try:
                loaded = load_version(folder, device=self.device, dtype=self.base.dtype)  # DIFFEWS_DTYPE
            except DiffewSError as exc:
                raise VersionUnavailable(f"model version {version!r} in {folder} cannot be loaded: {exc}") from None
            from model.support import SupportCache

            loaded.support_cache = SupportCache(self.support_cache_bytes)
            logger.info("loaded model version %s from %s", version, folder)
            self._versions[version] = loaded
            while len(self._versions) > MAX_LOADED_VERSIONS:
                self._versions.popitem(last=False)
            return loaded
