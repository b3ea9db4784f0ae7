"""When to check a job: learned duration histograms in Redis, and the poll waits made from them.

The arithmetic is :mod:`genq.schedule` (pure); this module reads and writes the histograms
(:func:`genq.keys.poll_durations`, one hash per class of job) and turns the schedule into the waits
:class:`genq.jobs.JobService` schedules. A finished job costs one Lua call (its class's and its kind's
histogram, a few bins each); a poll costs no Redis call of its own: each process keeps what it read for
``poll.adaptive_cache`` seconds. With ``poll.adaptive`` off, the waits are the fixed per-kind policies of
:func:`genq.polling.poll_delay`, and nothing is learned.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence

import redis

from genq import keys, schedule
from genq.polling import poll_delay
from genq.schedule import Learned
from genq.schemas import JobRecord
from genq.settings import PollPolicy, PollSettings

log = logging.getLogger(__name__)

HISTOGRAM_TTL = 30 * 86400
"""Seconds a class's histogram outlives its last observation."""

_OBSERVE = """
-- KEYS: histograms (the job's class, then its kind). ARGV: growth, ttl, rescale_at, then bin, weight...
-- Each observation weighs s (the hash's field, 1 at first); s then grows by `growth`, so older ones
-- weigh relatively less without rewriting them. Past rescale_at, every weight is divided by s.
local growth, ttl, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for _, key in ipairs(KEYS) do
  local s = tonumber(redis.call('HGET', key, 's') or '1')
  for i = 4, #ARGV, 2 do
    redis.call('HINCRBYFLOAT', key, 'b' .. ARGV[i], tonumber(ARGV[i + 1]) * s)
  end
  redis.call('HINCRBYFLOAT', key, 'n', s)
  s = s * growth
  if s > cap then
    local flat = redis.call('HGETALL', key)
    for j = 1, #flat, 2 do
      if flat[j] ~= 's' then redis.call('HSET', key, flat[j], tostring(tonumber(flat[j + 1]) / s)) end
    end
    s = 1
  end
  redis.call('HSET', key, 's', tostring(s))
  redis.call('EXPIRE', key, ttl)
end
return 1
"""


class DurationStore:
    """The learned histograms of one Redis, with a per-process cache of what was read."""

    def __init__(
        self, client: redis.Redis, poll: PollSettings, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.redis = client
        self.poll = poll
        self.monotonic = monotonic
        self._observe = client.register_script(_OBSERVE)
        self._cache: dict[str, tuple[float, Learned | None]] = {}
        self._lock = threading.Lock()

    def observe(self, classes: Sequence[str], lo: float, hi: float) -> None:
        """One job of ``classes`` finished within ``(lo, hi]`` seconds of its POST."""
        args: list[float | int | str] = [
            repr(schedule.growth(self.poll.adaptive_half_life)),
            HISTOGRAM_TTL,
            repr(schedule.RESCALE_AT),
        ]
        for i, w in schedule.spread(lo, hi).items():
            args += [i, repr(w)]
        self._observe(keys=[keys.poll_durations(c) for c in classes], args=args)

    def learned(self, job_class: str) -> Learned | None:
        """The class's distribution, read at most once per ``adaptive_cache`` seconds per process."""
        now = self.monotonic()
        hit = self._cache.get(job_class)
        if hit is not None and hit[0] > now:
            return hit[1]
        found = Learned.from_hash(self.redis.hgetall(keys.poll_durations(job_class)))
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()  # a bound on memory, whatever the number of classes
            self._cache[job_class] = (now + self.poll.adaptive_cache, found)
        return found

    def best(self, classes: Sequence[str]) -> Learned | None:
        """The most specific class with enough recent observations, or None (nothing learned yet)."""
        for job_class in classes:
            found = self.learned(job_class)
            if found is not None and found.samples >= self.poll.adaptive_min_samples:
                return found
        return None


_TIMING = ("first_delay", "interval", "backoff", "max_interval")


def _timing(policy: PollPolicy) -> tuple[float, ...]:
    return tuple(getattr(policy, name) for name in _TIMING)


_DEFAULT_TIMINGS = frozenset(
    _timing(PollSettings.model_fields[kind].default) for kind in ("image", "upscale", "video")
)


class PollPlanner:
    """The waits between a job's checks: adaptive when ``poll.adaptive`` is on and the job's kind keeps
    the default policy timing; a kind given its own timing (``GENQ_POLL_IMAGE='{"interval": 1, ...}'``)
    is polled by that fixed policy, as is every kind with ``poll.adaptive`` off."""

    def __init__(self, client: redis.Redis, poll: PollSettings) -> None:
        self.poll = poll
        self.store = DurationStore(client, poll)

    def adaptive(self, policy: PollPolicy) -> bool:
        """Whether jobs polled under ``policy`` get the adaptive schedule."""
        return self.poll.adaptive and _timing(policy) in _DEFAULT_TIMINGS

    def first_delay(self, rec: JobRecord, policy: PollPolicy, rng: random.Random) -> float:
        """Seconds from the POST's answer to the first check."""
        if not self.adaptive(policy):
            return poll_delay(policy, 0, rng)
        gap = self.poll.adaptive_gap
        first = schedule.first_poll(
            self._learned(rec), gap, self.poll.adaptive_skip, self.poll.adaptive_min_samples
        )
        # Up to half a jitter of the gap earlier, so jobs posted together do not poll in lockstep;
        # earlier, never later: no job waits longer than the schedule says.
        return max(0.0, first - rng.uniform(0.0, policy.jitter / 2) * gap)

    def next_delay(
        self, rec: JobRecord, policy: PollPolicy, polls_done: int, now: float, rng: random.Random
    ) -> float:
        """Seconds from now to the next check of a job still working after ``polls_done`` checks."""
        if not self.adaptive(policy) or rec.next_poll_at is None:
            return poll_delay(policy, polls_done, rng)
        gap = self.poll.adaptive_gap
        # Fixed times from the POST: gap after the check's due time, not after when it ran.
        return schedule.next_poll(rec.next_poll_at, now, gap, gap / 4) - now

    def finished(self, rec: JobRecord, policy: PollPolicy, now: float) -> None:
        """Learn from a job whose check at ``now`` found it ended upstream (success or failure)."""
        if not self.adaptive(policy) or rec.submitted_at is None:
            return
        hi = now - rec.submitted_at
        # The record last moved when the previous check (if any) found the job still working.
        lo = rec.updated_at - rec.submitted_at if rec.polls > 0 else 0.0
        if hi <= 0:
            return
        try:
            self.store.observe(schedule.job_classes(rec.kind.value, rec.request), max(0.0, lo), hi)
        except redis.RedisError as exc:  # learning is best effort: the job itself goes on
            log.warning("job %s: duration not recorded (%s)", rec.id, exc)

    def _learned(self, rec: JobRecord) -> Learned | None:
        try:
            return self.store.best(schedule.job_classes(rec.kind.value, rec.request))
        except redis.RedisError as exc:
            log.warning("job %s: learned durations unreadable (%s); fixed schedule", rec.id, exc)
            return None
