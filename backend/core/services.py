"""What the web process hands every route: settings, Redis and the support store."""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis

from .settings import Settings
from .store import SupportStore


@dataclass
class Backend:
    """What every request handler needs; nothing in it is per-process state a request relies on."""

    settings: Settings
    redis: Redis
    store: SupportStore
