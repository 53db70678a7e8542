"""The RQ internals this backend relies on (backend/worker/rq_worker.py, backend/core/queues.py), named in one place.

rq is pinned (requirements.txt); an upgrade that renames or reshapes one of these fails here with the list,
instead of far from the cause (a worker that never stops, /health counting nobody).
"""

from __future__ import annotations

import inspect

import rq
from redis.client import PubSubWorkerThread
from rq import SimpleWorker, worker_registration
from rq.scheduler import RQScheduler
from rq.timeouts import TimerDeathPenalty

WORKER_METHODS = {
    # name: the parameters (after self) this backend calls or overrides it with
    "execute_job": ["job", "queue"],
    "prepare_execution": ["job"],
    "perform_job": ["job", "queue", "execution"],
    "maintain_heartbeats": ["job", "execution"],
    "run_maintenance_tasks": [],
    "set_state": ["state", "pipeline"],
    "heartbeat": ["timeout", "pipeline"],
    "register_birth": [],
    "register_death": [],
    "request_stop": ["signum", "frame"],
    "_install_signal_handlers": [],
    "dequeue_job_and_maintain_ttl": ["timeout", "max_idle_time"],
    "unsubscribe": [],
    "serialize": [],
    "get_heartbeat_ttl": ["job", "working_time"],
    "work": None,  # called with burst= and logging_level=
}
WORKER_ATTRIBUTES = ["_stop_requested", "pubsub", "pubsub_thread", "key", "name", "connection", "worker_ttl", "queues"]


def test_rq_is_the_pinned_version():
    assert rq.__version__ == "3.0.0"


def test_the_worker_methods_runtime_overrides_or_calls_keep_their_signatures():
    drifted = {}
    for name, params in WORKER_METHODS.items():
        method = getattr(SimpleWorker, name, None)
        if method is None:
            drifted[name] = "missing"
            continue
        if params is None:
            continue
        got = [p for p in inspect.signature(method).parameters if p != "self"]
        if got[: len(params)] != params:
            drifted[name] = got
    work = inspect.signature(SimpleWorker.work).parameters
    if not {"burst", "logging_level", "max_idle_time"} <= set(work):
        drifted["work"] = list(work)
    assert drifted == {}, f"RQ internals used by backend/worker/rq_worker.py changed: {drifted}"


def test_the_worker_attributes_runtime_reads_or_writes_exist(redis):
    worker = SimpleWorker(["contract"], connection=redis)
    missing = [a for a in WORKER_ATTRIBUTES if not hasattr(worker, a)]
    assert missing == [] and worker.should_run_maintenance_tasks in (True, False)
    assert worker.dequeue_timeout == max(1, worker.worker_ttl - 15)  # the idle heartbeat interval runtime relies on
    from rq.timeouts import BaseDeathPenalty

    assert issubclass(TimerDeathPenalty, BaseDeathPenalty)  # InProcessWorker.death_penalty_class


def test_the_worker_hash_holds_the_fields_health_reads(redis):
    """live_workers reads the "queues" field of each registered worker's hash, listed by worker_registration."""
    worker = SimpleWorker(["contract-a", "contract-b"], connection=redis)
    worker.register_birth()
    try:
        assert worker.key in {k.decode() if isinstance(k, bytes) else k for k in worker_registration.get_keys(connection=redis)}
        assert redis.hget(worker.key, "queues").decode() == "contract-a,contract-b"
        assert redis.hexists(worker.key, "birth")
        with redis.pipeline() as pipe:
            worker_registration.register(worker, pipe)
            pipe.execute()
    finally:
        worker.register_death()


def test_the_scheduler_lock_and_move_calls_exist():
    for name in ("acquire_locks", "release_locks", "enqueue_scheduled_jobs"):
        assert callable(getattr(RQScheduler, name, None)), name
    assert list(inspect.signature(RQScheduler.__init__).parameters)[1:3] == ["queues", "connection"]


def test_redis_pubsub_thread_stop_is_bounded_or_joinable():
    """InProcessWorker.unsubscribe stops RQ's pubsub thread with stop(timeout=1) where redis-py has it, else stop()
    and join(1)."""
    assert set(inspect.signature(PubSubWorkerThread.stop).parameters) - {"self"} <= {"timeout"}
