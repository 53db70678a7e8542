"""Command line: `python -m backend worker | processes start|status|stop | prelabel --project N | pin | status`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from rq.job import Job, JobStatus
from tqdm import tqdm

from .core.bulk import Progress
from .core.catalog import submit
from .core.errors import BackendError
from .core.queues import ALL_QUEUES, NoRedisError, connect
from .core.settings import Settings, settings_or_exit
from .core.store import SupportStore

ENDED = (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED)


def _prelabel(args: argparse.Namespace, settings: Settings) -> int:
    redis = connect(settings, start_embedded=False)
    store = SupportStore(redis, settings.model_dir)
    store.require_project(args.project)
    # The workers resolve the project with their own settings (model, Label Studio access): this
    # command needs only the backend's Redis.
    job = submit(redis, settings, "list-tasks-cli", args.project, args.tasks or None, meta={"project": args.project})
    print(f"queued job {job.id} to pre-label project {args.project}", flush=True)
    if args.no_wait:
        return 0
    while job.get_status() not in ("finished", "failed"):
        time.sleep(0.5)
    if job.get_status() == "failed":
        result = job.latest_result()
        print(f"listing tasks failed: {(result.exc_string if result else '').strip().splitlines()[-1:]}", file=sys.stderr)
        return 1
    queued = job.return_value()
    print(f"{queued['queued_tasks']} tasks queued in {len(queued['jobs'])} batches with {queued['model_version']}, "
          f"{queued['skipped']} already predicted or in progress", flush=True)
    jobs = [Job.fetch(job_id, connection=redis) for job_id in queued["jobs"]]
    done = failed = 0
    with tqdm(total=queued["queued_tasks"], unit="task", desc=f"project {args.project}") as bar:
        while True:  # follow this run's own batch jobs: their meta counts, until every one has ended
            metas = [job.get_meta(refresh=True) for job in jobs]
            done = sum(m.get("done", 0) for m in metas)
            failed = sum(m.get("failed", 0) for m in metas)
            bar.n = min(done + failed, queued["queued_tasks"])
            bar.set_postfix(failed=failed)
            bar.refresh()
            ended = [job.get_status(refresh=True) in ENDED for job in jobs]
            if all(ended):
                break
            time.sleep(0.5)
    lost = [job.id for job in jobs if job.get_status() != JobStatus.FINISHED]
    print(f"posted {done} predictions, {failed} tasks failed" + (f", {len(lost)} batch jobs failed: {lost}" if lost else ""))
    for task_id, message in list(Progress(redis, args.project).failures().items())[:20]:
        print(f"  task {task_id}: {message}", file=sys.stderr)
    return 1 if lost else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend", description=__doc__)
    parser.add_argument("--log-level", default=None, help="default: LOG_LEVEL, else INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="run an RQ worker (model loaded once, no fork per job)")
    worker.add_argument("--queues", nargs="+", default=list(ALL_QUEUES), choices=list(ALL_QUEUES))
    worker.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    pre = sub.add_parser("prelabel", help="pre-annotate a project's unlabeled tasks")
    pre.add_argument("--project", type=int, required=True)
    pre.add_argument("--tasks", type=int, nargs="*", help="only these task ids")
    pre.add_argument("--no-wait", action="store_true", help="queue and exit instead of showing progress")
    conv = sub.add_parser("labelmap", help="convert a Label Studio JSON export (brush labels) to the label-map layout")
    conv.add_argument("--export", required=True, type=Path)
    conv.add_argument("--images", required=True, type=Path, help="folder holding the exported tasks' image files")
    conv.add_argument("--out", required=True, type=Path)
    conv.add_argument("--split", default="val")
    pin = sub.add_parser("pin", help="pin a project to a model version (roll back), or unpin with --version none")
    pin.add_argument("--project", type=int, required=True)
    pin.add_argument("--version", required=True)
    procs = sub.add_parser("processes", help="start, list or stop Redis, the web process and workers on this machine")
    procs.add_argument("action", choices=("start", "status", "stop"))
    procs.add_argument("--bind", default="127.0.0.1:9090", help="the web process's address (default 127.0.0.1:9090)")
    procs.add_argument("--workers", type=int, default=1, help="worker processes (default 1; one per GPU)")
    procs.add_argument("--web-workers", type=int, default=2, help="gunicorn processes (default 2)")
    procs.add_argument("--redis-port", type=int, default=6379, help="port of the Redis started when REDIS_URL is unset")
    stat = sub.add_parser("status", help="print a project's support examples and progress as JSON")
    stat.add_argument("--project", type=int, required=True)
    args = parser.parse_args(argv)
    settings = settings_or_exit()
    logging.basicConfig(level=(args.log_level or settings.log_level).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args, settings)
    except NoRedisError as exc:
        print(exc, file=sys.stderr)
        return 2
    except BackendError as exc:
        print(exc.message, file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "worker":
        from .worker.runtime import run_worker

        run_worker(tuple(args.queues), burst=args.burst)
        return 0
    if args.command == "processes":
        from . import processes

        if args.action == "start":
            return processes.start(settings, bind=args.bind, workers=args.workers, web_workers=args.web_workers,
                                   redis_port=args.redis_port)
        return processes.status(settings) if args.action == "status" else processes.stop(settings)
    if args.command == "prelabel":
        return _prelabel(args, settings)
    if args.command == "labelmap":
        from .core.export import export_to_label_map

        print(json.dumps(export_to_label_map(args.export, args.images, args.out, args.split)))
        return 0
    redis = connect(settings, start_embedded=False)
    store = SupportStore(redis, settings.model_dir)
    store.require_project(args.project)
    if args.command == "pin":
        from .core.refresh import pin

        version = None if args.version.lower() == "none" else args.version
        answer = pin(redis, settings, store, args.project, version)
        refresh = f"; refresh of its predictions: {answer['refresh']}" if "refresh" in answer else ""
        print(f"project {args.project} now predicts with {answer['current']}{refresh}")
        return 0
    print(json.dumps({"examples": store.label_counts(args.project), "revision": store.revision(args.project),
                      "progress": Progress(redis, args.project).read()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
