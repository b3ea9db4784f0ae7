"""2. Per-task overhead vs bare Celery.

Upstream with zero latency (jobs succeed at once), N jobs with one output each, one worker consuming
every queue (prefork 4, INFO logs) on the same Redis. Baseline: bare Celery tasks of the same shape
(``bench.submit -> bench.poll -> bench.download -> bench.finalize``, passing ids, same upstream calls:
the POST, the GET, the file streamed to disk) with genqueue's own Celery configuration. genqueue: the
producer, the ledger, delivery counting, the sweeper on beat, safe downloads with sha256. Both poll
first after the same countdown (0.05 s). Each side has its own Redis and simulator and keeps its workers
for the whole benchmark; after a warm-up round each, rounds alternate which side goes first. Per round:
job throughput (jobs / (last finish - first submit)), Redis commands per job (``INFO commandstats``
deltas, so commands run inside Lua are counted) and worker CPU per job (user + system of every worker
process, genqueue's beat included). Each ratio is the median of the per-round ratios, with its min-max.

Then one smaller run of each with Redis MONITOR (commands sent vs run inside Lua scripts, by name) and a
cProfile of genqueue's pool children (where a job's time goes, per function).
"""

from __future__ import annotations

import contextlib
import glob
import json
import pstats
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis

from benchmarks import baseline_app
from benchmarks.context import Context, done_times, producer_for, records, wait_done, wait_terminal
from benchmarks.harness import Stack, calls_delta, command_calls, stacks, tree_cpu
from benchmarks.result import BenchResult, ChartItem, Row
from benchmarks.simcapacity import headroom_row
from benchmarks.stats import Goal, median, ratio, spread
from genq.celeryconf import QUEUES
from genq.simulator import Duration, SimConfig

NAME = "overhead"
CONCURRENCY = 4
COUNTDOWN = 0.05
POLICY = json.dumps(
    {"first_delay": 0.05, "interval": 0.05, "backoff": 1, "max_interval": 0.05, "jitter": 0, "deadline": 600}
)
ENV = {"GENQ_POLL_IMAGE": POLICY}

# Functions whose cumulative time explains a genqueue job (file suffix, function name, label).
BREAKDOWN = [
    ("celery/app/trace.py", "trace_task", "all task runs (Celery trace, incl. everything below)"),
    ("genq/worker/base.py", "__call__", "genqueue task body incl. delivery count"),
    ("genq/services.py", "deliveries", "delivery counting (Redis pipeline)"),
    ("genq/worker/tasks.py", "dispatch", "dispatching next tasks (apply_async)"),
    ("genq/jobs.py", "submit", "JobService.submit"),
    ("genq/jobs.py", "poll", "JobService.poll"),
    ("genq/jobs.py", "download", "JobService.download"),
    ("genq/jobs.py", "finalize", "JobService.finalize"),
    ("genq/ledger.py", "get", "Ledger.get (HGETALL + JobRecord parse)"),
    ("genq/schemas.py", "from_hash", "JobRecord.from_hash (pydantic)"),
    ("genq/ledger.py", "transition", "Ledger.transition (Lua)"),
    ("genq/ledger.py", "record_output", "Ledger.record_output (Lua)"),
    ("genq/api.py", "_request", "upstream HTTP call (incl. limiter)"),
    ("genq/limits.py", "acquire", "rate limiter acquire (Lua)"),
    ("genq/downloads.py", "fetch", "download (stream, sha256, fsync, rename)"),
    ("genq/netguard.py", "", "netguard (SSRF checks), any function"),
    ("requests/sessions.py", "request", "requests Session.request (HTTP, all)"),
    ("redis/client.py", "execute_command", "redis-py execute_command (all)"),
    ("redis/commands/core.py", "__call__", "redis-py Script.__call__ (all Lua)"),
    ("logging/__init__.py", "_log", "logging"),
    ("kombu/messaging.py", "publish", "kombu publish (sending messages)"),
    ("os", "fsync", "fsync"),
]


def run(ctx: Context) -> BenchResult:
    # A round is a burst the pool clears well within the sweep grace (30 s) even on a loaded machine:
    # a longer backlog makes the sweeper send submits again (2,000 jobs at ~7 jobs/s made 1.8 submit
    # runs per job), which measures the backlog, not the cost of a job.
    n = ctx.size(40, 300)
    rounds = ctx.size(2, 5)
    warm = ctx.size(10, 50)
    sample = ctx.size(0, 100)  # quick: no MONITOR or cProfile run (commandstats and CPU still measured)
    result = BenchResult(NAME, "Per-task overhead vs bare Celery")
    result.size = {
        "jobs": n,
        "rounds": rounds,
        "warm_up_jobs": warm,
        "pool": f"prefork {CONCURRENCY}",
        "profile_jobs": sample,
    }
    sim = SimConfig(api_key="bench-key", images_per_job=1, duration=Duration(kind="fixed", value=0.0))
    base_runs: list[dict[str, Any]] = []
    gq_runs: list[dict[str, Any]] = []
    # One stack per side, its workers started once and kept for every round: each side's Redis counts
    # only its own commands, and no round pays (or hides) a worker's start-up.
    with stacks((sim, ctx.workdir / f"{NAME}-base", "base"), (sim, ctx.workdir / NAME, NAME)) as (sb, s):
        with ThreadPoolExecutor(2) as pool:  # both sides boot at once: their workers take seconds
            booting_bare, booting_gq = pool.submit(_BareSide, ctx, sb), pool.submit(_GenqueueSide, ctx, s)
            bare, gq = booting_bare.result(), booting_gq.result()
        ctx.log(f"{NAME}: warm-up, {warm} jobs each")
        bare.round(warm)
        gq.round(warm)
        for r in range(rounds):
            # Alternate who goes first, so a drift in the machine's load favours neither side.
            order: list[tuple[str, Any]] = [("bare Celery", bare), ("genqueue", gq)]
            if r % 2:
                order.reverse()
            for label, side in order:
                ctx.log(f"{NAME}: round {r + 1}/{rounds}: {label}, {n} jobs")
                (base_runs if side is bare else gq_runs).append(side.round(n))
        peak = max(x["sim_peak_rate_1s"] for x in base_runs + gq_runs)
        base_cmds: dict[str, Any] = {}
        gq_cmds: dict[str, Any] = {}
        if sample:
            ctx.log(f"{NAME}: MONITOR run ({sample} jobs each)")
            base_cmds = bare.round(sample, monitor=True)["monitor"]
            gq_cmds = gq.round(sample, monitor=True)["monitor"]
        gq.producer.close()
        sb.stop_processes()
        s.stop_processes()
        gq_profile: dict[str, Any] = {}
        if sample:
            ctx.log(f"{NAME}: cProfile run of genqueue ({sample} jobs)")
            gq_profile = _genqueue_profiled(ctx, s, sample)

    def med(runs: list[dict[str, Any]], key: str) -> float | None:
        values = [x[key] for x in runs if x.get(key) is not None]
        return median(values) if values else None

    def pair(key: str) -> tuple[float | None, float | None, float | None, tuple[float, float] | None]:
        per = [ratio(g.get(key), b.get(key)) for g, b in zip(gq_runs, base_runs, strict=True)]
        valid = [x for x in per if x is not None]
        return med(gq_runs, key), med(base_runs, key), (median(valid) if valid else None), spread(valid)

    tp, tp_base, rel, tp_spread = pair("jobs_per_s")
    cmds, cmds_base, cmds_rel, cmds_spread = pair("redis_calls_per_job")
    cpu, cpu_base, cpu_rel, cpu_spread = pair("cpu_ms_per_job")
    result.figures = {
        "runs": gq_runs,
        "jobs_per_s": tp,
        "redis_calls_per_job": cmds,
        "cpu_ms_per_job": cpu,
        "redis_by_command_per_job": _by_command(gq_runs),
        "monitor": gq_cmds,
        "profile": gq_profile,
    }
    result.baseline = {
        "runs": base_runs,
        "jobs_per_s": tp_base,
        "redis_calls_per_job": cmds_base,
        "cpu_ms_per_job": cpu_base,
        "redis_by_command_per_job": _by_command(base_runs),
        "monitor": base_cmds,
    }
    result.ratios = {
        "throughput": rel,
        "throughput_spread": tp_spread,
        "per_round": [
            ratio(g["jobs_per_s"], b["jobs_per_s"]) for g, b in zip(gq_runs, base_runs, strict=True)
        ],
        "redis_calls": cmds_rel,
        "redis_calls_spread": cmds_spread,
        "cpu": cpu_rel,
        "cpu_spread": cpu_spread,
    }
    incomplete = [g for g in gq_runs if g["completed"] < n]
    why = f"{n - incomplete[0]['completed']} jobs did not succeed in a round" if incomplete else ""
    if not why and rel is not None and rel < 0.9 and gq_profile:
        why = _why(gq_profile, gq_cmds, base_cmds)
    m_tp = result.check(
        Goal("genqueue job throughput >= 0.9x bare Celery's", "throughput ratio", ">=", 0.9), rel, why
    )
    m_cmd = result.check(
        Goal("Redis commands per job (inside Lua included) <= 1.5x bare", "commands ratio", "<=", 1.5),
        cmds_rel,
        _top(result.figures["redis_by_command_per_job"]),
    )
    m_cpu = result.check(
        Goal("worker CPU per job <= 1.5x bare", "CPU ratio", "<=", 1.5),
        cpu_rel,
        "see the profile's top functions",
    )
    gq_rt = gq_cmds.get("round_trips_per_job")
    base_rt = base_cmds.get("round_trips_per_job")
    result.rows = [
        Row("jobs/s (median of rounds)", tp, tp_base, rel, "jobs/s", ">= 0.9x", m_tp, tp_spread),
        Row(
            "Redis commands per job, inside Lua included",
            cmds,
            cmds_base,
            cmds_rel,
            "",
            "<= 1.5x",
            m_cmd,
            cmds_spread,
        ),
        Row("worker CPU per job (all processes)", cpu, cpu_base, cpu_rel, "ms", "<= 1.5x", m_cpu, cpu_spread),
        Row("Redis commands sent per job (MONITOR)", gq_rt, base_rt, ratio(gq_rt, base_rt)),
        headroom_row(ctx, peak),
    ]
    result.chart = [ChartItem("throughput", "2 overhead: jobs/s (0-latency upstream)", tp, tp_base, "jobs/s")]
    result.notes.append(
        "both pipelines make the same upstream calls (POST, GET, file GET to disk) and use genqueue's Celery "
        "configuration (late acks, prefetch 1, task events, INFO logs), so the ratio is genqueue's own code"
    )
    result.notes.append(
        "each side has its own Redis and simulator and keeps its workers for all rounds; Redis commands "
        "are INFO commandstats deltas over a round (inside Lua included, idle worker traffic included); "
        "CPU is user+system of every worker process (genqueue's beat included) over a round"
    )
    return result


def _by_command(runs: list[dict[str, Any]]) -> dict[str, float]:
    total: Counter[str] = Counter()
    jobs = 0
    for r in runs:
        total.update(r.get("redis_calls", {}))
        jobs += r["jobs"]
    return {k: v / jobs for k, v in total.most_common(20)} if jobs else {}


def _top(by_command: dict[str, float]) -> str:
    return "largest per job: " + ", ".join(f"{k} {v:.1f}" for k, v in list(by_command.items())[:6])


def _why(profile: dict[str, Any], gq_cmds: dict[str, Any], base_cmds: dict[str, Any]) -> str:
    top = profile.get("breakdown_ms_per_job", {})
    items = sorted(((v, k) for k, v in top.items() if v is not None), reverse=True)[:6]
    parts = ", ".join(f"{k} {v:.1f} ms" for v, k in items)
    return (
        f"per job genqueue sends {gq_cmds.get('round_trips_per_job', 0):.0f} Redis commands "
        f"(bare: {base_cmds.get('round_trips_per_job', 0):.0f}); profiled time per job: {parts}"
    )


class _Side:
    """One side's stack with its workers kept running across rounds."""

    def __init__(self, ctx: Context, s: Stack) -> None:
        self.ctx = ctx
        self.s = s

    def pids(self) -> list[int]:
        return [p.pid for p in self.s.processes]

    def measure(self, n: int, monitor: bool, go: Any) -> dict[str, Any]:
        counter = CommandCounter(self.s.redis_server.url) if monitor else None
        self.s.sim.reset_stats()
        calls0 = command_calls(self.s.redis)
        cpu0 = tree_cpu(self.pids())
        with counter or contextlib.nullcontext():
            out: dict[str, Any] = go()
        cpu = tree_cpu(self.pids()) - cpu0
        calls = calls_delta(calls0, command_calls(self.s.redis))
        out.update(
            jobs=n,
            cpu_ms_per_job=cpu * 1000 / n,
            redis_calls=calls,
            redis_calls_per_job=sum(calls.values()) / n,
            sim_peak_rate_1s=self.s.sim.stats(include_jobs=False)["max_rate_1s"],
        )
        if counter is not None:
            out["monitor"] = counter.summary(n)
        return out


class _BareSide(_Side):
    def __init__(self, ctx: Context, s: Stack) -> None:
        super().__init__(ctx, s)
        s.worker(app="benchmarks.baseline_app", concurrency=CONCURRENCY, queues=QUEUES)
        self.seq = 0

    def round(self, n: int, monitor: bool = False) -> dict[str, Any]:
        s = self.s
        s.redis.delete(baseline_app.DONE)
        client = baseline_app.make_app(s.redis_server.url, main=False)

        def go() -> dict[str, Any]:
            t0 = time.time()
            for _ in range(n):
                self.seq += 1
                baseline_app.send(client, "bench.submit", f"j{self.seq}", f"bare {self.seq}", COUNTDOWN)
            ok = wait_done(self.ctx, s.redis, n, timeout=300)
            finished = done_times(s.redis)
            seconds = (max(finished) - t0) if finished else None
            return {
                "completed": len(finished),
                "all_completed": ok,
                "seconds": seconds,
                "jobs_per_s": len(finished) / seconds if seconds else None,
            }

        try:
            return self.measure(n, monitor, go)
        finally:
            client.close()


class _GenqueueSide(_Side):
    def __init__(self, ctx: Context, s: Stack) -> None:
        super().__init__(ctx, s)
        s.workers([{"concurrency": CONCURRENCY, "env": ENV}], beat_env=ENV)
        self.producer = producer_for(s, ENV)
        self.done = 0

    def round(self, n: int, monitor: bool = False) -> dict[str, Any]:
        s = self.s

        def go() -> dict[str, Any]:
            t0 = time.time()
            ids = [self.producer.submit_image(f"overhead {i}", num_images=1).id for i in range(n)]
            # genq:counts is cumulative over rounds: wait for this round's jobs on top of earlier ones.
            ok = wait_terminal(self.ctx, s.redis, self.done + n, timeout=300)
            self.done += n
            return {"ids": ids, "t0": t0, "all_terminal": ok}

        out = self.measure(n, monitor, go)
        # Read the records after the measurement: the harness's reads are not genqueue's commands.
        done = [r for r in records(s.redis, out.pop("ids")) if r.state.value == "succeeded"]
        finished = [r.finished_at for r in done if r.finished_at]
        seconds = (max(finished) - out.pop("t0")) if finished else None
        out.update(completed=len(done), seconds=seconds, jobs_per_s=len(done) / seconds if seconds else None)
        return out


def _genqueue_profiled(ctx: Context, s: Stack, n: int) -> dict[str, Any]:
    """A separate, untimed run with cProfile in every pool child: where a job's time goes."""
    s.reset()
    prof_dir = s.workdir / f"profile-{time.monotonic_ns()}"
    prof_dir.mkdir(parents=True, exist_ok=True)
    env = {**ENV, "BENCH_PROFILE_DIR": str(prof_dir)}
    s.worker(app="benchmarks.profiled_app", concurrency=CONCURRENCY, env=env)
    s.beat(env=env)
    producer = producer_for(s, ENV)
    for i in range(n):
        producer.submit_image(f"profiled {i}", num_images=1)
    wait_terminal(ctx, s.redis, n, timeout=300)
    producer.close()
    s.stop_processes(graceful=True)  # the profiled children dump their stats on a warm shutdown
    return summarize_profile(sorted(glob.glob(str(prof_dir / "child-*.prof"))), n)


class CommandCounter:
    """Counts every command Redis runs while active (MONITOR), by name and by origin."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.sent: Counter[str] = Counter()
        self.in_lua: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = threading.Event()
        self._ready = threading.Event()

    def _run(self) -> None:
        try:
            with self.client.monitor() as monitor:
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        cmd = monitor.next_command()
                    except (redis.ConnectionError, redis.TimeoutError, ValueError, IndexError):
                        break
                    name = str(cmd.get("command", "")).split(" ", 1)[0].upper()
                    if name in ("MONITOR", "PING"):
                        continue
                    (self.in_lua if cmd.get("client_type") == "lua" else self.sent)[name] += 1
        except Exception:
            self._ready.set()

    def __enter__(self) -> CommandCounter:
        self._thread.start()
        self._ready.wait(5)
        time.sleep(0.1)
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self.client.connection_pool.disconnect()
        self._thread.join(timeout=5)

    def summary(self, jobs: int) -> dict[str, Any]:
        sent = sum(self.sent.values())
        inner = sum(self.in_lua.values())
        return {
            "round_trips_per_job": sent / jobs,
            "all_per_job": (sent + inner) / jobs,
            "sent_by_command_per_job": {k: v / jobs for k, v in self.sent.most_common(15)},
            "in_lua_by_command_per_job": {k: v / jobs for k, v in self.in_lua.most_common(10)},
            "note": "sent includes the workers' idle BRPOP/heartbeat traffic and MULTI/EXEC of pipelines",
        }


# Where an idle pool child waits for its next task: not a job's cost.
IDLE = ("select.poll", "select.select", "select.epoll", "posix.read", "_io.BufferedReader", "recv_into")


def summarize_profile(paths: list[str], jobs: int) -> dict[str, Any]:
    """Milliseconds per job in the functions of BREAKDOWN, and the top functions by own time."""
    if not paths:
        return {"error": "no profile dumped"}
    stats = pstats.Stats(paths[0])
    for p in paths[1:]:
        stats.add(p)
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    breakdown: dict[str, float | None] = {}
    for suffix, func, label in BREAKDOWN:
        total = 0.0
        found = False
        for (filename, _line, name), (_cc, _nc, _tt, ct, _callers) in table.items():
            if (suffix == "os" and name == f"<built-in method posix.{func}>") or (
                filename.endswith(suffix) and (not func or name == func)
            ):
                # Recursion or re-entry would double count; cumulative time of a function already
                # includes its nested calls, so keep the largest entry, or the sum for distinct lines.
                total += ct
                found = True
        breakdown[label] = total * 1000 / jobs if found else None
    task_total = breakdown.get("all task runs (Celery trace, incl. everything below)")
    busy = [kv for kv in table.items() if not any(idle in kv[0][2] for idle in IDLE)]
    own = sorted(busy, key=lambda kv: kv[1][2], reverse=True)[:15]
    top = [
        {"function": f"{'/'.join(fn.rsplit('/', 2)[-2:])}:{line}:{name}", "own_ms_per_job": tt * 1000 / jobs}
        for (fn, line, name), (_cc, _nc, tt, _ct, _callers) in own
    ]
    return {
        "children": len(paths),
        "ms_per_job": task_total,
        "breakdown_ms_per_job": breakdown,
        "top_own_time": top,
        "note": "cProfile slows Python code down, so use these as proportions; the timed runs are unprofiled",
    }
