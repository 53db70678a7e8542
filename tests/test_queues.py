"""backend/core/queues.py: Redis connections' warnings, persistence, Redis time, which jobs are alive and which
workers are live (by their heartbeat in Redis time)."""

from __future__ import annotations

import pytest
from rq import Queue, SimpleWorker

from backend.core.queues import BEAT_AT, WORKER_ALIVE_S, job_alive, live_workers, persistence, server_time


@pytest.mark.parametrize("url,warned", [
    ("", None), ("unix:///tmp/r.sock", None), ("redis://127.0.0.1:6379/0", None), ("redis://localhost/0", None),
    ("redis://redis:6379/0", "without a password"), ("redis://:pw@10.0.0.5:6379/0", "without TLS"),
    ("rediss://:pw@redis.example.com:6380/0", None),
], ids=["embedded", "unix", "loopback", "localhost", "no-password", "no-tls", "tls"])
def test_redis_url_warnings(url, warned):
    """A REDIS_URL reachable from other machines without a password (or TLS) is warned about, naming why."""
    from backend.core.queues import redis_url_warning

    warning = redis_url_warning(url)
    assert (warning is None) if warned is None else (warned in warning and "pickles" in warning or "TLS" in warning)


def test_persistence_and_redis_time(redis):
    """What /health reports of the session's Redis, whose settings are put back afterwards."""
    before = redis.config_get("appendonly") | redis.config_get("save")
    try:
        redis.config_set("appendonly", "yes")
        assert persistence(redis) == "aof"
        redis.config_set("appendonly", "no")
        redis.config_set("save", "3600 1")
        assert persistence(redis) == "rdb"
        redis.config_set("save", "")
        assert persistence(redis) == "none"
    finally:
        redis.config_set("appendonly", before["appendonly"])
        redis.config_set("save", before["save"])
    seconds, _ = redis.time()
    assert abs(server_time(redis) - seconds) < 2


def test_a_job_is_alive_while_queued_and_not_once_gone(redis):
    """Queued jobs are alive; unknown ids, "" and deleted jobs are not (answers are memoised per call site)."""
    job = Queue("predict-bulk", connection=redis).enqueue("backend.worker.rq_worker.noop")
    assert job_alive(redis)(job.id) and not job_alive(redis)("no-such-job") and not job_alive(redis)("")
    job.delete()
    assert not job_alive(redis)(job.id)


def test_workers_count_only_while_their_heartbeat_is_recent(redis):
    """A worker counts on each of its queues while its BEAT_AT (Redis time) is under WORKER_ALIVE_S old."""
    worker = SimpleWorker(["predict-high", "ingest"], connection=redis)
    worker.register_birth()
    assert live_workers(redis)["predict-high"] == 0  # no BEAT_AT yet: not one of ours
    redis.hset(worker.key, BEAT_AT, server_time(redis))
    counts = live_workers(redis)
    assert counts["predict-high"] == 1 and counts["ingest"] == 1 and counts["predict-bulk"] == 0
    redis.hset(worker.key, BEAT_AT, server_time(redis) - WORKER_ALIVE_S - 1)
    assert live_workers(redis)["predict-high"] == 0
