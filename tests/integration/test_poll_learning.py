"""Learned poll durations on a real redis-server: the Lua histogram write matches the pure arithmetic of
``genq.schedule``, reads are cached per process, and the planner learns from finished jobs. No timing
assertions: only what is written and read."""

from __future__ import annotations

import random

import pytest
import redis

from genq import keys
from genq.durations import DurationStore, PollPlanner
from genq.embedded import EmbeddedRedis
from genq.schedule import Histogram, Learned
from genq.schemas import JobKind, JobRecord, JobState
from genq.settings import PollPolicy, PollSettings

pytestmark = pytest.mark.integration


@pytest.fixture
def client(redis_server: EmbeddedRedis) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


class Ticks:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lua_histogram_matches_the_pure_one(client: redis.Redis) -> None:
    poll = PollSettings(adaptive_half_life=3)  # fast growth: the rescale runs several times
    store = DurationStore(client, poll)
    pure = Histogram(half_life=3)
    rng = random.Random(2)
    for _ in range(300):
        lo = rng.choice([0.0, rng.uniform(1, 100)])
        hi = lo + rng.uniform(0.5, 10)
        store.observe(["video:-:5s", "video"], lo, hi)
        pure.observe(lo, hi)
    for key in ("video:-:5s", "video"):
        raw = client.hgetall(keys.poll_durations(key))
        found = Learned.from_hash(raw)
        expected = pure.learned()
        assert found is not None and expected is not None
        assert found.samples == pytest.approx(expected.samples, rel=1e-6)
        assert found.masses == pytest.approx(expected.masses, abs=1e-9)
        assert 0 < client.ttl(keys.poll_durations(key)) <= 30 * 86400


def test_reads_are_cached_per_process(client: redis.Redis) -> None:
    ticks = Ticks()
    store = DurationStore(client, PollSettings(adaptive_cache=5), monotonic=ticks)
    assert store.learned("image") is None
    store.observe(["image"], 4.0, 8.0)
    assert store.learned("image") is None  # still the cached read
    ticks.now += 6
    found = store.learned("image")
    assert found is not None and 4.0 < found.quantile(0.5) < 8.0


def test_the_planner_learns_from_finished_jobs_and_uses_it(client: redis.Redis) -> None:
    poll = PollSettings(adaptive_min_samples=5, adaptive_cache=0)
    planner = PollPlanner(client, poll)
    policy = poll.video
    rng = random.Random(1)
    rec = JobRecord(
        id="j",
        kind=JobKind.VIDEO,
        state=JobState.RUNNING,
        request={"prompt": "p", "duration": 5},
        created_at=0.0,
        updated_at=1060.0,  # the last check that saw it working
        submitted_at=1000.0,
        polls=12,
    )
    # Nothing learned: a fixed gap loop from the POST.
    assert planner.first_delay(rec, policy, rng) <= poll.adaptive_gap
    for _ in range(10):
        planner.finished(rec, policy, now=1064.6)  # finished 60..64.6 s after the POST
    assert client.exists(keys.poll_durations("video:-:5s"), keys.poll_durations("video")) == 2
    first = planner.first_delay(rec, policy, rng)
    assert 60.0 < first <= 64.6 + poll.adaptive_gap
    # After the first check, every gap from the POST's grid.
    later = rec.model_copy(update={"next_poll_at": 1000.0 + first})
    assert planner.next_delay(later, policy, 1, 1000.0 + first + 0.1, rng) == pytest.approx(
        poll.adaptive_gap - 0.1
    )


def test_a_kind_with_its_own_timing_or_adaptive_off_keeps_the_fixed_policy(client: redis.Redis) -> None:
    own = PollPolicy(first_delay=1, interval=1, max_interval=1, jitter=0, deadline=60)
    poll = PollSettings(image=own)
    planner = PollPlanner(client, poll)
    rec = JobRecord(
        id="k", kind=JobKind.IMAGE, state=JobState.RUNNING, request={}, created_at=0.0, updated_at=0.0
    )
    assert not planner.adaptive(own)
    assert planner.first_delay(rec, own, random.Random(0)) == 1.0
    planner.finished(rec.model_copy(update={"submitted_at": 0.0}), own, now=5.0)
    assert not client.exists(keys.poll_durations("image"))
    off = PollPlanner(client, PollSettings(adaptive=False))
    assert not off.adaptive(off.poll.video)
    assert off.first_delay(rec, off.poll.video, random.Random(0)) == pytest.approx(15, rel=0.1)
