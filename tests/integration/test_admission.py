"""The rate limit's admission queue, against a real redis-server: a refused submit waits in Redis for a
turn instead of coming back to try again, and the tick grants turns in the order the lanes, the batch
share and the producers' fair shares say. Windows are stretched (``window_slack``) so that every
sequence here runs inside one; a test frees the window by deleting it, as if its calls had aged out."""

from __future__ import annotations

import time

import pytest
import redis

from genq import keys
from genq.embedded import EmbeddedRedis
from genq.exporter import Collector
from genq.intake import TurnQueue, accept
from genq.ledger import Ledger
from genq.limits import Limits, UpstreamLimiter, admission_queued
from genq.schemas import ImageRequest, JobState, Lane

SLOW = 60.0  # a 10/s rate's window becomes 60 s


def _limiter(server: EmbeddedRedis, **limits: object) -> UpstreamLimiter:
    """A limiter whose tick grants a whole window per run (``tick_share=1``), so that one run shows
    the order of the turns; pacing has its own test."""
    limits.setdefault("tick_share", 1.0)
    return UpstreamLimiter(redis.Redis.from_url(server.url), Limits(**limits))  # type: ignore[arg-type]


def _pending(limiter: UpstreamLimiter, job_id: str, gen: int = 1) -> None:
    """The ledger record the tick checks: a pending job at step generation ``gen``."""
    limiter.redis.hset(keys.job(job_id), mapping={"state": "pending", "poll_gen": gen})


def _admit(limiter: UpstreamLimiter, job_id: str, lane: str = "interactive", producer: str = "p") -> bool:
    """A submit's try: True when admitted, False when it is to wait in the queue."""
    permit, _, queued = limiter.admit("trigger", lane, job_id, queue=True)
    assert permit is not None or queued, "a refused submit waits in the queue, it is not retried"
    return permit is not None


def _queue(
    limiter: UpstreamLimiter, job_id: str, lane: str = "interactive", producer: str = "p"
) -> str | None:
    _pending(limiter, job_id)
    assert not _admit(limiter, job_id, lane, producer)
    return limiter.park("trigger", job_id, 1, lane, producer)


def _fill(limiter: UpstreamLimiter, n: int) -> None:
    """Fill the window with calls of no lane (they count for neither lane's share)."""
    for i in range(n):
        assert _admit(limiter, f"fill-{i}", lane="", producer="filler")


def _free_window(limiter: UpstreamLimiter) -> None:
    limiter.redis.delete(keys.limit_window("trigger"))


def _granted(limiter: UpstreamLimiter, token: str) -> list[str]:
    return [g.job_id for g in limiter.tick("trigger", token).grants]


def test_a_refused_submit_is_queued_and_granted_its_turn_when_the_window_frees(
    redis_server: EmbeddedRedis,
) -> None:
    limiter = _limiter(redis_server, rates={"trigger": 10}, window_slack=SLOW)
    _fill(limiter, 10)
    token = _queue(limiter, "job-a")
    assert token is not None  # no tick was scheduled: the first job queued starts one
    assert _queue(limiter, "job-b") is None  # one tick serves the queue

    tick = limiter.tick("trigger", token)
    assert tick.grants == [] and tick.next_in is not None and 55 < tick.next_in <= 60  # the window is full
    _free_window(limiter)
    assert limiter.tick("trigger", token).next_in is None  # a second delivery of that tick: superseded
    tick = limiter.tick("trigger", tick.token)
    assert [(g.job_id, g.gen) for g in tick.grants] == [("job-a", 1), ("job-b", 1)]
    assert tick.next_in is None  # the queue is empty: the tick stops

    # A granted submit goes without taking a second place in the window; an ungranted one waits.
    assert _admit(limiter, "job-a") and _admit(limiter, "job-b")
    assert limiter.redis.zcard(keys.limit_window("trigger")) == 2
    _fill(limiter, 8)
    assert not _admit(limiter, "job-c")


def test_a_fresh_submit_goes_behind_the_queue_of_its_lane(redis_server: EmbeddedRedis) -> None:
    limiter = _limiter(redis_server, rates={"trigger": 10}, window_slack=SLOW)
    _fill(limiter, 10)
    _queue(limiter, "batch-1", lane="batch")
    _free_window(limiter)
    assert not _admit(limiter, "batch-2", lane="batch")  # room, but batch-1 was first
    assert _admit(limiter, "urgent", lane="interactive")  # a higher lane is not behind it


def test_a_grant_whose_place_aged_out_needs_room_again(redis_server: EmbeddedRedis) -> None:
    limiter = _limiter(redis_server, rates={"trigger": 10}, window_slack=SLOW)
    _fill(limiter, 10)
    token = _queue(limiter, "late")
    assert token is not None
    _free_window(limiter)
    assert _granted(limiter, token) == ["late"]
    _free_window(limiter)  # its message was so slow that its place aged out of the window
    _fill(limiter, 10)  # and other calls took the window
    assert not _admit(limiter, "late")  # the upstream would see eleven calls in one window


def test_interactive_turns_come_first_and_batch_keeps_its_share(redis_server: EmbeddedRedis) -> None:
    limiter = _limiter(redis_server, rates={"trigger": 10}, window_slack=SLOW, batch_share=0.2)
    _fill(limiter, 10)
    token = _queue(limiter, "b0", lane="batch")
    assert token is not None
    for i in range(1, 10):
        _queue(limiter, f"b{i}", lane="batch")
    for i in range(10):
        _queue(limiter, f"i{i}", lane="interactive")
    _free_window(limiter)
    granted = _granted(limiter, token)
    # 10 per window: batch keeps its 2 (its share), interactive takes the other 8.
    assert sorted(granted) == sorted(["b0", "b1"] + [f"i{i}" for i in range(8)])


def test_batch_under_its_share_gets_a_turn_however_busy_the_interactive_lane(
    redis_server: EmbeddedRedis,
) -> None:
    limiter = _limiter(redis_server, rates={"trigger": 10}, window_slack=SLOW, batch_share=0.2)
    for i in range(8):
        assert _admit(limiter, f"web-{i}", lane="interactive")
    token = _queue(limiter, "b0", lane="batch")  # the interactive headroom keeps it out
    assert token is not None
    _queue(limiter, "web-8", lane="interactive")  # interactive calls leave the batch share
    # Two slots left: batch takes its share first, then the interactive job its turn.
    assert _granted(limiter, token) == ["b0", "web-8"]


def test_batch_submits_leave_headroom_for_recent_interactive_calls(redis_server: EmbeddedRedis) -> None:
    limiter = _limiter(redis_server, rates={"trigger": 10}, window_slack=5.0)  # 5 s windows
    assert _admit(limiter, "web-1", lane="interactive")
    # One interactive call in the last 10 s: batch submits leave one slot of the 10 for the next one.
    assert [_admit(limiter, f"fresh-{i}", lane="batch") for i in range(9)] == [True] * 8 + [False]
    assert _admit(limiter, "web-2", lane="interactive")

    token = None
    for i in range(20):
        _pending(limiter, f"b{i}")
        token = limiter.park("trigger", f"b{i}", 1, "batch", "p") or token
    assert token is not None
    _free_window(limiter)
    # Two interactive calls in the last 10 s, one per 5 s window: one slot of the 10 kept free.
    assert _granted(limiter, token) == [f"b{i}" for i in range(9)]
    assert _admit(limiter, "web-3", lane="interactive")


def test_producers_in_one_lane_take_turns_by_weight(redis_server: EmbeddedRedis) -> None:
    limiter = _limiter(redis_server, rates={"trigger": 10}, window_slack=SLOW, weights={"shop": 4})
    _fill(limiter, 10)
    token = _queue(limiter, "flood-0", producer="flood")
    assert token is not None
    for i in range(1, 30):
        _queue(limiter, f"flood-{i}", producer="flood")
    for i in range(20):
        _queue(limiter, f"shop-{i}", producer="shop")
    _free_window(limiter)
    granted = _granted(limiter, token)
    # Queued later, shop still gets its weight: 4 turns to flood's 1.
    assert sum(g.startswith("shop") for g in granted) == 8
    assert [g for g in granted if g.startswith("flood")] == ["flood-0", "flood-1"]  # each in order
    assert [g for g in granted if g.startswith("shop")] == [f"shop-{i}" for i in range(8)]


def test_a_job_that_moved_on_drops_its_place_and_a_requeued_one_keeps_it(redis_server: EmbeddedRedis) -> None:
    limiter = _limiter(redis_server, rates={"trigger": 10}, window_slack=SLOW)
    _fill(limiter, 10)
    token = _queue(limiter, "first")
    assert token is not None
    _queue(limiter, "second")
    _queue(limiter, "cancelled")
    # "first" was re-driven (generation 2) and queued again: it keeps its place, now for generation 2.
    _pending(limiter, "first", gen=2)
    assert limiter.park("trigger", "first", 2, "interactive", "p") is None
    limiter.redis.hset(keys.job("cancelled"), "state", "cancelled")
    _free_window(limiter)
    tick = limiter.tick("trigger", token)
    assert [(g.job_id, g.gen) for g in tick.grants] == [("first", 2), ("second", 1)]
    assert limiter.redis.zcard(keys.limit_window("trigger")) == 2  # no place given to the cancelled job


def test_a_superseded_tick_stops_and_a_lost_one_is_started_again(redis_server: EmbeddedRedis) -> None:
    limiter = _limiter(redis_server, rates={"trigger": 10}, window_slack=SLOW)
    _fill(limiter, 10)
    first = _queue(limiter, "job-a")
    assert first is not None
    assert limiter.rearm("trigger") is None  # a tick is scheduled
    limiter.redis.delete(f"{keys.admit_prefix('trigger')}:tick")  # its message was lost, its key expired
    second = limiter.rearm("trigger")
    assert second is not None and second != first
    _free_window(limiter)
    stale = limiter.tick("trigger", first)
    assert stale.grants == [] and stale.next_in is None  # the old chain ends without granting
    assert _granted(limiter, second) == ["job-a"]
    assert limiter.rearm("trigger") is None  # nothing queued: nothing to start


def test_no_turn_is_granted_while_the_upstream_is_closed(redis_server: EmbeddedRedis) -> None:
    limiter = _limiter(redis_server, rates={"trigger": 10}, window_slack=SLOW)
    _fill(limiter, 10)
    token = _queue(limiter, "job-a")
    assert token is not None
    _free_window(limiter)
    limiter.block(30)
    tick = limiter.tick("trigger", token)
    assert tick.grants == [] and tick.next_in is not None and 25 < tick.next_in <= 30.1


def test_the_queue_is_exported_by_lane_and_producer(redis_server: EmbeddedRedis) -> None:
    limiter = _limiter(redis_server, rates={"trigger": 10}, window_slack=SLOW)
    _fill(limiter, 10)
    for i in range(3):
        _queue(limiter, f"night-{i}", lane="batch", producer="nightly")
    _queue(limiter, "web-0", lane="interactive", producer="web")
    assert admission_queued(limiter.redis) == {("interactive", "web"): 1, ("batch", "nightly"): 3}

    families = {m.name: m for m in Collector(limiter.redis, None).collect()}
    samples = {tuple(s.labels.values()): s.value for s in families["genq_admission_queued"].samples}
    assert samples == {("interactive", "web"): 1, ("batch", "nightly"): 3}


def test_turns_go_out_paced_at_the_rate_not_a_window_at_a_time(redis_server: EmbeddedRedis) -> None:
    limiter = _limiter(redis_server, rates={"trigger": 20}, window_slack=SLOW, tick_share=0.1)
    _fill(limiter, 20)
    token = None
    for i in range(10):
        token = _queue(limiter, f"job-{i}") or token
    assert token is not None
    _free_window(limiter)
    tick = limiter.tick("trigger", token)
    # Credit for two shares of a tenth of the 20-call window (four turns) after a long quiet spell,
    # then a share's worth at the rate: the next run when two more turns have come due.
    assert [g.job_id for g in tick.grants] == ["job-0", "job-1", "job-2", "job-3"]
    step = 20 / 20 * SLOW / 20  # seconds per turn at the rate
    assert tick.next_in == pytest.approx(2 * step, rel=0.01)
    early = limiter.tick("trigger", tick.token)
    assert early.grants == [] and early.next_in is not None  # no credit yet: nothing, however much room
    state = f"{keys.admit_prefix('trigger')}:state"
    limiter.redis.hincrbyfloat(state, "tick_at", -3 * step)  # as if three turns' time had passed
    assert [g.job_id for g in limiter.tick("trigger", early.token).grants] == ["job-4", "job-5", "job-6"]


def _ledger(limiter: UpstreamLimiter) -> Ledger:
    return Ledger(limiter.redis, job_ttl=3600, grace=30.0)


def _request(lane: str, producer: str = "shop") -> ImageRequest:
    return ImageRequest(prompt="a lighthouse", producer=producer, lane=Lane(lane))


def test_a_new_job_queues_at_intake_behind_its_lane_without_a_message(redis_server: EmbeddedRedis) -> None:
    limiter = _limiter(redis_server, rates={"trigger": 10}, window_slack=SLOW)
    ledger, turns = _ledger(limiter), TurnQueue(limiter)
    first = accept(ledger, _request("batch"), turns=turns)
    assert first.to_submit == [first.id] and not first.queued  # nothing waits: it is sent

    _fill(limiter, 10)
    token = _queue(limiter, "batch-1", lane="batch")
    assert token is not None
    later = accept(ledger, _request("batch"), turns=turns)
    assert later.queued and later.to_submit == [] and later.tick is None  # the queue has its tick
    rec = ledger.get(later.id)
    assert rec is not None and rec.state is JobState.PENDING and rec.poll_gen == 0
    assert rec.error is not None and rec.error.startswith("waiting for its turn")
    # Held for twice its wait (two places ahead of it at 10 per 63 s), plus the grace: not re-sent meanwhile.
    due = ledger.redis.zscore(keys.DUE, later.id)
    assert due is not None and due >= rec.created_at + 30.0 + 2 * 2 * SLOW * 1.0 / 10 * 0.99
    assert limiter.redis.zrange(f"{keys.admit_prefix('trigger')}:q:batch:shop", 0, -1) == [later.id.encode()]

    urgent = accept(ledger, _request("interactive"), turns=turns)
    assert urgent.to_submit == [urgent.id] and not urgent.queued  # a higher lane is not behind batch

    _free_window(limiter)
    tick = limiter.tick("trigger", token)
    assert [(g.job_id, g.gen) for g in tick.grants] == [("batch-1", 1), (later.id, 0)]


def test_a_job_queued_at_intake_starts_the_tick_when_none_is_scheduled(redis_server: EmbeddedRedis) -> None:
    limiter = _limiter(redis_server, rates={"trigger": 10}, window_slack=SLOW)
    ledger, turns = _ledger(limiter), TurnQueue(limiter)
    _fill(limiter, 10)
    _queue(limiter, "first", lane="interactive")
    limiter.redis.delete(f"{keys.admit_prefix('trigger')}:tick")  # its tick was lost
    queued = accept(ledger, _request("interactive"), turns=turns)
    assert queued.queued and queued.tick is not None  # so this job sends one
    again = accept(ledger, _request("batch"), turns=turns)
    assert again.queued and again.tick is None  # batch is behind interactive work too


def test_a_job_waiting_for_its_model_or_a_repeated_request_is_not_queued_at_intake(
    redis_server: EmbeddedRedis,
) -> None:
    limiter = _limiter(redis_server, rates={"trigger": 10}, window_slack=SLOW)
    ledger, turns = _ledger(limiter), TurnQueue(limiter)
    _fill(limiter, 10)
    _queue(limiter, "first", lane="batch")
    sent = accept(ledger, _request("batch"), idempotency_key="k1")  # before intake queueing applied
    again = accept(ledger, _request("batch"), idempotency_key="k1", turns=turns)
    assert again.id == sent.id and not again.created and not again.queued
    assert limiter.redis.zcard(f"{keys.admit_prefix('trigger')}:q:batch:shop") == 0  # nothing parked
    modelled = _request("batch").model_copy(update={"model_id": "m-1"})
    assert not accept(ledger, modelled, turns=turns).queued


def test_a_call_sent_late_takes_its_place_in_the_windows_then(redis_server: EmbeddedRedis) -> None:
    """The windows' slack (5 %: 50 ms at 10/s and 20/s here) absorbs the time from admission to the
    call's arrival upstream. A worker starved of CPU after its admission can take longer: when more
    than half the slack has passed, the call's place moves to when it is sent, so the call a window
    later cannot arrive within a second of it."""
    limiter = _limiter(redis_server, rates={"trigger": 10}, total_rate=20)
    windows = [keys.limit_window("trigger"), keys.limit_window("*")]

    def places(member: str) -> list[float]:
        return [float(limiter.redis.zscore(w, member) or 0) for w in windows]

    permit, _ = limiter.acquire("trigger")
    assert permit is not None and permit.window == permit.token
    admitted = places(permit.window)
    limiter.sent(permit)
    assert places(permit.window) == admitted  # sent in time: its place stays

    permit, _ = limiter.acquire("trigger")
    assert permit is not None
    admitted = places(permit.window)
    time.sleep(0.08)
    limiter.sent(permit)
    moved = [b - a for a, b in zip(admitted, places(permit.window), strict=True)]
    assert min(moved) >= 0.075, moved

    # A granted submit's place is the grant's, and moves the same way.
    _fill(limiter, 8)
    token = _queue(limiter, "late")
    assert token is not None
    _free_window(limiter)
    assert _granted(limiter, token) == ["late"]
    granted, _, _ = limiter.admit("trigger", "interactive", "late", queue=True)
    assert granted is not None and granted.window == "grant:late"
    before = places("grant:late")
    time.sleep(0.08)
    limiter.sent(granted)
    assert places("grant:late")[0] >= before[0] + 0.075

    # A place that aged out of a window is not put back.
    permit, _ = limiter.acquire("trigger")
    assert permit is not None
    limiter.redis.delete(windows[0])
    time.sleep(0.08)
    limiter.sent(permit)
    assert limiter.redis.zscore(windows[0], permit.window) is None
