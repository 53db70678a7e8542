"""Entry point: `gunicorn _wsgi:app` (REDIS_URL set, workers separate) or `python _wsgi.py` (all in one)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from backend.web.app import create_app
from backend.core.settings import Settings, settings_or_exit
from backend.core.versions import describe_model

logger = logging.getLogger("diffews")


def _log_model(settings: Settings) -> None:
    info = describe_model(settings)
    if info.get("note"):
        logger.info(info["note"])
    if info.get("warning"):
        logger.warning(info["warning"])
    logger.info("model %s (version %s)", info["spec"] or f"matcher:{info['backbone']}", info["version"])


def _log_warnings(app) -> None:
    from backend.web.state import EXTENSION, startup_warnings

    backend = app.extensions[EXTENSION].backend
    try:
        for warning in startup_warnings(backend.settings, backend.redis):
            logger.warning(warning)
    except Exception as exc:  # Redis not up yet: /health says so
        logger.warning("cannot check Redis at start: %s", exc)


def _leave_a_core_for_the_web(settings: Settings) -> None:
    """On the CPU, let the model use all cores but one: the web threads of this process need one to answer."""
    import torch

    if settings.device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))


def main() -> None:
    settings = settings_or_exit()
    parser = argparse.ArgumentParser(description="DiffewS few-shot segmentation backend for Label Studio")
    parser.add_argument("--host", default=settings.host,
                        help="address to listen on (default HOST or 127.0.0.1; 0.0.0.0 to accept other machines, e.g. Docker)")
    parser.add_argument("--port", type=int, default=settings.port, help="default PORT or 9090")
    parser.add_argument("--log-level", default=settings.log_level, help="default LOG_LEVEL or INFO")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _log_model(settings)
    # SIGTERM (docker stop, systemd, kill) ends the process like Ctrl-C, so the cleanup below always runs.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    workers = None
    try:
        app = create_app(settings)
        _log_warnings(app)
        if not settings.redis_url and settings.embedded_worker:
            from backend.core.store import SupportStore
            from backend.web.state import EXTENSION
            from backend.worker.runtime import WorkerContext
            from backend.worker.supervision import EMBEDDED_QUEUES, EmbeddedWorkers

            backend = app.extensions[EXTENSION].backend
            context = WorkerContext(settings, backend.redis, SupportStore(backend.redis, settings.model_dir))
            # Web and model share this process: hand the GIL over sooner, so /health and /webhook threads are
            # not kept waiting behind the workers' Python code (the default interval is 5 ms).
            sys.setswitchinterval(0.0005)
            _leave_a_core_for_the_web(settings)
            workers = EmbeddedWorkers(context).start()
            logger.info("no REDIS_URL: embedded Redis under %s and one in-process worker per queue (%s)",
                        settings.model_dir.resolve(), ", ".join(q[0] for q in EMBEDDED_QUEUES))
        app.run(host=args.host, port=args.port, debug=args.debug, threaded=True, use_reloader=False)
    finally:
        if workers is not None:
            workers.stop(timeout=10)
        from backend.core.queues import stop_embedded

        stop_embedded()  # the embedded redis-server this process started, on every way out


if __name__ == "__main__":
    main()
else:  # imported by gunicorn: workers run separately (`python -m backend worker`)
    _settings = settings_or_exit()
    logging.basicConfig(level=_settings.log_level.upper())
    if not _settings.redis_url:
        raise RuntimeError(
            "gunicorn needs REDIS_URL: its processes and the workers must share one Redis. "
            "For one-process local use, run `python _wsgi.py` (embedded Redis and worker)."
        )
    _log_model(_settings)
    app = create_app(_settings)
    _log_warnings(app)
