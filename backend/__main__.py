"""Command line: `python -m backend worker | processes start|status|stop | prelabel --project N [--preview N]
[--cancel] | check-labels --project N | pin | status`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from rq.job import Job, JobStatus
from tqdm import tqdm

from .core.bulk import MAX_PREVIEW, Progress, cancel_bulk
from .core.catalog import submit
from .core.errors import BackendError, BadRequest
from .core.label_checks import request_check, stored_report
from .core.queues import ALL_QUEUES, NoRedisError, connect
from .core.settings import Settings, settings_or_exit
from .core.store import SupportStore

ENDED = (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED)


def _prelabel(args: argparse.Namespace, settings: Settings) -> int:
    redis = connect(settings, start_embedded=False)
    store = SupportStore(redis, settings.model_dir)
    store.require_project(args.project)
    if args.cancel:
        answer = cancel_bulk(redis, args.project)
        progress = answer["progress"]
        print(f"project {args.project}: {answer['dropped_batches']} queued batches dropped ({answer['dropped_tasks']} "
              f"tasks left unpredicted), {len(answer['running_batches'])} batches in flight finish; "
              f"{progress.get('done', 0)} of {progress.get('total', 0)} tasks posted")
        return 0
    if args.preview is not None:
        previewed = _preview(redis, settings, args)
        if previewed is None:
            return 1
        if not args.post or not previewed:  # nothing previewed: --post must not pre-label the whole project
            return 0
        args.tasks = previewed
    # The workers resolve the project with their own settings (model, Label Studio access): this
    # command needs only the backend's Redis.
    job = submit(redis, settings, "list-tasks-cli", args.project, args.tasks or None, meta={"project": args.project})
    print(f"queued job {job.id} to pre-label project {args.project}", flush=True)
    if args.no_wait:
        return 0
    queued = _wait(job, "listing tasks")
    if queued is None:
        return 1
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
    cancelled = [job.id for job in jobs if job.get_status() == JobStatus.CANCELED]
    lost = [job.id for job in jobs if job.get_status() not in (JobStatus.FINISHED, JobStatus.CANCELED)]
    print(f"posted {done} predictions, {failed} tasks failed" + (f", {len(lost)} batch jobs failed: {lost}" if lost else "")
          + (f", {len(cancelled)} batches cancelled" if cancelled else ""))
    for task_id, message in list(Progress(redis, args.project).failures().items())[:20]:
        print(f"  task {task_id}: {message}", file=sys.stderr)
    return 1 if lost else 0


def _wait(job: Job, what: str) -> dict | None:
    """The job's return value once it has ended, or None with its error printed."""
    while job.get_status() not in ENDED:
        time.sleep(0.5)
    if job.get_status() != JobStatus.FINISHED:
        result = job.latest_result()
        print(f"{what} failed: {(result.exc_string if result else '').strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return job.return_value()


def _preview(redis, settings: Settings, args: argparse.Namespace) -> list[int] | None:
    """Run a preview of N tasks and print it; the previewed task ids, or None if it failed."""
    if not 1 <= args.preview <= MAX_PREVIEW:
        raise BadRequest(f"--preview takes a number of tasks from 1 to {MAX_PREVIEW}, got {args.preview}")
    job = submit(redis, settings, "prelabel-preview", args.project, args.preview, meta={"project": args.project})
    print(f"queued preview job {job.id}: {args.preview} tasks of project {args.project}, nothing posted", flush=True)
    out = _wait(job, "the preview")
    if out is None:
        return None
    for task in out["previewed"]:
        print(f"  task {task['id']}: score {task['score']:.3f}, {task['regions']} regions {task['labels']}")
    for task_id, message in out["failures"].items():
        print(f"  task {task_id} failed: {message}", file=sys.stderr)
    kept = "-" if out["masks_kept_share"] is None else f"{out['masks_kept_share']:.0%}"
    mean = "-" if out["mean_score"] is None else f"{out['mean_score']:.3f}"
    print(f"{out['model_version']}: mean score {mean}, masks kept {kept} of {out['masks_predicted']}, "
          f"{out['seconds_per_task']:.2f} s per task; the whole run ({out['to_predict']} of {out['unlabeled_tasks']} "
          f"unlabeled tasks need a prediction) would take about {_duration(out['expected_s'])} with "
          f"{out['bulk_workers']} bulk worker(s)" + ("" if args.post else "; nothing was posted (--post posts them)"))
    return [task["id"] for task in out["previewed"]]


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _check_labels(redis, settings: Settings, args: argparse.Namespace) -> int:
    """Run a check of the project's labels (or follow the one running) and print the most suspicious annotations."""
    job_id, queued = request_check(redis, settings, args.project)
    job = Job.fetch(job_id, connection=redis)
    print(f"{'queued' if queued else 'following'} label-check job {job_id} of project {args.project}", flush=True)
    with tqdm(unit="image", desc="leave-one-out") as bar:
        while job.get_status(refresh=True) not in ENDED:
            meta = job.get_meta(refresh=True)
            bar.total, bar.n = meta.get("images"), meta.get("done", 0)
            bar.refresh()
            time.sleep(0.5)
    if _wait(job, "the label check") is None:
        return 1
    report = stored_report(redis, args.project)
    print(f"{report['checked']} masks of {report['images']} labeled images checked with {report['model_version']} in "
          f"{report['seconds']:.0f} s; {report['suspicious']} suspicious (suspicion {report['suspicious_at']:.2f} or more: how "
          "far the IoU and the mask's share inside the annotation fall below the label's usual, times the mask's score)")
    print(f"{'annotation':>10} {'task':>8}  {'label':<20} {'IoU':>5} {'below median':>12} {'suspicion':>9} {'rank in label':>13}  "
          "region (% of image)")
    for check in report["checks"][: args.top]:
        box = check["region"]
        where = "-" if box is None else f"x {box['x']:.0f} y {box['y']:.0f} w {box['width']:.0f} h {box['height']:.0f}"
        print(f"{check['annotation_id']:>10} {check['task_id']:>8}  {check['label'][:20]:<20} {check['iou']:>5.2f} "
              f"{check['below_median']:>12.2f} {check['suspicion']:>9.2f} {check['rank_in_label']:>13.0%}  {where}")
    return 0


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
    pre.add_argument("--preview", type=int, metavar="N", help="predict N tasks spread over the project, report scores, "
                     "masks kept and the whole run's expected time, and post nothing")
    pre.add_argument("--post", action="store_true", help="with --preview: then pre-label the previewed tasks")
    pre.add_argument("--cancel", action="store_true", help="cancel the project's running pre-labeling: queued batches "
                     "are dropped, batches being predicted finish")
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
    checks = sub.add_parser("check-labels", help="predict each labeled image from the others and list the annotations "
                            "the model disagrees with most")
    checks.add_argument("--project", type=int, required=True)
    checks.add_argument("--top", type=int, default=20, help="how many to print (default 20)")
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
        from .worker.supervision import run_worker

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
    if args.command == "check-labels":
        return _check_labels(redis, settings, args)
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
