"""One clock for every process: Redis's.

Due times, deadlines, TTL starts and "is that POST still in flight?" all compare times written by
different hosts (a producer, several workers, the sweeper). Read from each host's own wall clock, 40 s
of skew turns a live POST into ``submit_unknown`` and a producer two hours behind times a model out at
its first check. So each process reads Redis's ``TIME`` once, then counts forward on its own monotonic
clock (which no NTP step or operator can move), and reads ``TIME`` again every ``resync`` seconds to
stay within the drift of a monotonic clock over that span. No step pays a round trip for the time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)

Clock = Callable[[], float]
"""Seconds since the Unix epoch, as a float."""


class RedisClock:
    """Redis's time, read once per ``resync`` seconds and counted forward on the monotonic clock."""

    def __init__(
        self, client: redis.Redis, *, resync: float = 60.0, monotonic: Clock = time.monotonic
    ) -> None:
        self.redis = client
        self.resync = resync
        self.monotonic = monotonic
        self._lock = threading.Lock()
        self._base: float | None = None  # Redis time at the last read
        self._mark = 0.0  # monotonic time at the last read

    def __call__(self) -> float:
        mono = self.monotonic()
        if self._base is None or mono - self._mark >= self.resync:
            with self._lock:
                if self._base is None or mono - self._mark >= self.resync:
                    self._sync()
                    mono = self.monotonic()
        assert self._base is not None
        return self._base + (mono - self._mark)

    def _sync(self) -> None:
        before = self.monotonic()
        try:
            seconds, micros = self.redis.time()
        except redis.RedisError:
            if self._base is None:
                raise  # no time ever read: the caller's Redis call would fail just the same
            log.warning("could not read Redis TIME; counting on from the last reading")
            return
        after = self.monotonic()
        # TIME was taken somewhere in the round trip: its middle is the best guess.
        self._base = seconds + micros / 1e6
        self._mark = (before + after) / 2
