"""Poll policy arithmetic: pure functions, no I/O.

A job of a kind is first checked ``first_delay`` seconds after submission, then every ``interval``
seconds growing by ``backoff`` per check up to ``max_interval``, each wait spread by ± ``jitter`` so
that a batch submitted together does not poll in lockstep. Nothing is scheduled past the deadline.
"""

from __future__ import annotations

import math
import random

from genq.settings import PollPolicy


def poll_delay(policy: PollPolicy, polls_done: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before the next status check, after ``polls_done`` checks.

    >>> from genq.settings import PollPolicy
    >>> p = PollPolicy(first_delay=2, interval=1, backoff=2, max_interval=5, jitter=0, deadline=60)
    >>> [poll_delay(p, n) for n in range(5)]
    [2.0, 1.0, 2.0, 4.0, 5.0]
    """
    if polls_done == 0:
        base = policy.first_delay
    else:
        base = min(
            policy.max_interval,
            policy.interval * policy.backoff ** min(polls_done - 1, _growth_steps(policy)),
        )
    return _spread(base, policy.jitter, rng)


def error_delay(
    base: float, errors_in_row: int, retry_after: float | None, cap: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait after the ``errors_in_row``-th consecutive transient error (1-based).

    Exponential from ``base``, capped at ``cap``, never earlier than the upstream's Retry-After.
    """
    delay = min(cap, base * 2 ** max(0, errors_in_row - 1))
    delay = _spread(delay, 0.2, rng)
    return max(delay, retry_after or 0.0)


def clamp_to_deadline(delay: float, now: float, deadline_at: float) -> float:
    """Never wait past the deadline: the check at the deadline is the one that times the job out."""
    return max(0.0, min(delay, deadline_at - now))


def _growth_steps(policy: PollPolicy) -> int:
    """How many backoff steps reach ``max_interval`` (beyond that the power would only overflow)."""
    if policy.backoff <= 1.0 or policy.max_interval <= policy.interval:
        return 0
    return math.ceil(math.log(policy.max_interval / policy.interval, policy.backoff))


def _spread(base: float, jitter: float, rng: random.Random | None) -> float:
    if jitter <= 0:
        return float(base)
    r = (rng or random).uniform(-jitter, jitter)
    return base * (1.0 + r)
