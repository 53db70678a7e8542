"""Waiting for the backend's queues from a test client."""

from __future__ import annotations

import time


def wait_idle(client, pid: int = 1, queues: tuple[str, ...] = ("ingest",), seconds: float = 30) -> None:
    """Wait until `queues` hold no waiting and no running job (AssertionError after `seconds`)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = client.get(f"/status/{pid}").json
        if all(status["queues"][q] == 0 and status["running"][q] == 0 for q in queues):
            return
        time.sleep(0.05)
    raise AssertionError(f"queues {queues} still busy after {seconds} s")
