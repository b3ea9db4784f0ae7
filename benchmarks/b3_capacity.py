"""3. Capacity: N jobs in flight at once on one worker node with the project's default pools.

Upstream jobs run for an hour and are polled every 5 minutes (image policy first_delay = interval =
300 s, jitter 0.05): every wait is longer than GENQ_POLL_COUNTDOWN_MAX (60 s), so it is held in the
Redis due index and dispatched by the sweeper (beat -> ``genq.sweep``), never a long countdown in a
worker: the sweeper claims a poll due within its look-ahead (two sweep intervals) and sends it with a
countdown to its due time, so workers hold at most two sweep intervals of them.

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

Then jobs through the real producer (issue #13: "one run where the 20k jobs are submitted through the
real producer and submit pool, not injected"), on the same processes: the injected jobs are held a
day out (their polls would share the pools), and after 20 warm-up submits S jobs (20,000; quick 500)
are submitted with ``Producer.submit_image`` from one thread, same 5-minute policy; the submit pool
makes the real POSTs. Measured: the time from the first submit to the last job's ``submitted_at``
(all in flight) and the jobs per second that makes, the producer's own time, submit -> submitted per
job; every job in flight (``submitted``, or ``running`` if its first poll came before the last
submit) once: one attempt, an upstream id of its own, one move into submitted in the ledger's counts,
and the simulator's ``POST /images/generation`` count equal to S (:func:`submit_faults`; goal: no
fault); worker PSS (also per pool) and Redis ``used_memory`` growth per job from after the warm-up to
all in flight (before any poll). First polls: each job's stays where its submit put it (300 s out,
+-5 % jitter), all moved earlier by one constant so the first falls due shortly (the spread the
submits made is kept); their lateness is read as above over the first 60 s (quick 4 s), not a whole
cycle.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks import baseline_app
from benchmarks.context import Context, producer_for, settings_for
from benchmarks.harness import DEFAULT_POOLS, BenchWorker, Stack, settle_memory, stacks, tree_rss, wait_until
from benchmarks.result import BenchResult, ChartItem, Row
from benchmarks.simcapacity import headroom_row
from benchmarks.stats import Goal, per_item, ratio, summary
from genq import keys
from genq.celeryconf import POLL
from genq.ledger import Ledger, as_text
from genq.schemas import ImageRequest, JobKind, JobState
from genq.services import ledger_for
from genq.simulator import Duration, SimConfig

NAME = "capacity"
WARMUP = 100
CYCLE = 300.0
FAR = 86_400.0
POLICY = json.dumps(
    {"first_delay": 300, "interval": 300, "backoff": 1, "max_interval": 300, "jitter": 0.05, "deadline": 7200}
)
ENV = {"GENQ_POLL_IMAGE": POLICY}
POSTS = "POST /images/generation"
SUBMITS, SUBMITS_QUICK = 20_000, 500
# In flight once submitted: a job whose first poll came before the last submit (a full run on a slow
# node) is running upstream (the simulator's jobs run an hour).
IN_FLIGHT = ("submitted", "running")
SUBMIT_WARMUP = 20


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
        "jobs_through_producer": ctx.size(SUBMITS_QUICK, SUBMITS),
        "producer_first_poll_window_seconds": ctx.size(4.0, 60.0),
    }
    # Every upstream job runs an hour, the bulk-created ones and those the producer's submits create
    # alike: a poll in this benchmark finds its job still running, so the figures are the polls' own
    # (with the simulator's 1 s default, the producer phase's first polls set off 20,000 downloads).
    sim = SimConfig(api_key="bench-key", images_per_job=1, duration=Duration(kind="fixed", value=3600.0))
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
    sub = gq["producer_submits"]
    m5 = result.check(
        Goal(
            "every job submitted through the producer in flight once, one POST each",
            "faults (jobs lost, not submitted, retried, sharing an upstream id; POSTs off by)",
            "<=",
            0,
        ),
        sub["faults"],
        _submit_why(sub),
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
        Row(
            f"producer: {sub['jobs']:,} jobs submitted -> all in flight",
            sub["in_flight_seconds"],
            None,
            unit="s",
        ),
        Row("producer: jobs in flight per s (submit pool)", sub["jobs_per_s"], None, unit="/s"),
        Row(
            "producer: jobs in flight once / POSTs",
            sub["in_flight_once"],
            sub["posts"],
            ratio(sub["in_flight_once"], sub["posts"]),
            goal="0 faults",
            met=m5,
        ),
        Row("producer: worker PSS growth per in-flight job", sub["worker_bytes_per_job"], None, unit="B"),
        Row("producer: Redis memory per in-flight job", sub["redis_bytes_per_job"], None, unit="B"),
        Row(
            f"producer: first polls made / due in {sub['window_seconds']:.0f} s",
            sub["polled_in_window"],
            sub["due_in_window"],
            ratio(sub["polled_in_window"], sub["due_in_window"]),
        ),
        Row("producer: first-poll lateness p95", sub["lateness"]["p95"], None, unit="s"),
        Row("producer: first-poll lateness p99", sub["lateness"]["p99"], None, unit="s"),
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
    result.notes.append(
        f"producer: {sub['jobs']:,} jobs submitted with Producer.submit_image (one thread) on the same "
        "processes after the injected phases (those jobs held a day out first); in flight = every job "
        "submitted in the ledger, timed from the first submit to the last submitted_at; worker memory the "
        f"PSS growth from after {SUBMIT_WARMUP} warm-up submits to all in flight, Redis the used_memory "
        "growth over the same span (before any poll; with the event stream under its cap in quick mode, "
        "at it in a full run)"
    )
    result.notes.append(
        f"producer: first polls over {sub['window_seconds']:.0f} s, not a whole cycle: each job's first "
        f"poll stays where its submit put it (300 s out, +-5 % jitter; spread over "
        f"{sub['first_polls_span_seconds'] or 0:.0f} s), all moved earlier by one constant "
        f"({sub['first_polls_shifted_by_seconds']:.0f} s) so the first falls due shortly; lateness as above"
    )
    if not sub["poll_queue_drained_before"]:
        result.notes.append(
            "producer: the poll queue still held messages of the cycle when the phase began (the node had "
            "fallen behind): its first polls waited behind them, so their lateness is not the phase's own"
        )
    if sub["first_polled_before_the_last_submit"]:
        result.notes.append(
            f"producer: {sub['first_polled_before_the_last_submit']:,} jobs had their first poll before the "
            "last submit (in flight as running; left out of the first-poll window)"
        )
    real, injected = sub["redis_key_sizes"], gq["redis_key_sizes"]
    if real.get("job_hash_encoding") != injected.get("job_hash_encoding"):
        result.notes.append(
            f"producer: a job hash written by the real submit path is {real.get('job_hash')} B "
            f"({real.get('job_hash_encoding')}), an injected one {injected.get('job_hash')} B "
            f"({injected.get('job_hash_encoding')}): the Redis figures of the injected phases do not "
            "hold for jobs submitted through the producer"
        )
    return result


def _submit_why(sub: dict[str, Any]) -> str:
    names = (
        "lost",
        "not_submitted",
        "retried",
        "no_upstream_id",
        "shared_upstream_id",
        "extra_posts",
        "missing_posts",
        "moves_off",
    )
    parts = [f"{k} {sub[k]}" for k in names if sub.get(k)]
    return f"{', '.join(parts)}; states {sub.get('states')}" if parts else ""


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
            f"covers two sweep intervals of {gq['sweep_interval']} s)"
        )
    return "; ".join(parts)


def _schedule(s: Stack, scheduled: dict[str, float]) -> None:
    """Set each job's next poll (its record's ``next_poll_at`` and its due score), earliest first."""
    pipe = s.redis.pipeline(transaction=False)
    for k, (job_id, at) in enumerate(scheduled.items()):
        pipe.hset(keys.job(job_id), "next_poll_at", repr(at))
        pipe.zadd(keys.DUE, {job_id: at})
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
    s.redis.zadd(keys.DUE, dict.fromkeys(warm, time.time()))
    wait_until(
        lambda: all(int(p or 0) >= 1 for p in [s.redis.hget(keys.job(w), "polls") for w in warm]),
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
    s.redis.zadd(keys.DUE, dict.fromkeys(ids[:small], time.time() + FAR))

    ctx.log(f"{NAME}: writing {n - small:,} more ledger records")
    t = time.monotonic()
    write_submitted(ledger, ids[small:], upstream[small:], settings.poll.image.deadline)
    write_seconds += time.monotonic() - t
    # No poll of the small cycle still coming: none queued, no countdown held (the look-ahead's).
    wait_until(lambda: _poll_waiting(s) == 0 and _eta_held(s) == 0, ctx.size(10.0, 60.0), 0.1)
    mem1 = settle_memory(s.redis, ctx.size(0.5, 1.0))
    sizes = _key_sizes(s, ids[-1])

    # Spread the next polls evenly over one cycle starting shortly, as in a steady state.
    lateness = _Lateness(s, ids)  # reads each job's poll count first
    # At least a sweep interval out: the first polls must be seen by a sweep before they fall due (a
    # sweep sends what falls due within its look-ahead; one that ran before the schedule saw nothing).
    start = time.time() + ctx.size(2.5, 4.0)
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
    # Polls due at the window's end have their countdowns: they run within moments of it.
    wait_until(lambda: lateness.read(start + window) >= len(in_window), ctx.size(2.5, 5.0), 0.2)
    read_at = time.time()
    lateness.read(start + window)
    late, made = lateness.result(in_window, read_at)
    mem2 = settle_memory(s.redis, 0.5)
    stats = s.sim.stats(include_jobs=False)
    gets = stats["requests"].get("GET /jobs", 0)
    due_until_read = sum(1 for at in scheduled.values() if at <= read_at)
    held_by_workers = _eta_held(s)
    pools = {"+".join(spec["queues"]): w.pid for spec, w in zip(DEFAULT_POOLS, workers, strict=True)}
    submits = _through_producer(ctx, s, pools, [*warm, *ids])
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
        "producer_submits": submits,
    }


def _hold_far(s: Stack, ids: Sequence[str]) -> None:
    """Move these jobs' due polls a day out (their records keep their state)."""
    far = time.time() + FAR
    for start in range(0, len(ids), 20_000):
        s.redis.zadd(keys.DUE, dict.fromkeys(ids[start : start + 20_000], far))


def _ledger_fields(s: Stack, ids: Sequence[str], *fields: str) -> list[list[str | None]]:
    """These fields of each job's record, in order (None where absent)."""
    out: list[list[str | None]] = []
    for start in range(0, len(ids), 5000):
        pipe = s.redis.pipeline(transaction=False)
        for job_id in ids[start : start + 5000]:
            pipe.hmget(keys.job(job_id), *fields)
        out += [[as_text(v) if v is not None else None for v in row] for row in pipe.execute()]
    return out


def _poll_waiting(s: Stack) -> int:
    """Poll messages waiting in the broker (kombu keeps a list per priority step)."""
    return sum(int(s.redis.llen(POLL if p == 0 else f"{POLL}\x06\x16{p}")) for p in (0, 3, 6, 9))


def _moves_to_submitted(s: Stack) -> int:
    """Image jobs moved into ``submitted`` so far, by the ledger's counts (a move per step)."""
    raw = {as_text(k): int(v) for k, v in s.redis.hgetall(keys.COUNTS).items()}
    return sum(v for k, v in raw.items() if k.startswith("image:") and k.endswith(">submitted"))


class _InFlight:
    """Whether every one of ``ids`` is in flight (submitted, or running after a first poll); only those
    not seen in flight yet are read again."""

    def __init__(self, s: Stack, ids: Sequence[str]) -> None:
        self.s = s
        self.waiting = list(ids)

    def __call__(self) -> bool:
        states = _ledger_fields(self.s, self.waiting, "state")
        self.waiting = [j for j, (state,) in zip(self.waiting, states, strict=True) if state not in IN_FLIGHT]
        return not self.waiting


def submit_faults(
    jobs: int,
    records: Sequence[tuple[str | None, int, str | None]],
    posts: int,
    moves: int | None = None,
) -> dict[str, Any]:
    """What went wrong getting ``jobs`` jobs in flight through the producer. ``records``: each job's
    (state, submit_attempts, upstream_id) as the ledger holds it (state None: no record; ``submitted``
    or ``running``, after a first poll, is in flight); ``posts``:
    the POSTs the upstream answered; ``moves``: the ledger's moves into ``submitted`` (its counts),
    when read. ``faults`` is 0 only when every job is ``submitted`` after one attempt with an upstream
    id of its own, moved to ``submitted`` once, and the upstream saw exactly one POST per job.

    >>> submit_faults(2, [("submitted", 1, "u1"), ("running", 1, "u2")], 2)["faults"]
    0
    >>> f = submit_faults(3, [("submitted", 2, "u1"), ("submit_unknown", 1, None)], 4, moves=2)
    >>> f["lost"], f["not_submitted"], f["retried"], f["extra_posts"], f["moves_off"], f["faults"]
    (1, 1, 1, 1, 1, 5)
    """
    states = Counter(state or "missing" for state, _, _ in records)
    lost = jobs - len(records) + states.get("missing", 0)
    submitted = [(attempts, upstream) for state, attempts, upstream in records if state in IN_FLIGHT]
    not_submitted = len(records) - states.get("missing", 0) - len(submitted)
    retried = sum(1 for attempts, _ in submitted if attempts != 1)
    upstream = [u for _, u in submitted if u]
    no_upstream = len(submitted) - len(upstream)
    shared_upstream = len(upstream) - len(set(upstream))
    extra_posts, missing_posts = max(0, posts - jobs), max(0, jobs - posts)
    moves_off = abs(moves - jobs) if moves is not None else 0
    return {
        "states": dict(states),
        "in_flight_once": len(submitted) - retried - no_upstream - shared_upstream,
        "lost": lost,
        "not_submitted": not_submitted,
        "retried": retried,
        "no_upstream_id": no_upstream,
        "shared_upstream_id": shared_upstream,
        "posts": posts,
        "extra_posts": extra_posts,
        "missing_posts": missing_posts,
        "moves_to_submitted": moves,
        "moves_off": moves_off,
        "faults": moves_off
        + lost
        + not_submitted
        + retried
        + no_upstream
        + shared_upstream
        + extra_posts
        + missing_posts,
    }


def _through_producer(
    ctx: Context, s: Stack, pools: dict[str, int], injected: Sequence[str]
) -> dict[str, Any]:
    """S jobs submitted through the real producer and submit pool on the same processes, after the
    injected phases (whose jobs are held a day out first, so no poll of theirs shares the pools)."""
    jobs = ctx.size(SUBMITS_QUICK, SUBMITS)
    window = ctx.size(4.0, 60.0)
    ctx.log(f"{NAME}: holding the {len(injected):,} injected jobs a day out; draining the poll queue")
    _hold_far(s, injected)
    # A node that fell behind in the cycle may still hold its polls' messages: the phase's first polls
    # would wait behind them, so the result says whether the queue drained.
    # (and the look-ahead's countdowns already sent have run: none is held).
    drained = wait_until(lambda: _poll_waiting(s) == 0 and _eta_held(s) == 0, ctx.size(10.0, 120.0), 0.1)
    if not drained:
        ctx.log(f"{NAME}: {_poll_waiting(s):,} poll messages still queued; the first polls wait behind them")
    producer = producer_for(s, ENV)
    try:
        # Warm-up: every submit pool child has made its first POST before the first memory figure.
        warm = [producer.submit_image(f"capacity warm {i}", num_images=1).id for i in range(SUBMIT_WARMUP)]
        wait_until(_InFlight(s, warm), 30, 0.1)
        time.sleep(ctx.size(0.5, 1.0))
        by_pool0 = {name: tree_rss([pid], "pss") for name, pid in pools.items()}
        rss0 = sum(by_pool0.values())
        mem0 = settle_memory(s.redis, 0.5)
        keys0 = int(s.redis.dbsize())
        moves0 = _moves_to_submitted(s)
        s.sim.reset_stats()
        ctx.log(f"{NAME}: submitting {jobs:,} jobs through the producer (submit_image)")
        t0 = time.time()
        ids = [producer.submit_image(f"capacity submit {i}", num_images=1).id for i in range(jobs)]
        producer_seconds = time.time() - t0
    finally:
        producer.close()
    all_in = wait_until(_InFlight(s, ids), ctx.size(60.0, 900.0), ctx.size(0.1, 0.5))
    ctx.log(f"{NAME}: {jobs:,} submitted in {producer_seconds:.1f}s; all in flight: {all_in}")
    time.sleep(ctx.size(0.5, 1.0))
    by_pool1 = {name: tree_rss([pid], "pss") for name, pid in pools.items()}
    rss1 = sum(by_pool1.values())
    mem1 = settle_memory(s.redis, 0.5)
    keys1 = int(s.redis.dbsize())
    sizes = _key_sizes(s, ids[-1])
    moves = _moves_to_submitted(s) - moves0
    posts = int(s.sim.stats(include_jobs=False)["requests"].get(POSTS, 0))
    rows = _ledger_fields(s, ids, "state", "submit_attempts", "upstream_id", "created_at", "submitted_at")
    faults = submit_faults(
        jobs,
        [(st, int(att or 0), up) if st is not None else (None, 0, None) for st, att, up, _, _ in rows],
        posts,
        moves,
    )
    submitted_at = [float(r[4]) for r in rows if r[0] in IN_FLIGHT and r[4]]
    to_submitted = [float(r[4]) - float(r[3]) for r in rows if r[0] in IN_FLIGHT and r[3] and r[4]]
    in_flight_seconds = max(submitted_at) - t0 if all_in and submitted_at else None

    # First polls: each held where its submit put it (~300 s out, ± the jitter), all moved earlier by
    # one constant so the first falls due shortly; the spread the real submits made is kept. A job
    # already polled (its first poll came before the last submit) is left out.
    firsts = _ledger_fields(s, ids, "state", "next_poll_at", "polls")
    due = sorted(
        (float(at), j)
        for j, (st, at, polls) in zip(ids, firsts, strict=True)
        if st == "submitted" and at and not int(polls or 0)
    )
    polled_before = sum(1 for _, _, polls in firsts if int(polls or 0))
    late: list[float] = []
    made = 0
    in_window: list[str] = []
    gets = 0
    read_at = start = time.time()
    shift = 0.0
    if due:
        shift = due[0][0] - (time.time() + ctx.size(2.5, 4.0))  # a sweep interval out, as above
        scheduled = {j: at - shift for at, j in due}
        lateness = _Lateness(s, list(scheduled))
        lateness.scheduled = scheduled
        s.sim.reset_stats()
        _schedule(s, scheduled)
        start = due[0][0] - shift
        in_window = [j for j, at in scheduled.items() if at <= start + window]
        ctx.log(f"{NAME}: first polls of the submitted jobs; window {window:.0f}s ({len(in_window):,} due)")
        while time.time() < start + window:
            lateness.read(time.time())
            time.sleep(max(0.0, min(ctx.size(0.5, 5.0), start + window - time.time())))
        wait_until(lambda: lateness.read(start + window) >= len(in_window), ctx.size(2.5, 5.0), 0.2)
        read_at = time.time()
        lateness.read(start + window)
        late, made = lateness.result(in_window, read_at)
        gets = int(s.sim.stats(include_jobs=False)["requests"].get("GET /jobs", 0))
    first_span = (due[-1][0] - due[0][0]) if due else None
    return {
        "jobs": jobs,
        "poll_queue_drained_before": drained,
        "all_in_flight": all_in,
        "producer_seconds": producer_seconds,
        "producer_jobs_per_s": jobs / producer_seconds if producer_seconds > 0 else None,
        "in_flight_seconds": in_flight_seconds,
        "jobs_per_s": jobs / in_flight_seconds if in_flight_seconds else None,
        "submit_to_submitted": summary(to_submitted),
        **faults,
        "worker_pss_before": rss0,
        "worker_pss_after": rss1,
        "worker_bytes_per_job": per_item(rss1 - rss0, jobs),
        "worker_bytes_per_job_by_pool": {k: per_item(by_pool1[k] - v, jobs) for k, v in by_pool0.items()},
        "redis_used_before": mem0,
        "redis_used_after": mem1,
        "redis_bytes_per_job": per_item(mem1 - mem0, jobs),
        "redis_keys_per_job": per_item(keys1 - keys0, jobs),
        "redis_key_sizes": sizes,
        "first_polls_span_seconds": first_span,
        "first_polled_before_the_last_submit": polled_before,
        "first_polls_shifted_by_seconds": shift,
        "window_seconds": window,
        "due_in_window": len(in_window),
        "polled_in_window": made,
        "polls_per_s": gets / (read_at - start) if read_at > start else None,
        "lateness": summary(late),
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
            pipe.hget(keys.job(job_id), "polls")
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
                pipe.hmget(keys.job(job_id), "polls", "updated_at")
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
        "job_hash": usage(keys.job(job_id)),
        "job_hash_encoding": as_text(s.redis.object("encoding", keys.job(job_id))),
        "events_stream_entries": int(s.redis.xlen(keys.EVENTS)),
        "events_stream_bytes": usage(keys.EVENTS),
        "due_index_bytes": usage(keys.DUE),
        "jobs_index_bytes": usage(keys.JOBS),
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
                    # The body a producer's submit records (its defaults filled in), so an injected
                    # record is the size of a real one.
                    ImageRequest(prompt=f"capacity {job_id}", num_images=1).upstream_body(),
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
