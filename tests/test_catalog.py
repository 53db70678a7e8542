"""The job catalog: every job kind's function exists, and submit is the one place queues and timeouts are chosen."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from backend.core.catalog import GRACE_S, KINDS, submit
from backend.core.queues import ALL_QUEUES, QUEUE_CLICK

BACKEND = Path(__file__).resolve().parents[1] / "backend"


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_kind_runs_a_worker_function(name):
    """Each kind's dotted path imports to a function of backend.worker, on one of the served queues."""
    kind = KINDS[name]
    module, func = kind.func.rsplit(".", 1)
    assert module.startswith("backend.worker.")
    assert callable(getattr(importlib.import_module(module), func))
    assert kind.queue in ALL_QUEUES


def test_only_clicks_use_the_click_queue():
    """Nothing but a click waits on the click queue: backfills and listings never run ahead of a user."""
    assert {name for name, kind in KINDS.items() if kind.queue == QUEUE_CLICK} == {"click", "smart-tool"}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_submit_takes_queue_timeout_retries_and_ttl_from_the_table(name, redis, settings):
    """A submitted job carries exactly its row's queue, timeout, retries and queue TTL."""
    kind = KINDS[name]
    job = submit(redis, settings, name, {"project": 1}, job_id=f"test-{name}", meta={"project": 1})
    assert job.origin == kind.queue and job.func_name == kind.func
    assert job.timeout == kind.timeout_s(settings)
    assert (job.retries_left or 0) == kind.retries
    assert job.ttl == kind.ttl_s(settings)
    assert job.meta == {"kind": name, "project": 1}
    if kind.queue == QUEUE_CLICK:
        assert job.ttl == int(settings.predict_wait_s + GRACE_S) + 1


def test_submit_refuses_an_unknown_kind(redis, settings):
    """A kind missing from the catalog is a KeyError, not a job on some default queue."""
    with pytest.raises(KeyError):
        submit(redis, settings, "no-such-kind")


def _enqueue_calls(path: Path) -> list[int]:
    tree = ast.parse(path.read_text())
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None)) == "enqueue"]


def test_the_catalog_is_the_only_place_jobs_are_enqueued():
    """No backend module but the catalog calls enqueue (queues.py defines it)."""
    allowed = {"core/catalog.py", "core/queues.py"}
    found = {str(p.relative_to(BACKEND)): lines for p in BACKEND.rglob("*.py") if (lines := _enqueue_calls(p))}
    assert set(found) <= allowed, found
