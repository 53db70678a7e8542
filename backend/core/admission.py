"""Admission control for clicks: a 503 with Retry-After at once, rather than a click that waits past its deadline.

Two limits. Per web process, at most PREDICT_CONCURRENCY requests wait for their job, so waiting clicks
never take every server thread from /health and /webhook (keep it below gunicorn's --threads). Across
all processes, a click is refused when more clicks are pending than the live workers can work off within
PREDICT_WAIT_S, estimated from how long recent click jobs took.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from redis import Redis

from .errors import Overloaded
from .keys import PREFIX
from .settings import Settings

PENDING_KEY = f"{PREFIX}:clicks:pending"
"""Sorted set of click job ids by deadline: the clicks queued or running now. The click queue holds clicks only
(backend.core.catalog), so this is every job ahead of a new click; an entry whose deadline has passed no longer
counts, so a crash cannot inflate it."""
CLICK_SECONDS_KEY = f"{PREFIX}:stats:click-seconds"
"""Moving average of a click job's run time (seconds), kept by the workers."""
FIRST_GUESS_S = 1.0
"""Click job time assumed before any has been measured."""


class ClickSlots:
    """The per-process limit on /predict requests waiting for their job."""

    def __init__(self, limit: int):
        self.limit = limit
        self._free = threading.BoundedSemaphore(limit)

    @contextmanager
    def take(self) -> Iterator[None]:
        """Hold one slot for the block; Overloaded at once when none is free."""
        if not self._free.acquire(blocking=False):
            raise Overloaded(f"{self.limit} predictions are already waiting in this web process (PREDICT_CONCURRENCY="
                             f"{self.limit}); try again shortly", retry_after=2)
        try:
            yield
        finally:
            self._free.release()


def expected_wait_s(redis: Redis, workers: int, now: float) -> tuple[float, int, float]:
    """(seconds a new click would wait to finish, clicks pending, seconds per click) with `workers` serving them."""
    pipe = redis.pipeline()
    pipe.zremrangebyscore(PENDING_KEY, "-inf", now)
    pipe.zcard(PENDING_KEY)
    pipe.get(CLICK_SECONDS_KEY)
    _, pending, per_click = pipe.execute()
    per_click = float(per_click or FIRST_GUESS_S)
    return (pending + 1) * per_click / max(workers, 1), int(pending), per_click


def click_started(redis: Redis, job_id: str, deadline: float) -> None:
    """Count a click job as pending until click_ended or its deadline."""
    redis.zadd(PENDING_KEY, {job_id: deadline})


def click_ended(redis: Redis, job_id: str) -> None:
    """A click job finished (or was dropped): it no longer counts."""
    redis.zrem(PENDING_KEY, job_id)


def admit_click(redis: Redis, settings: Settings, workers: int, now: float) -> None:
    """Overloaded (503, Retry-After) when the pending clicks cannot be worked off within PREDICT_WAIT_S."""
    if not settings.admission_control:
        return
    wait, queued, per_click = expected_wait_s(redis, workers, now)
    if wait > settings.predict_wait_s:
        raise Overloaded(
            f"{queued} predictions are pending for {workers} worker(s) at about {per_click:.1f} s each: a new one "
            f"would take about {wait:.0f} s, more than PREDICT_WAIT_S={settings.predict_wait_s:.0f}; try again later",
            retry_after=max(1, math.ceil(wait - settings.predict_wait_s)),
        )


def record_click_seconds(redis: Redis, seconds: float, weight: float = 0.2) -> None:
    """Fold one click job's run time into the moving average."""
    previous = redis.get(CLICK_SECONDS_KEY)
    value = seconds if previous is None else (1 - weight) * float(previous) + weight * seconds
    redis.set(CLICK_SECONDS_KEY, f"{value:.4f}")
