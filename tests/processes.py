"""Backend processes started by tests: real `python -m backend worker` processes, optionally on a shifted clock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from bench.ls_harness import REPO, stop

HEARTBEAT_S = 6


class WorkerProcess:
    """`python -m backend worker` on a test Redis, started and killed by the test."""

    def __init__(self, redis_url: str, settings, queues: list[str], log: Path, **env):
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "DIFFEWS", "TRAIN"))}
        environment.update(
            REDIS_URL=redis_url, MODEL_DIR=str(settings.model_dir), DIFFEWS_MODEL="tiny",
            DIFFEWS_TINY_RESOLUTION=str(settings.tiny_resolution), JOB_HEARTBEAT_TTL_S=str(HEARTBEAT_S),
            PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **env,
        )
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "backend", "worker", "--queues", *queues], cwd=REPO,
                                     env=environment, stdout=log.open("a"), stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the worker."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop(self.proc)


    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None


def faketime_env(offset: str) -> dict[str, str]:
    """Environment that runs a process with its clock shifted by `offset` (e.g. "-120s"), through libfaketime."""
    import libfaketime

    needs_reload, env = libfaketime.get_reload_information()
    return {**env, "FAKETIME": offset}
