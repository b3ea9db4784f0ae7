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

The patch replaces a private kombu method, so it is only installed on the kombu versions it was
written and tested for (``constraints.txt`` pins one of them): any other version stops the worker at
start with a RuntimeError. ``GENQ_KOMBU_FIX=off`` skips the patch (and the check) altogether, for a
kombu that no longer needs it; workers then exit on a Redis restart if that kombu still has the bug.
"""

from __future__ import annotations

import os
import re
from typing import Any

import kombu
import redis
from kombu.transport import redis as kombu_redis

SUPPORTED = ((5, 7), (5, 8))
"""kombu versions the patch was written for: from the first (inclusive) to the second (exclusive)."""
ESCAPE_HATCH = "GENQ_KOMBU_FIX"

_installed = False


def kombu_version() -> str:
    return str(kombu.__version__)


def is_supported(version: str) -> bool:
    """Whether ``version`` (``5.7.0``, ``5.7.1rc1`` ...) lies in :data:`SUPPORTED`."""
    numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    return SUPPORTED[0] <= numbers < SUPPORTED[1]


def supported_range() -> str:
    (low_major, low_minor), (high_major, high_minor) = SUPPORTED
    return f">={low_major}.{low_minor},<{high_major}.{high_minor}"


def install() -> None:
    """Make a torn-down broker connection raise a connection error, not an AttributeError.

    Raises RuntimeError on a kombu outside :data:`SUPPORTED` unless ``GENQ_KOMBU_FIX=off``."""
    global _installed
    if _installed or os.environ.get(ESCAPE_HATCH, "").strip().lower() == "off":
        return
    version = kombu_version()
    if not is_supported(version):
        raise RuntimeError(
            f"genq/worker/kombu_fix.py patches kombu {supported_range()} internals, but kombu {version} is "
            f"installed: install with `pip install -c constraints.txt`, or set {ESCAPE_HATCH}=off to run "
            "without the patch (see docs/operations.md)"
        )
    original = kombu_redis.Channel._connparams

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        transport = getattr(self, "connection", None)
        if transport is None or getattr(transport, "client", None) is None:
            raise redis.exceptions.ConnectionError("broker connection closed (Redis restarted?)")
        return original(self, asynchronous)  # type: ignore[no-untyped-call]

    kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]
    _installed = True
