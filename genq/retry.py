"""The one rule for an upstream call that raised: try again later, or give up. Pure; no I/O.

Every step that calls the upstream (submit, status check, train call, readiness check) asks
:func:`after` what to do, then records the answer its own way. A caller first handles what only it
knows: a submit or train call whose outcome is unknown (an ambiguous :class:`UpstreamUnavailable`, a
:class:`ProtocolError` on a 2xx) must not be repeated, which is no concern of a status check.

- :class:`Throttled` (our own limiter; nothing was sent): again after its wait, not counted.
- :class:`TransientError` and :class:`ProtocolError`: again with exponential backoff (never before the
  upstream's Retry-After), counted; ``limit`` in a row gives up.
- :class:`PermanentError`: give up at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from genq.errors import GenqError, PermanentError, Throttled, TransientError
from genq.polling import error_delay


@dataclass(frozen=True)
class Again:
    """Try again in ``delay`` seconds; ``errors`` is the count in a row after this one."""

    delay: float
    errors: int
    counted: bool


@dataclass(frozen=True)
class GiveUp:
    """End with this reason, to follow the name of the step (``"status check " + reason``)."""

    reason: str


def after(
    exc: GenqError, errors: int, *, limit: int, backoff: float, cap: float, rng: random.Random | None = None
) -> Again | GiveUp:
    """What to do after ``exc``, with ``errors`` counted failures in a row before it.

    >>> after(TransientError("503"), 0, limit=3, backoff=2, cap=60).errors
    1
    >>> after(TransientError("503"), 2, limit=3, backoff=2, cap=60)
    GiveUp(reason='failed 3 times in a row: 503')
    """
    if isinstance(exc, Throttled):
        return Again(exc.retry_after or 0.1, errors, counted=False)
    if isinstance(exc, PermanentError):
        return GiveUp(f"refused: {exc}")
    n = errors + 1
    if n >= limit:
        return GiveUp(f"failed {n} times in a row: {exc}")
    retry_after = exc.retry_after if isinstance(exc, TransientError) else None
    return Again(error_delay(backoff, n, retry_after, cap, rng), n, counted=True)
