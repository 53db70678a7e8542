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
"""Moving average of a click's run time per model pass (seconds), kept by the workers."""
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


COSTS_KEY = f"{PREFIX}:clicks:cost"
"""Hash of click job id -> model passes it costs (a smart-tool request with 5 boxes costs 5; a click 1)."""


def expected_wait_s(redis: Redis, workers: int, now: float, cost: int = 1) -> tuple[float, int, float]:
    """(seconds a new click of `cost` passes would wait to finish, passes pending, seconds per pass)."""
    pipe = redis.pipeline()
    pipe.zrangebyscore(PENDING_KEY, "-inf", now)
    pipe.zremrangebyscore(PENDING_KEY, "-inf", now)
    pipe.zrange(PENDING_KEY, 0, -1)
    pipe.get(CLICK_SECONDS_KEY)
    expired, _, pending, per_click = pipe.execute()
    pipe = redis.pipeline()
    if expired:
        pipe.hdel(COSTS_KEY, *expired)
    if pending:
        pipe.hmget(COSTS_KEY, pending)
    results = pipe.execute() if expired or pending else []
    costs = results[-1] if pending else []
    passes = sum(int(c) if c else 1 for c in costs)
    per_click = float(per_click or FIRST_GUESS_S)
    return (passes + cost) * per_click / max(workers, 1), passes, per_click


def click_started(redis: Redis, job_id: str, deadline: float, cost: int = 1) -> None:
    """Count a click job of `cost` model passes as pending until click_ended or its deadline."""
    pipe = redis.pipeline()
    pipe.zadd(PENDING_KEY, {job_id: deadline})
    pipe.hset(COSTS_KEY, job_id, cost)
    pipe.execute()


def click_ended(redis: Redis, job_id: str) -> None:
    """A click job finished (or was dropped): it no longer counts."""
    pipe = redis.pipeline()
    pipe.zrem(PENDING_KEY, job_id)
    pipe.hdel(COSTS_KEY, job_id)
    pipe.execute()


def admit_click(redis: Redis, settings: Settings, workers: int, now: float, cost: int = 1) -> None:
    """Overloaded (503, Retry-After) when the pending passes and this click's `cost` cannot be worked off
    within PREDICT_WAIT_S."""
    if not settings.admission_control:
        return
    wait, queued, per_click = expected_wait_s(redis, workers, now, cost)
    if wait > settings.predict_wait_s:
        raise Overloaded(
            f"{queued} model passes are pending for {workers} worker(s) at about {per_click:.1f} s each: this request "
            f"({cost} pass{'es' if cost > 1 else ''}) would take about {wait:.0f} s, more than PREDICT_WAIT_S="
            f"{settings.predict_wait_s:.0f}; try again later",
            retry_after=max(1, math.ceil(wait - settings.predict_wait_s)),
        )


def record_click_seconds(redis: Redis, seconds: float, passes: int = 1, weight: float = 0.2) -> None:
    """Fold one click job's run time per model pass into the moving average."""
    seconds = seconds / max(passes, 1)
    previous = redis.get(CLICK_SECONDS_KEY)
    value = seconds if previous is None else (1 - weight) * float(previous) + weight * seconds
    redis.set(CLICK_SECONDS_KEY, f"{value:.4f}")
