"""RQ adapted to workers that hold a model: SimpleWorkers (no fork per job) that beat while a job runs and run in
a thread. The one module that uses RQ's internals (tests/test_rq_contract.py names each one and its signature)."""

from __future__ import annotations

import inspect
import logging
import threading

from redis.exceptions import RedisError
from rq import Queue, SimpleWorker, worker_registration
from rq.job import Job
from rq.scheduler import RQScheduler
from rq.timeouts import TimerDeathPenalty
from rq.worker import WorkerStatus

from ..core.queues import BEAT_AT, server_time
from .runtime import WorkerContext

logger = logging.getLogger(__name__)


IDLE_WORKER_TTL_S = 45
"""The longest worker_ttl an InProcessWorker takes: it beats at least every 30 s while idle."""


class InProcessWorker(SimpleWorker):
    """A SimpleWorker that heartbeats while its job runs, and that also runs in a thread of the web process.

    RQ's SimpleWorker sends no heartbeat during a job, so a job of a killed worker would look alive for
    job_timeout + 60 s. Here a side thread extends the job's and the worker's heartbeats every quarter
    of `heartbeat_ttl_s` and runs RQ's registry maintenance (which retries or fails abandoned jobs) every
    third of it, busy or not: a job whose worker died is handled within about heartbeat_ttl_s * 4/3.
    Off the main thread there are no signals: job timeouts use a timer instead of SIGALRM, and `stop()`
    replaces SIGTERM.

    RQ has no public hook for a heartbeat during a SimpleWorker's job, so this class overrides RQ 3.0's
    execute_job and calls its prepare_execution, perform_job, maintain_heartbeats, run_maintenance_tasks,
    set_state and _install_signal_handlers, and its RQScheduler's lock and move calls (rq is pinned to
    3.0.0 in requirements.txt for this; tests/test_rq_contract.py names every internal and signature relied on,
    so an upgrade fails there with the list). The behaviour is pinned by tests: a killed worker's job retried
    (tests/test_faults.py), idle heartbeats inside the liveness window, retries moved back when due, and
    stop() in embedded mode (tests/test_training_backend.py, tests/test_faults.py).
    """

    death_penalty_class = TimerDeathPenalty

    def __init__(self, queues, *args, heartbeat_ttl_s: int = 45, **kwargs):
        kwargs.setdefault("maintenance_interval", max(2, heartbeat_ttl_s // 3))
        # An idle worker beats every worker_ttl - 15 s (RQ's dequeue timeout): kept well inside WORKER_ALIVE_S
        # whatever JOB_HEARTBEAT_TTL_S is (at 120 it beat every 105 s and /health counted idle workers dead).
        kwargs.setdefault("worker_ttl", min(max(20, heartbeat_ttl_s), IDLE_WORKER_TTL_S))
        super().__init__(queues, *args, **kwargs)
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self._due_mover = None
        self.stop_asked = False
        """True once stop() or a signal asked this worker to leave (a loop that ends otherwise is restarted)."""

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """How long a running job counts as alive without a new heartbeat."""
        return self.heartbeat_ttl_s

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run the job in this thread while a side thread keeps its heartbeat and the registries."""
        execution = self.prepare_execution(job)
        done = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, done), name=f"rq-heartbeat-{job.id}",
                                daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            done.set()
            beat.join(5)
        self.set_state(WorkerStatus.IDLE)

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:
        """RQ's heartbeat, stamped with Redis's clock (BEAT_AT: liveness never compares two machines' clocks);
        also registers the worker again if Redis lost it (restarted without persistence)."""
        super().heartbeat(timeout, pipeline)
        if pipeline is not None:
            return
        if not self.connection.hexists(self.key, "birth"):
            with self.connection.pipeline() as pipe:
                pipe.hset(self.key, mapping=self.serialize())
                worker_registration.register(self, pipe)
                pipe.expire(self.key, self.worker_ttl + 60)
                pipe.execute()
            logger.warning("worker %s: Redis had lost this worker's registration; registered again", self.name)
        self.connection.hset(self.key, BEAT_AT, server_time(self.connection))

    def register_birth(self) -> None:
        """RQ's registration, with a first BEAT_AT: a worker counts as live from its start."""
        super().register_birth()
        self.connection.hset(self.key, BEAT_AT, server_time(self.connection))

    def request_stop(self, signum, frame) -> None:
        """SIGTERM or SIGINT: RQ's warm shutdown, remembered so the supervisor does not start a new worker."""
        self.stop_asked = True
        super().request_stop(signum, frame)

    def _beat(self, job: Job, execution, done: threading.Event) -> None:
        while not done.wait(max(1.0, self.heartbeat_ttl_s / 4)):
            try:
                self.heartbeat()
                self.maintain_heartbeats(job, execution)
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()
            except (RedisError, OSError) as exc:  # Redis away for a moment: the next beat tries again
                logger.warning("worker %s: heartbeat failed (%s)", self.name, exc)

    def run_maintenance_tasks(self) -> None:
        """RQ's registry maintenance, then move scheduled jobs (retries) that are due back to their queues.

        RQ's own scheduler runs in a forked process; a worker holding a CUDA context must not fork, so the
        same RQScheduler.enqueue_scheduled_jobs runs here, under RQ's scheduler lock.
        """
        super().run_maintenance_tasks()
        if self._due_mover is None:
            self._due_mover = RQScheduler(self.queues, connection=self.connection)
        move_due_jobs(self._due_mover)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            super()._install_signal_handlers()

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None):
        """RQ's dequeue, waiting at most STOP_POLL_S at a time so that a stop asked meanwhile is seen.

        RQ's waiting loop only leaves on a job (a signal ends it in a main-thread worker; there is none
        here). Waking it with a job on the queue was not enough: another worker of the same queue (a
        separate worker process on the same Redis) could take that job, and this thread waited forever.
        """
        if timeout is None or max_idle_time is not None:  # burst mode, or RQ's own idle limit
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        while not self._stop_requested:
            result = super().dequeue_job_and_maintain_ttl(min(timeout, STOP_POLL_S), STOP_POLL_S)
            if result is not None:
                return result
        return None

    def unsubscribe(self) -> None:
        """RQ's unsubscribe from the worker's command channel, waiting at most 1 s for its pubsub thread.

        redis-py 8.2's PubSubWorkerThread.stop() joins the thread without a limit, and a thread that read the
        unsubscribe reply just before sleeps through RQ's 60 s poll first: stopping a worker took 60 s.
        The thread, a daemon, leaves at its next wake-up.
        """
        thread, self.pubsub_thread = self.pubsub_thread, None
        if thread is None:
            return
        self.pubsub.unsubscribe()
        if "timeout" in inspect.signature(thread.stop).parameters:
            thread.stop(timeout=1)
        else:  # redis-py before 8.2: stop() only clears the flag
            thread.stop()
            thread.join(timeout=1)
        if not thread.is_alive():
            self.pubsub.close()

    def stop(self) -> None:
        """Finish the current job, then leave the work loop (within STOP_POLL_S when idle)."""
        self.stop_asked = True
        self._stop_requested = True


STOP_POLL_S = 1
"""How often an idle InProcessWorker looks whether it was asked to stop."""


class _QuietSchedulerLock(logging.Filter):
    """Drops RQ's "Acquired scheduler lock" line: the due-job mover takes the lock every second."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Acquired scheduler lock")


logging.getLogger("rq.scheduler").addFilter(_QuietSchedulerLock())


def noop() -> None:
    """Does nothing: enqueued to wake a worker that is blocked waiting for jobs."""


def move_due_jobs(scheduler: RQScheduler) -> None:
    """Move scheduled jobs (retries) that are due back to their queues, under RQ's scheduler lock.

    RQ's own scheduler runs in a forked process; a worker holding a CUDA context must not fork, so the
    same RQScheduler.enqueue_scheduled_jobs runs in the worker's threads instead.
    """
    if scheduler.acquire_locks():
        try:
            scheduler.enqueue_scheduled_jobs()
        finally:  # held only for the move: a worker killed later leaves no lock for 61 s behind
            scheduler.release_locks()


def make_worker(context: WorkerContext, queues: tuple[str, ...]) -> InProcessWorker:
    """A worker on `queues` with the heartbeat settings of the context."""
    return InProcessWorker(list(queues), connection=context.redis, heartbeat_ttl_s=context.settings.job_heartbeat_ttl_s)
