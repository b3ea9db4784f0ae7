"""The shared limiter's reserved batch share and batch turns (calls outside the admission queue: polls
under a status rate), against a real redis-server.
Windows are stretched (``window_slack``) to a minute so that every sequence here runs inside one."""

from __future__ import annotations

import redis

from genq import keys
from genq.embedded import EmbeddedRedis
from genq.limits import Limits, UpstreamLimiter

SLOW = 60.0  # a 10/s rate's window becomes 63 s


def _limiter(server: EmbeddedRedis, **limits: object) -> UpstreamLimiter:
    return UpstreamLimiter(redis.Redis.from_url(server.url), Limits(**limits))  # type: ignore[arg-type]


def _take(limiter: UpstreamLimiter, n: int, lane: str = "") -> list[bool]:
    out = []
    for _ in range(n):
        permit, _ = limiter.acquire("trigger", lane)
        out.append(permit is not None)
        if permit is not None:
            limiter.release(permit)
    return out


def _turned_away(limiter: UpstreamLimiter, lane: str = "") -> None:
    """Turn one call away by the concurrency cap (one call held in flight), not by the window."""
    held, _ = limiter.acquire("trigger", "interactive")
    assert held is not None
    permit, wait = limiter.acquire("trigger", lane)
    assert permit is None and wait > 0
    limiter.release(held)


def test_interactive_calls_leave_the_batch_share_once_batch_calls_are_turned_away(
    redis_server: EmbeddedRedis,
) -> None:
    limiter = _limiter(
        redis_server, rates={"trigger": 10}, window_slack=SLOW, batch_share=0.2, max_concurrent=1
    )
    _turned_away(limiter, lane="batch")
    # 10 per window, 2 kept for batch: interactive calls get 8 (the one held above counts).
    assert _take(limiter, 8, "interactive") == [True] * 7 + [False]
    assert _take(limiter, 3, "batch") == [True, True, False]


def test_without_batch_waiting_interactive_calls_take_the_whole_window(redis_server: EmbeddedRedis) -> None:
    limiter = _limiter(redis_server, rates={"trigger": 10}, window_slack=SLOW, batch_share=0.2)
    assert _take(limiter, 11, "interactive") == [True] * 10 + [False]


def test_turned_away_batch_calls_queue_for_successive_turns(redis_server: EmbeddedRedis) -> None:
    """A backlog turned away comes back one turn of the rate apart (6.3 s here), not all at once."""
    limiter = _limiter(redis_server, rates={"trigger": 10}, window_slack=SLOW)
    assert _take(limiter, 10, "interactive") == [True] * 10
    waits = [limiter.acquire("trigger", "batch")[1] for _ in range(3)]
    assert waits[0] > 60  # the window's first call ages out in about 63 s, then its turn
    assert waits[1] > waits[0] + 5 and waits[2] > waits[1] + 5
    assert limiter.acquire("trigger", "interactive")[1] < waits[0]  # interactive calls do not queue


def test_a_batch_call_back_at_its_turn_keeps_its_place(redis_server: EmbeddedRedis) -> None:
    """Turned away again at its turn (interactive work took the slot), a job does not go to the back."""
    limiter = _limiter(redis_server, rates={"trigger": 10}, window_slack=SLOW)
    assert _take(limiter, 10, "interactive") == [True] * 10
    first = limiter.acquire("trigger", "batch", caller="job-a")[1]
    behind = [limiter.acquire("trigger", "batch", caller=f"job-{i}")[1] for i in range(5)]
    assert all(w > first for w in behind)
    client = limiter.redis
    # job-a's turn has come (moved to now, as if its wait had passed) and the window is still full.
    client.hset(keys.limit_batch_turns("trigger"), "job-a", str(float(client.time()[0])))
    again = limiter.acquire("trigger", "batch", caller="job-a")[1]
    assert again < behind[0]  # it waits for room in the window, ahead of the calls queued behind it
