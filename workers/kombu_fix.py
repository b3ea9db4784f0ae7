"""A workaround for a Celery 5.7 / kombu 5.7 crash when the Redis broker restarts.

On losing the broker, Celery tears down the broken connection while the worker still uses its
channel: closing it puts the held (unacknowledged) countdown polls back on the queue, and tasks that
finish meanwhile acknowledge their messages. Both reach ``Channel._connparams`` through a transport
whose connection is already gone and fail with ``AttributeError: 'NoneType' object has no attribute
'hostname'`` (or ``'client'``), which Celery treats as unrecoverable: the worker exits. Measured here:
9 of 10 Redis restarts under load.

Raising the transport's own connection error instead lets Celery handle it as the connection loss it
is: it logs, reconnects and goes on. Whatever could not be restored or acknowledged stays in kombu's
unacked hash in Redis (put back after the visibility timeout), and the ledger's sweeper re-drives every
job concerned within its grace; a late duplicate finds the ledger moved on and does nothing.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis

_installed = False


def install() -> None:
    """Make a torn-down broker connection raise a connection error, not an AttributeError."""
    global _installed
    if _installed:
        return
    original = kombu_redis.Channel._connparams

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        transport = getattr(self, "connection", None)
        if transport is None or getattr(transport, "client", None) is None:
            raise redis.exceptions.ConnectionError("broker connection closed (Redis restarted?)")
        return original(self, asynchronous)  # type: ignore[no-untyped-call]

    kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]
    _installed = True
