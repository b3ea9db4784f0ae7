"""3. Capacity: N jobs in flight at once on one worker node with the project's default pools.

Upstream jobs run for an hour and are polled every 5 minutes (image policy first_delay = interval =
300 s, jitter 0.05): every wait is longer than GENQ_POLL_COUNTDOWN_MAX (60 s), so it is held in the
Redis due index and dispatched by the sweeper (beat -> ``genq.sweep``), never a countdown in a worker.

How the jobs get in flight (no 100,000 paid POSTs): the simulator creates N upstream jobs in one
call (``/_bench/bulk``, its own ``create_job``), then each ledger record is written by genqueue's own
``Ledger.create`` and ``Ledger.transition`` (pending -> submitting -> submitted, with exactly the fields
``JobService._submitted`` writes: upstream id, poll_gen 1, deadline, a held wait), captured and replayed
through pipelines. They are first held far in the future; once all are written, one pipeline sets each
job's next poll (``next_poll_at`` and its ``genq:due`` score) spread evenly over one 5-minute cycle that
starts a few seconds later, as a steady state would have them.

Measured: Redis ``used_memory`` before and after (per job), the RSS of every worker process and pool
child before and after a window of W seconds of polling (per job), and poll lateness over the window:
``updated_at`` of the transition the poll made minus the scheduled ``next_poll_at`` (a poll not made by
the end counts as late by at least the time waited). Baseline in the same run: bare Celery countdown
tasks (``bench.hold``, countdown 3600 s) held by a bare worker: its RSS and Redis memory per task.

Full run only: the same measurement at 20,000 in flight (a poll rate this node sustains), once with
genqueue as it is and once with the sweep look-ahead prototype (:mod:`benchmarks.lookahead_app`), so
the share of lateness that comes from waiting for the next sweep shows apart from any backlog.
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
SUSTAINED = 20_000  # jobs in flight for the look-ahead comparison: 67 polls/s due
SUSTAINED_WINDOW = 30.0
WARMUP = 100
CYCLE = 300.0
POLICY = json.dumps(
    {"first_delay": 300, "interval": 300, "backoff": 1, "max_interval": 300, "jitter": 0.05, "deadline": 7200}
)
ENV = {"GENQ_POLL_IMAGE": POLICY}


def run(ctx: Context) -> BenchResult:
    n = ctx.size(5_000, 100_000)
    held = ctx.size(1_000, 10_000)
    window = ctx.size(5.0, 60.0)
    result = BenchResult(NAME, f"Capacity: {n:,} jobs in flight")
    result.size = {
        "jobs": n,
        "baseline_countdown_tasks": held,
        "window_seconds": window,
        "poll_every": CYCLE,
        "pools": DEFAULT_POOLS,
        "sweep_interval": 2.0,
    }
    sim = SimConfig(api_key="bench-key", images_per_job=1)
    # The baseline on a stack of its own, its worker booted with genqueue's pools (it idles, blocked
    # on its queue, while genqueue is measured): its Redis holds only its own tasks.
    with stacks((sim, ctx.workdir / NAME, NAME), (sim, ctx.workdir / f"{NAME}-base", "base")) as (s, sb):
        with ThreadPoolExecutor(1) as pool:
            bare_worker = pool.submit(sb.worker, app="benchmarks.baseline_app", concurrency=4, queues=[POLL])
            gq = _genqueue(ctx, s, n, window, booted=bare_worker.result)
            base = _bare(ctx, sb, held, bare_worker.result())
        # The sweep look-ahead prototype, side by side with genqueue as it is, at a load this node
        # sustains (the full N may exceed its poll rate, and then the backlog hides the sweep's share).
        sustained: dict[str, Any] = {}
        if not ctx.quick:
            for label, app in (
                ("genqueue", "genq.worker"),
                ("lookahead_prototype", "benchmarks.lookahead_app"),
            ):
                s.reset()
                ctx.log(f"{NAME}: {SUSTAINED:,} in flight, {label} ({app})")
                run_ = _genqueue(ctx, s, SUSTAINED, SUSTAINED_WINDOW, app=app)
                sustained[label] = {
                    k: run_[k]
                    for k in (
                        "lateness",
                        "worker_bytes_per_job",
                        "polled_in_window",
                        "due_in_window",
                        "polls_per_s",
                        "due_per_s",
                        "sim_peak_rate_1s",
                    )
                }
        peak = max([gq["sim_peak_rate_1s"], *(v["sim_peak_rate_1s"] for v in sustained.values())])

    result.figures = {**gq, "at_sustained_load": sustained}
    result.baseline = base
    result.ratios = {
        "worker_bytes_per_job": ratio(gq["worker_bytes_per_job"], base["worker_bytes_per_task"]),
        "redis_bytes_per_job": ratio(gq["redis_bytes_per_job"], base["redis_bytes_per_task"]),
    }
    late = gq["lateness"]
    m1 = result.check(
        Goal("worker memory growth <= 1 KB per in-flight job", "worker bytes/job", "<=", 1024),
        gq["worker_bytes_per_job"],
    )
    m2 = result.check(
        Goal("Redis <= 1 KB per in-flight job", "Redis bytes/job", "<=", 1024),
        gq["redis_bytes_per_job"],
        _redis_why(gq),
    )
    m3 = result.check(
        Goal("p95 poll lateness <= 0.25 s", "p95 lateness", "<=", 0.25), late["p95"], _late_why(gq)
    )
    m4 = result.check(Goal("p99 poll lateness <= 1 s", "p99 lateness", "<=", 1.0), late["p99"], _late_why(gq))
    result.rows = [
        Row(
            "worker RSS growth per in-flight job",
            gq["worker_bytes_per_job"],
            base["worker_bytes_per_task"],
            result.ratios["worker_bytes_per_job"],
            "B",
            "<= 1 KB",
            m1,
        ),
        Row(
            "Redis memory per in-flight job",
            gq["redis_bytes_per_job"],
            base["redis_bytes_per_task"],
            result.ratios["redis_bytes_per_job"],
            "B",
            "<= 1 KB",
            m2,
        ),
        Row("poll lateness p50", late["p50"], None, unit="s"),
        Row("poll lateness p95", late["p95"], None, unit="s", goal="<= 0.25 s", met=m3),
        Row("poll lateness p99", late["p99"], None, unit="s", goal="<= 1 s", met=m4),
        Row("poll lateness max", late["max"], None, unit="s"),
        *[
            Row(
                f"p95 lateness at {SUSTAINED // 1000}k in flight, {label.replace('_', ' ')}",
                v["lateness"]["p95"],
                None,
                unit="s",
                goal="(proposal)" if "prototype" in label else "",
            )
            for label, v in sustained.items()
        ],
        Row(
            "polls/s made vs due",
            gq["polls_per_s"],
            gq["due_per_s"],
            ratio(gq["polls_per_s"], gq["due_per_s"]),
            "/s",
        ),
        headroom_row(ctx, peak),
    ]
    result.chart = [
        ChartItem("latency", f"3 capacity: poll lateness p50 ({n:,} in flight)", late["p50"], None, "s"),
        ChartItem("latency", f"3 capacity: poll lateness p95 ({n:,} in flight)", late["p95"], None, "s"),
    ]
    result.notes.append(
        "worker memory is the PSS (proportional set size: pages shared after fork split between processes) "
        "of "
        "every worker process and pool child; RSS would count shared pages once per child"
    )
    result.notes.append(
        "lateness = the ledger's updated_at of the poll's transition - the scheduled next_poll_at; "
        "it includes "
        "the wait for the next sweep (GENQ_WORKER_SWEEP_INTERVAL, 2 s by default), the queue and the GET"
    )
    return result


def _redis_why(gq: dict[str, Any]) -> str:
    return f"per job: {gq.get('redis_key_sizes', {})}"


def _late_why(gq: dict[str, Any]) -> str:
    late = gq["lateness"]
    parts = []
    if gq["polled_in_window"] < 0.98 * gq["due_in_window"]:
        parts.append(
            f"only {gq['polled_in_window']} of the {gq['due_in_window']} polls due in the window were made "
            f"({gq['polls_per_s']:.0f} polls/s for {gq['due_per_s']:.0f}/s due): the node fell behind"
        )
    if late["p50"] is not None and late["p50"] > 0.5:
        parts.append(
            "a held wait is dispatched only at the next sweep, so lateness is spread over the sweep interval "
            f"({gq['sweep_interval']} s)"
        )
    return "; ".join(parts)


def _genqueue(
    ctx: Context,
    s: Stack,
    n: int,
    window: float,
    app: str = "genq.worker",
    booted: Callable[[], Any] = lambda: None,
) -> dict[str, Any]:
    """``booted`` returns once every other process of the run is up: a process that starts between
    the two memory readings would share library pages with the workers and lower their PSS."""
    settings = settings_for(s, ENV)
    ctx.log(f"{NAME}: starting the default pools (submit, poll, download, training) and beat")
    workers = s.workers([{**spec, "env": ENV, "app": app} for spec in DEFAULT_POOLS], beat_env=ENV)
    pids = [w.pid for w in workers]
    booted()
    ctx.log(f"{NAME}: pools up; warm-up polls")
    # Warm-up: a few jobs polled right away, so every pool child has made its first poll (imports,
    # connections, caches) before the "before" figure; they stay in flight like the others.
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
    ctx.log(f"{NAME}: writing {n:,} ledger records (submitted, held) through pipelines")
    t = time.monotonic()
    ids = [f"cap{i:07d}" for i in range(n)]
    write_submitted(ledger, ids, upstream, settings.poll.image.deadline)
    write_seconds = time.monotonic() - t
    mem1 = settle_memory(s.redis, ctx.size(0.5, 1.0))
    sizes = _key_sizes(s, ids[0])

    # Spread the next polls evenly over one cycle starting shortly, as in a steady state.
    start = time.time() + ctx.size(1.5, 3.0)
    scheduled = {job_id: start + CYCLE * i / n for i, job_id in enumerate(ids)}
    pipe = s.redis.pipeline(transaction=False)
    for k, (job_id, at) in enumerate(scheduled.items()):
        pipe.hset(f"genq:job:{job_id}", "next_poll_at", repr(at))
        pipe.zadd("genq:due", {job_id: at})
        if k % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    in_window = [j for j, at in scheduled.items() if at <= start + window]
    ctx.log(f"{NAME}: all {n:,} in flight; polling window {window:.0f}s ({len(in_window)} polls due)")
    s.sim.reset_stats()
    time.sleep(max(0.0, start + window - time.time()))
    rss1 = tree_rss(pids, "pss")
    # Polls due at the window's end get their sweep and run: up to a sweep interval and a bit. Quick
    # stops as soon as every poll due in the window is made (the full run's reads would be 20,000).
    if ctx.quick:
        wait_until(lambda: _lateness(s, in_window, scheduled, time.time())[1] >= len(in_window), 2.5, 0.1)
    else:
        time.sleep(2.5)
    read_at = time.time()
    lateness, made = _lateness(s, in_window, scheduled, read_at)
    mem2 = used_memory_now(s)
    stats = s.sim.stats(include_jobs=False)
    gets = stats["requests"].get("GET /jobs", 0)
    due_until_read = sum(1 for at in scheduled.values() if at <= read_at)
    held_by_workers = _eta_held(s)
    s.stop_processes()
    return {
        "jobs": n,
        "sim_create_seconds": sim_seconds,
        "ledger_write_seconds": write_seconds,
        "worker_rss_before": rss0,
        "worker_rss_after": rss1,
        "worker_bytes_per_job": per_item(rss1 - rss0, n),
        "redis_used_before": mem0,
        "redis_used_all_in_flight": mem1,
        "redis_used_after_window": mem2,
        "redis_bytes_per_job": per_item(mem1 - mem0, n),
        "redis_key_sizes": sizes,
        "due_in_window": len(in_window),
        "polled_in_window": made,
        "due_per_s": due_until_read / (read_at - start),
        "sim_peak_rate_1s": stats["max_rate_1s"],
        "polls_per_s": gets / (read_at - start) if read_at > start else None,
        "lateness": summary(lateness),
        "sweep_interval": settings.worker.sweep_interval,
        "countdown_messages_held_by_workers": held_by_workers,
    }


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


def _lateness(
    s: Stack, ids: list[str], scheduled: dict[str, float], read_at: float
) -> tuple[list[float], int]:
    out: list[float] = []
    made = 0
    for start in range(0, len(ids), 2000):
        chunk = ids[start : start + 2000]
        pipe = s.redis.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hmget(f"genq:job:{job_id}", "polls", "updated_at")
        for job_id, (polls, updated) in zip(chunk, pipe.execute(), strict=True):
            if polls is not None and int(polls) >= 1 and updated is not None:
                made += 1
                out.append(float(updated) - scheduled[job_id])
            else:
                out.append(read_at - scheduled[job_id])  # not polled yet: late at least this much
    return out, made


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
