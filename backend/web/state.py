"""What the routes of one app share: the Backend, the click slots, the cached startup warnings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from flask import current_app
from redis import Redis

from ..core.admission import ClickSlots
from ..core.queues import persistence, redis_url_warning
from ..core.services import Backend
from ..core.registry import VersionRegistry
from ..core.settings import Settings
from ..core.store import SupportStore

EXTENSION = "diffews"
"""The key of WebState in app.extensions."""


def startup_warnings(settings: Settings, redis: Redis) -> list[str]:
    """What an operator should fix: an exposed Redis, one that forgets everything on restart, a project whose
    promoted version was forgotten."""
    warnings = [w for w in (redis_url_warning(settings.redis_url),) if w]
    warnings += VersionRegistry(redis, SupportStore(redis, settings.model_dir)).lost_choices()
    if persistence(redis) == "none":
        warnings.append("Redis keeps no data over a restart (no AOF, no RDB snapshots): projects and examples are "
                        "then re-registered on Label Studio's next /setup or webhook and re-read by the backfill, "
                        "but turn on appendonly to keep them")
    return warnings


@dataclass
class WebState:
    """Per-app state of the web process (nothing a worker needs)."""

    backend: Backend
    slots: ClickSlots
    _checked_at: float = float("-inf")
    _warnings: list[str] = field(default_factory=list)

    def warnings(self) -> list[str]:
        """startup_warnings, read from Redis at most every 30 s (its CONFIG does not change under load)."""
        if time.monotonic() - self._checked_at > 30:
            self._checked_at, self._warnings = time.monotonic(), startup_warnings(self.backend.settings, self.backend.redis)
        return self._warnings


def web_state() -> WebState:
    """The WebState of the app handling the current request."""
    return current_app.extensions[EXTENSION]
