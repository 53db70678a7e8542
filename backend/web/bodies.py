"""Request bodies: parsed and checked, or BadRequest naming the field that is wrong."""

from __future__ import annotations

from typing import Annotated

from flask import request
from pydantic import BaseModel, Field

from ..core.errors import BadRequest


def json_body() -> dict:
    """The request's JSON object; BadRequest if it is not one (or nests too deeply to parse)."""
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        raise BadRequest("request body is JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object (Content-Type: application/json)")
    return body


class PinBody(BaseModel):
    """POST /projects/<id>/pin: the version to pin (or roll back to), or null to unpin."""

    version: Annotated[str | None, Field(strict=True, description="a version's name to pin (or roll back to), or "
                                                                 "null to unpin")]
