"""The Flask app: one Backend per app, the two blueprints, error answers and basic auth."""

from __future__ import annotations

import hmac
import logging

from flask import Flask, jsonify, request
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..core.admission import ClickSlots
from ..core.errors import BackendError, Overloaded
from ..core.queues import connect
from ..core.registry import VersionRegistry
from ..core.services import Backend
from ..core.settings import Settings
from ..core.store import SupportStore
from ..core.triggers import count_rejected_webhook
from .admin import admin
from .protocol import protocol
from .state import EXTENSION, WebState, startup_warnings, web_state

logger = logging.getLogger(__name__)

__all__ = ["create_app", "startup_warnings"]


def create_app(settings: Settings | None = None, redis: Redis | None = None) -> Flask:
    """Build the Flask app; with no arguments, settings come from the environment."""
    settings = settings or Settings.from_env()
    redis = redis if redis is not None else connect(settings)
    backend = Backend(settings, redis, SupportStore(redis, settings.model_dir))
    VersionRegistry(redis, backend.store).rebuild_at_start()  # version folders are the truth; Redis may have lost them
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions[EXTENSION] = WebState(backend, ClickSlots(settings.predict_concurrency))
    app.register_blueprint(protocol)
    app.register_blueprint(admin)
    _register_errors(app, settings)
    app.before_request(_basic_auth)
    return app


def _register_errors(app: Flask, settings: Settings) -> None:
    @app.errorhandler(BackendError)
    def _backend_error(exc: BackendError):
        response = jsonify(error=exc.message, status=exc.status)
        response.status = f"{exc.status} {reason_phrase(exc.message)}"
        if isinstance(exc, Overloaded):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.errorhandler(RedisConnectionError)
    @app.errorhandler(RedisTimeoutError)
    def _redis_down(exc: RedisError):
        return jsonify(error=f"Redis is unavailable ({exc}); start Redis or fix REDIS_URL", status=503), 503

    @app.errorhandler(RedisError)
    def _redis_error(exc: RedisError):
        logger.exception("Redis refused a command")
        return jsonify(error=f"Redis refused a command ({type(exc).__name__}: {exc})", status=500), 500

    @app.errorhandler(413)
    def _too_large(exc):
        return jsonify(error=f"request body exceeds MAX_REQUEST_BYTES={settings.max_request_bytes}", status=413), 413

    @app.errorhandler(404)
    def _not_found(exc):
        return jsonify(error=f"no route {request.method} {request.path}", status=404), 404

    @app.errorhandler(405)
    def _bad_method(exc):
        return jsonify(error=f"{request.method} is not allowed on {request.path}", status=405), 405


def reason_phrase(message: str, limit: int = 300) -> str:
    """The error message as an HTTP reason phrase (one line of printable ASCII).

    Label Studio shows an ML backend's failed answer as `str(requests.HTTPError)`, which carries the status
    line's reason phrase but not the body ("400 Client Error: BAD REQUEST for url: ..."): with the message as the
    phrase, an annotator using a smart tool reads why in Label Studio ("400 Client Error: project 1 has no usable
    support examples of 'car' yet: ...").
    """
    text = "".join(ch if " " <= ch <= "~" else " " for ch in message).strip()
    return (text[: limit - 3] + "...") if len(text) > limit else (text or "error")


def _basic_auth():
    backend = web_state().backend
    settings = backend.settings
    if not settings.auth_enabled or request.path == "/health":
        return None
    auth = request.authorization
    user_ok = auth is not None and hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
    pass_ok = auth is not None and hmac.compare_digest((auth.password or "").encode(), settings.basic_auth_pass.encode())
    if user_ok and pass_ok:
        return None
    if request.path == "/webhook":  # Label Studio logs nothing when its webhook is refused: count it here
        count_rejected_webhook(backend.redis)
    response = jsonify(error="wrong or missing basic auth credentials (BASIC_AUTH_USER / BASIC_AUTH_PASS)", status=401)
    response.status_code = 401
    response.headers["WWW-Authenticate"] = 'Basic realm="diffews"'
    return response
