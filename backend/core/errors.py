"""Backend errors, each with the HTTP status the web layer answers with."""

from __future__ import annotations


class BackendError(Exception):
    """Base class: a message for the user and an HTTP status."""

    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(BackendError):
    """The request or its payload is malformed or does not fit this backend."""

    status = 400


class Conflict(BackendError):
    """The request collides with work in progress (a second training run of a project)."""

    status = 409


class NotFound(BackendError):
    """The project, job or model version named does not exist here."""

    status = 404


class MediaError(BackendError):
    """A task's image cannot be fetched, is refused by policy, or does not decode."""

    status = 422


class NoExamplesYet(BackendError):
    """A label has no usable support example yet: the same answer for a click and a smart tool."""

    status = 422


class ServiceUnavailable(BackendError):
    """Redis or the workers are not there; the message says which and what to start."""

    status = 503


class DeadlinePassed(BackendError):
    """A click job's caller stopped waiting: its remaining model passes are not run."""

    status = 504


class PredictionTimeout(BackendError):
    """A job did not finish within the wait; it goes on and posts its predictions through the API."""

    status = 504


class VersionUnavailable(ServiceUnavailable):
    """A model version is registered but its folder cannot be found or loaded by this worker."""


class Overloaded(ServiceUnavailable):
    """The workers cannot answer in time now; the client may retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 5):
        super().__init__(message)
        self.retry_after = retry_after


class RelayedError(BackendError):
    """A worker's error whose class the web process does not know (a Label Studio client error): its status kept."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def error_record(exc: BackendError) -> dict:
    """What crosses the queue of a worker's BackendError: its class name, HTTP status and message."""
    return {"kind": type(exc).__name__, "status": exc.status, "error": exc.message}


def error_from_record(record: dict) -> BackendError:
    """The error a worker recorded with error_record, as the same class where it is defined here (else a
    RelayedError), so the web answers with the status the worker saw."""
    known = {cls.__name__: cls for cls in _subclasses(BackendError)}
    cls = known.get(str(record.get("kind")))
    message, status = str(record.get("error", "")), int(record.get("status") or 500)
    if cls is not None and cls.__init__ is BackendError.__init__ and cls.status == status:
        return cls(message)
    return RelayedError(message, status)


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found
