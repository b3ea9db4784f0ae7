"""Small HTTP helpers shared by the API, file and control routes."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from genq.simulator.state import STATE_KEY, SimState


class BadRequest(Exception):
    """Raised by validation; answered as 400 `{"error": <message>}`."""


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def state_of(request: web.Request) -> SimState:
    return request.app[STATE_KEY]


async def json_object(request: web.Request) -> dict[str, Any]:
    try:
        body: object = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest("body must be a JSON object") from exc
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body
