"""3. Capacity: N jobs in flight at once on one worker node with the project's default pools.

Upstream jobs run for an hour and are polled every 5 minutes (image policy first_delay = interval =
300 s, jitter 0.05): every wait is longer than GENQ_POLL_COUNTDOWN_MAX (60 s), so it is held in the
Redis due index and dispatched by the sweeper (beat -> ``genq.sweep``), never a long countdown in a
worker: the sweeper claims a poll due before its next sweep and sends it with a countdown to its due
time (the look-ahead, one sweep interval), so workers hold at most one sweep interval of them.

How the jobs get in flight (no 100,000 paid POSTs): the simulator creates the upstream jobs in one
call (``/_bench/bulk``, its own ``create_job``), then each ledger record is written by genqueue's own
``Ledger.create`` and ``Ledger.transition`` (pending -> submitting -> submitted, with exactly the fields
``JobService._submitted`` writes: upstream id, poll_gen 1, deadline, a held wait), captured and replayed
through pipelines. They are first held far in the future; once written, one pipeline sets each job's
next poll (``next_poll_at`` and its ``genq:due`` score) spread evenly over one 5-minute cycle that
starts a few seconds later, as a steady state would have them.

Two sizes on the same processes: first S jobs (20,000; quick 1,000) polled for a short window, then
N (100,000; quick 5,000) over a whole cycle (quick: 4 s of it). Measured: the PSS of every worker
process and pool child at the end of each (worker memory per job is the slope between the two sizes,
so what any worker grows by once, caches and the warm-up, is not counted per job); Redis
``used_memory`` before the jobs and after the cycle (per job, with every job polled once); and poll
lateness over the cycle: ``updated_at`` of the transition a job's first poll made minus its scheduled
``next_poll_at``, read every few seconds during the cycle (so a job's second poll, 5 minutes later,
is never mistaken for its first). A poll not made by the end counts as late by at least the time
waited, and the lateness goals are missed when fewer polls were made than were due. Baseline in the
same run: bare Celery countdown tasks (``bench.hold``, countdown 3600 s) held by a bare worker: its
RSS and Redis memory per task.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks import baseline_app
from benchmarks.context import Context, settings_for
from benchmarks.harness import DEFAULT_POOLS, BenchWorker, Stack, settle_memory, stacks, tree_rss, wait_until
from benchmarks.result import BenchResult, ChartItem, Row
from benchmarks.simcapacity import headroom_row
from benchmarks.stats import Goal, per_item, ratio, summary
from genq.celeryconf import POLL
from genq.ledger import Ledger, as_text
from genq.schemas import JobKind, JobState
from genq.services import ledger_for
from genq.simulator import SimConfig

NAME = "capacity"
WARMUP = 100
CYCLE = 300.0
FAR = 86_400.0
POLICY = json.dumps(
    {"first_delay": 300, "interval": 300, "backoff": 1, "max_interval": 300, "jitter": 0.05, "deadline": 7200}
)
ENV = {"GENQ_POLL_IMAGE": POLICY}


def run(ctx: Context) -> BenchResult:
    small, n = ctx.size((1_000, 5_000), (20_000, 100_000))
    held = ctx.size(500, 10_000)
    window = ctx.size(4.0, CYCLE)
    result = BenchResult(NAME, f"Capacity: {n:,} jobs in flight")
    result.size = {
        "jobs": n,
        "jobs_small": small,
        "small_window_seconds": ctx.size(2.0, 30.0),
        "baseline_countdown_tasks": held,
        "window_seconds": window,
        "poll_every": CYCLE,
        "pools": DEFAULT_POOLS,
        "sweep_interval": 2.0,
    }
    sim = SimConfig(api_key="bench-key", images_per_job=1)
    # The baseline on a stack of its own, its worker booted with genqueue's pools (it idles, blocked
    # on its queue, while genqueue is measured): its Redis holds only its own tasks.
    with (
        stacks((sim, ctx.workdir / NAME, NAME), (sim, ctx.workdir / f"{NAME}-base", "base")) as (s, sb),
        ThreadPoolExecutor(1) as pool,
    ):
        bare_worker = pool.submit(sb.worker, app="benchmarks.baseline_app", concurrency=4, queues=[POLL])
        gq = _genqueue(ctx, s, small, n, window, booted=bare_worker.result)
        base = _bare(ctx, sb, held, bare_worker.result())

    result.figures = gq
    result.baseline = base
    result.ratios = {
        "worker_bytes_per_job": ratio(gq["worker_bytes_per_job"], base["worker_bytes_per_task"]),
        "redis_bytes_per_job": ratio(gq["redis_bytes_per_job"], base["redis_bytes_per_task"]),
    }
    late = gq["lateness"]
    all_made = gq["polled_in_window"] >= gq["due_in_window"]
    m0 = result.check(
        Goal("every poll due in the window made", "polls made / due", ">=", 1.0),
        ratio(gq["polled_in_window"], gq["due_in_window"]),
        _late_why(gq),
    )
    m1 = result.check(
        Goal("worker memory growth <= 1 KB per in-flight job", "worker bytes/job", "<=", 1024),
        gq["worker_bytes_per_job"],
    )
    m2 = result.check(
        Goal("Redis <= 1 KB per in-flight job", "Redis bytes/job", "<=", 1024),
        gq["redis_bytes_per_job"],
        _redis_why(gq),
    )
    # Fewer polls made than were due fails the run: the lateness of the polls made says nothing then.
    m3 = result.check(
        Goal("p95 poll lateness <= 0.25 s", "p95 lateness", "<=", 0.25),
        late["p95"] if all_made else None,
        _late_why(gq),
    )
    m4 = result.check(
        Goal("p99 poll lateness <= 1 s", "p99 lateness", "<=", 1.0),
        late["p99"] if all_made else None,
        _late_why(gq),
    )
    result.rows = [
        Row(
            f"worker PSS growth per in-flight job ({small // 1000}k -> {n // 1000}k)",
            gq["worker_bytes_per_job"],
            base["worker_bytes_per_task"],
            result.ratios["worker_bytes_per_job"],
            "B",
            "<= 1 KB",
            m1,
        ),
        Row(
            "Redis memory per in-flight job, after the window",
            gq["redis_bytes_per_job"],
            base["redis_bytes_per_task"],
            result.ratios["redis_bytes_per_job"],
            "B",
            "<= 1 KB",
            m2,
        ),
        Row(
            "polls made / due in the window",
            gq["polled_in_window"],
            gq["due_in_window"],
            ratio(gq["polled_in_window"], gq["due_in_window"]),
            goal=">= 1",
            met=m0,
        ),
        Row("poll lateness p50", late["p50"], None, unit="s"),
        Row("poll lateness p95", late["p95"], None, unit="s", goal="<= 0.25 s", met=m3),
        Row("poll lateness p99", late["p99"], None, unit="s", goal="<= 1 s", met=m4),
        Row("poll lateness max", late["max"], None, unit="s"),
        Row(
            "polls/s made vs due",
            gq["polls_per_s"],
            gq["due_per_s"],
            ratio(gq["polls_per_s"], gq["due_per_s"]),
            "/s",
        ),
        headroom_row(ctx, gq["sim_peak_rate_1s"]),
    ]
    result.chart = [
        ChartItem("latency", f"3 capacity: poll lateness p50 ({n:,} in flight)", late["p50"], None, "s"),
        ChartItem("latency", f"3 capacity: poll lateness p95 ({n:,} in flight)", late["p95"], None, "s"),
    ]
    result.notes.append(
        "worker memory is the PSS (proportional set size: pages shared after fork split between processes) "
        f"of every worker process and pool child, per job the slope between {small:,} and {n:,} in flight; "
        "RSS would count shared pages once per child"
    )
    result.notes.append(
        "lateness = the ledger's updated_at of the job's first poll in the window - its scheduled "
        "next_poll_at; it includes the sweep (a poll due before the next sweep is sent with a countdown to "
        "its due time), the queue and the GET"
    )
    if ctx.quick:
        result.notes.append(f"quick: {window:.0f} s of the {CYCLE:.0f} s cycle, not the whole of it")
    return result


def _redis_why(gq: dict[str, Any]) -> str:
    return f"per job: {gq.get('redis_key_sizes', {})}"


def _late_why(gq: dict[str, Any]) -> str:
    late = gq["lateness"]
    parts = []
    if gq["polled_in_window"] < gq["due_in_window"]:
        parts.append(
            f"only {gq['polled_in_window']} of the {gq['due_in_window']} polls due in the window were made "
            f"({gq['polls_per_s']:.0f} polls/s for {gq['due_per_s']:.0f}/s due): the node fell behind"
        )
    if late["p50"] is not None and late["p50"] > 0.5:
        parts.append(
            f"median {late['p50']:.2f} s: polls waited in the poll queue, or sweeps ran late (the look-ahead "
            f"covers one sweep interval, {gq['sweep_interval']} s)"
        )
    return "; ".join(parts)


def _schedule(s: Stack, scheduled: dict[str, float]) -> None:
    """Set each job's next poll (its record's ``next_poll_at`` and its due score), earliest first."""
    pipe = s.redis.pipeline(transaction=False)
    for k, (job_id, at) in enumerate(scheduled.items()):
        pipe.hset(f"genq:job:{job_id}", "next_poll_at", repr(at))
        pipe.zadd("genq:due", {job_id: at})
        if k % 5000 == 4999:
            pipe.execute()
    pipe.execute()


def _genqueue(
    ctx: Context,
    s: Stack,
    small: int,
    n: int,
    window: float,
    app: str = "genq.worker",
    booted: Callable[[], Any] = lambda: None,
) -> dict[str, Any]:
    """``booted`` returns once every other process of the run is up: a process that starts between
    the memory readings would share library pages with the workers and lower their PSS."""
    settings = settings_for(s, ENV)
    ctx.log(f"{NAME}: starting the default pools (submit, poll, download, training) and beat")
    workers = s.workers([{**spec, "env": ENV, "app": app} for spec in DEFAULT_POOLS], beat_env=ENV)
    pids = [w.pid for w in workers]
    booted()
    ctx.log(f"{NAME}: pools up; warm-up polls")
    # Warm-up: a few jobs polled right away, so every pool child has made its first poll (imports,
    # connections, caches) before the first memory figure; they stay in flight like the others.
    ledger = ledger_for(s.redis, settings)
    warm = [f"warm{i:04d}" for i in range(WARMUP)]
    write_submitted(
        ledger, warm, s.sim.bulk_create(WARMUP, kind="image", duration=3600.0), settings.poll.image.deadline
    )
    s.redis.zadd("genq:due", dict.fromkeys(warm, time.time()))
    wait_until(
        lambda: all(int(p or 0) >= 1 for p in [s.redis.hget(f"genq:job:{w}", "polls") for w in warm]),
        timeout=30,
        interval=0.1,
    )
    time.sleep(ctx.size(0.5, 1.0))
    rss0 = tree_rss(pids, "pss")
    mem0 = settle_memory(s.redis, 0.5)

    ctx.log(f"{NAME}: creating {n:,} upstream jobs in the simulator")
    t = time.monotonic()
    upstream = s.sim.bulk_create(n, kind="image", duration=3600.0)
    sim_seconds = time.monotonic() - t
    ids = [f"cap{i:07d}" for i in range(n)]

    # The small size: S jobs in flight, polled for a short window, for the first memory figure.
    ctx.log(f"{NAME}: writing {small:,} ledger records (submitted, held) through pipelines")
    t = time.monotonic()
    write_submitted(ledger, ids[:small], upstream[:small], settings.poll.image.deadline)
    write_seconds = time.monotonic() - t
    small_window = ctx.size(2.0, 30.0)
    start_small = time.time() + ctx.size(0.5, 2.0)
    _schedule(s, {job_id: start_small + CYCLE * i / small for i, job_id in enumerate(ids[:small])})
    ctx.log(f"{NAME}: {small:,} in flight; polling for {small_window:.0f}s")
    time.sleep(max(0.0, start_small + small_window - time.time()))
    rss_small = tree_rss(pids, "pss")
    # Held far again (stops the small cycle) while the rest are written; polls in flight finish.
    s.redis.zadd("genq:due", dict.fromkeys(ids[:small], time.time() + FAR))

    ctx.log(f"{NAME}: writing {n - small:,} more ledger records")
    t = time.monotonic()
    write_submitted(ledger, ids[small:], upstream[small:], settings.poll.image.deadline)
    write_seconds += time.monotonic() - t
    time.sleep(ctx.size(0.5, 3.0))  # past the look-ahead: no poll of the small cycle is still coming
    mem1 = settle_memory(s.redis, ctx.size(0.5, 1.0))
    sizes = _key_sizes(s, ids[-1])

    # Spread the next polls evenly over one cycle starting shortly, as in a steady state.
    lateness = _Lateness(s, ids)  # reads each job's poll count first
    start = time.time() + ctx.size(1.0, 4.0)
    scheduled = {job_id: start + CYCLE * i / n for i, job_id in enumerate(ids)}
    lateness.scheduled = scheduled
    _schedule(s, scheduled)
    in_window = [j for j, at in scheduled.items() if at <= start + window]
    ctx.log(f"{NAME}: all {n:,} in flight; polling window {window:.0f}s ({len(in_window):,} polls due)")
    s.sim.reset_stats()
    every = ctx.size(0.5, 5.0)
    while time.time() < start + window:
        lateness.read(time.time())
        time.sleep(max(0.0, min(every, start + window - time.time())))
    rss1 = tree_rss(pids, "pss")
    # Polls due at the window's end get their countdown and run: up to a sweep interval and a bit.
    wait_until(lambda: lateness.read(start + window) >= len(in_window), ctx.size(2.5, 5.0), 0.2)
    read_at = time.time()
    lateness.read(start + window)
    late, made = lateness.result(in_window, read_at)
    mem2 = settle_memory(s.redis, 0.5)
    stats = s.sim.stats(include_jobs=False)
    gets = stats["requests"].get("GET /jobs", 0)
    due_until_read = sum(1 for at in scheduled.values() if at <= read_at)
    held_by_workers = _eta_held(s)
    s.stop_processes()
    return {
        "jobs": n,
        "jobs_small": small,
        "sim_create_seconds": sim_seconds,
        "ledger_write_seconds": write_seconds,
        "worker_pss_before": rss0,
        "worker_pss_small": rss_small,
        "worker_pss_after": rss1,
        "worker_bytes_per_job": per_item(rss1 - rss_small, n - small),
        "worker_bytes_per_job_from_warm": per_item(rss1 - rss0, n),
        "redis_used_before": mem0,
        "redis_used_all_in_flight": mem1,
        "redis_used_after_window": mem2,
        "redis_bytes_per_job": per_item(mem2 - mem0, n),
        "redis_bytes_per_job_before_polls": per_item(mem1 - mem0, n),
        "redis_key_sizes": sizes,
        "due_in_window": len(in_window),
        "polled_in_window": made,
        "due_per_s": due_until_read / (read_at - start),
        "sim_peak_rate_1s": stats["max_rate_1s"],
        "polls_per_s": gets / (read_at - start) if read_at > start else None,
        "lateness": summary(late),
        "sweep_interval": settings.worker.sweep_interval,
        "countdown_messages_held_by_workers": held_by_workers,
    }


class _Lateness:
    """The lateness of each job's first poll after its scheduled time, read while the cycle runs: a
    job is looked at from its scheduled time on until its poll count has grown, so a second poll (a
    cycle later, sooner by the jitter) is never taken for the first."""

    def __init__(self, s: Stack, ids: list[str]) -> None:
        self.s = s
        self.ids = ids  # in scheduled order
        self.scheduled: dict[str, float] = {}  # set before the first read
        pipe = s.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(f"genq:job:{job_id}", "polls")
        self.polls0 = {job_id: int(p or 0) for job_id, p in zip(ids, pipe.execute(), strict=True)}
        self.next = 0
        self.open: list[str] = []
        self.late: dict[str, float] = {}

    def read(self, until: float) -> int:
        """Look at every job scheduled by ``until`` not seen polled yet; returns how many were."""
        while self.next < len(self.ids) and self.scheduled[self.ids[self.next]] <= until:
            self.open.append(self.ids[self.next])
            self.next += 1
        still: list[str] = []
        for start in range(0, len(self.open), 2000):
            chunk = self.open[start : start + 2000]
            pipe = self.s.redis.pipeline(transaction=False)
            for job_id in chunk:
                pipe.hmget(f"genq:job:{job_id}", "polls", "updated_at")
            for job_id, (polls, updated) in zip(chunk, pipe.execute(), strict=True):
                if polls is not None and int(polls) > self.polls0[job_id] and updated is not None:
                    self.late[job_id] = float(updated) - self.scheduled[job_id]
                else:
                    still.append(job_id)
        self.open = still
        return len(self.late)

    def result(self, ids: list[str], read_at: float) -> tuple[list[float], int]:
        """Lateness of each of ``ids`` (not polled yet: late at least until ``read_at``), and how many
        were polled."""
        late = [self.late.get(j, read_at - self.scheduled[j]) for j in ids]
        return late, sum(1 for j in ids if j in self.late)


def used_memory_now(s: Stack) -> int:
    return int(s.redis.info("memory")["used_memory"])


def _eta_held(s: Stack) -> int:
    """Messages reserved but unacknowledged (countdowns a worker holds) right now."""
    return int(s.redis.hlen("unacked"))


def _key_sizes(s: Stack, job_id: str) -> dict[str, Any]:
    def usage(key: str) -> int | None:
        try:
            value = s.redis.memory_usage(key)
        except Exception:
            return None
        return int(value) if value is not None else None

    return {
        "job_hash": usage(f"genq:job:{job_id}"),
        "job_hash_encoding": as_text(s.redis.object("encoding", f"genq:job:{job_id}")),
        "events_stream_entries": int(s.redis.xlen("genq:events")),
        "events_stream_bytes": usage("genq:events"),
        "due_index_bytes": usage("genq:due"),
        "jobs_index_bytes": usage("genq:jobs"),
    }


class _Capture:
    """Stands in for a ledger Lua script: records (keys, args) and answers as the script would."""

    def __init__(self, answer: list[Any]) -> None:
        self.answer = answer
        self.calls: list[tuple[list[Any], list[Any]]] = []

    def __call__(self, keys: list[Any], args: list[Any], client: Any = None) -> list[Any]:
        self.calls.append((keys, args))
        return self.answer


def write_submitted(
    ledger: Ledger, ids: list[str], upstream: list[str], deadline: float, batch: int = 2000
) -> None:
    """Write each job as ``JobService.submit`` leaves it (pending -> submitting -> submitted, a held wait),
    with genqueue's own Ledger methods building every script call, replayed through pipelines."""
    real_create, real_transition = ledger._create, ledger._transition
    create = _Capture([1, "x", JobState.PENDING.value])
    transition = _Capture([1, JobState.PENDING.value, "ok"])
    ledger._create, ledger._transition = create, transition  # type: ignore[assignment]
    far = time.time() + 86_400.0
    try:
        for start in range(0, len(ids), batch):
            create.calls.clear()
            transition.calls.clear()
            for job_id, up in zip(ids[start : start + batch], upstream[start : start + batch], strict=True):
                now = time.time()
                ledger.create(
                    job_id,
                    JobKind.IMAGE,
                    {"prompt": f"capacity {job_id}", "num_images": 1},
                    expected_outputs=1,
                )
                ledger.transition(
                    job_id, [JobState.PENDING], JobState.SUBMITTING, submit_attempts=1, due_at=now + 40.0
                )
                ledger.transition(
                    job_id,
                    [JobState.SUBMITTING],
                    JobState.SUBMITTED,
                    expect_gen=None,
                    poll_gen=1,
                    next_poll_at=far,
                    due_at=far,
                    held=True,
                    upstream_id=up,
                    upstream_status="created",
                    deadline_at=now + deadline,
                    error=None,
                )
            pipe = ledger.redis.pipeline(transaction=False)
            # create, then its two transitions, in order per job
            for i, (keys, args) in enumerate(create.calls):
                real_create(keys=keys, args=args, client=pipe)
                for keys2, args2 in transition.calls[2 * i : 2 * i + 2]:
                    real_transition(keys=keys2, args=args2, client=pipe)
            pipe.execute()
    finally:
        ledger._create, ledger._transition = real_create, real_transition  # type: ignore[assignment]


def _bare(ctx: Context, s: Stack, held: int, worker: BenchWorker) -> dict[str, Any]:
    ctx.log(f"{NAME}: baseline, {held:,} bare Celery countdown tasks held by a bare worker")
    rss0 = tree_rss([worker.pid], "pss")
    mem0 = settle_memory(s.redis, 0.5)
    client = baseline_app.make_app(s.redis_server.url, main=False)
    t = time.monotonic()
    for i in range(held):
        baseline_app.send(client, "bench.hold", f"h{i}", countdown=3600)
    reserved = wait_until(lambda: _eta_held(s) >= held, timeout=120, interval=0.2)
    seconds = time.monotonic() - t
    time.sleep(ctx.size(0.5, 1.0))
    rss1 = tree_rss([worker.pid], "pss")
    mem1 = settle_memory(s.redis, 0.5)
    client.close()
    s.stop_processes()
    return {
        "tasks": held,
        "all_reserved": reserved,
        "reserve_seconds": seconds,
        "worker_rss_before": rss0,
        "worker_rss_after": rss1,
        "worker_bytes_per_task": per_item(rss1 - rss0, held),
        "redis_used_before": mem0,
        "redis_used_after": mem1,
        "redis_bytes_per_task": per_item(mem1 - mem0, held),
    }
