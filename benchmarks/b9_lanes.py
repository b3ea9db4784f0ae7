"""9. Priority lanes: an interactive job behind a batch backlog.

A producer ``backfill`` (lane ``batch``) queues a backlog of image jobs; a producer ``web`` (lane
``interactive``) submits one job at a time. Both share one trigger rate (``GENQ_LIMITS_TRIGGER_RATE``),
the default pools (a worker per stage, as in docker-compose and the README) and beat. Measured:

- an interactive job's time from submit to its POST (``submitted_at - created_at``, the ledger's clock)
  on the idle system (the baseline), then with the backlog queued, one job a second both times: the
  ratio of medians (goal <= 2x);
- batch throughput (POSTs per second at the simulator) while interactive jobs come every second,
  against the mean of the windows just before and after without them (goal: loses <= 10 %).
"""

from __future__ import annotations

import json
import time

from benchmarks.context import Context, settings_for
from benchmarks.harness import DEFAULT_POOLS, stack
from benchmarks.result import BenchResult, ChartItem, Row
from benchmarks.stats import Goal, ratio, summary
from genq.celeryconf import QUEUES
from genq.producer import Producer
from genq.simulator import Duration, SimConfig

NAME = "lanes"
RATE = 20.0
POLL = '{"first_delay": 0.5, "interval": 0.5, "backoff": 1, "max_interval": 0.5, "deadline": 600}'
POSTS = "POST /images/generation"


def run(ctx: Context) -> BenchResult:
    backlog = ctx.size(300, 20_000)
    probes = ctx.size(3, 30)
    window = ctx.size(3.0, 30.0)
    # The batch rate without interactive jobs is a rate (POSTs per second), not a distribution: quick
    # measures it over shorter windows before and after than the interactive window.
    quiet = ctx.size(2.0, window)
    result = BenchResult(NAME, "Priority lanes: interactive submit->POST behind a batch backlog")
    env = {
        "GENQ_LIMITS_TRIGGER_RATE": str(RATE),
        "GENQ_POLL_IMAGE": POLL,
        "GENQ_POLL_ADAPTIVE": "false",
        "GENQ_BUDGETS_PRODUCERS": json.dumps({"backfill": {"lane": "batch"}}),
    }
    result.size = {
        "backlog": backlog,
        "probes": probes,
        "window_s": window,
        "windows_before_after_s": quiet,
        "trigger_rate": RATE,
        "pools": DEFAULT_POOLS,
    }
    sim = SimConfig(
        api_key="bench-key", images_per_job=1, image_size=16, duration=Duration(kind="fixed", value=0.5)
    )
    with stack(sim, ctx.workdir / NAME, NAME) as s:
        s.workers([{**spec, "env": env} for spec in DEFAULT_POOLS], beat_env=env)
        web = Producer(settings_for(s, env), producer_id="web")
        backfill = Producer(settings_for(s, env), producer_id="backfill")
        ctx.log(f"{NAME}: {probes} interactive jobs on the idle system, one a second")
        idle = _probes(web, count=probes)
        ctx.log(f"{NAME}: queueing {backlog} batch jobs")
        t0 = time.monotonic()
        for i in range(backlog):
            backfill.submit_image(f"backfill {i}", num_images=1)
        ctx.log(f"{NAME}: queued in {time.monotonic() - t0:.1f}s; measuring")
        backlog_left = {"before_window": _waiting(s)}
        before = _batch_rate(s, quiet)
        backlog_left["during_window"] = _waiting(s)
        posts_during, started = _posts(s), time.monotonic()
        loaded = _probes(web, seconds=window)
        seconds = time.monotonic() - started
        during = (_posts(s) - posts_during - len(loaded)) / seconds
        interactive_rate = len(loaded) / seconds
        after = _batch_rate(s, quiet)
        web.close()
        backfill.close()

    idle_s, loaded_s = summary(idle), summary(loaded)
    latency_ratio = ratio(loaded_s["p50"], idle_s["p50"])
    without = (before + after) / 2
    all_rate = during + interactive_rate
    loss = (1 - during / without) if without else None
    result.figures = {
        "interactive_submit_to_post_loaded": loaded_s,
        "batch_posts_per_s_with_interactive": during,
        # What the interactive jobs' own POSTs take is part of the loss; the rest is the slot kept free
        # for the next one (see docs/benchmarks.md, "Lanes and fair shares").
        "interactive_posts_per_s": interactive_rate,
        "batch_posts_per_s_before": before,
        "batch_posts_per_s_after": after,
        "messages_waiting_in_the_broker": backlog_left,
    }
    result.baseline = {"interactive_submit_to_post_idle": idle_s}
    result.ratios = {"latency_p50_loaded_over_idle": latency_ratio, "batch_throughput_loss": loss}
    met_latency = result.check(
        Goal("interactive submit->POST p50 within 2x of idle", "latency_p50_loaded_over_idle", "<=", 2.0),
        latency_ratio,
    )
    met_loss = result.check(Goal("batch throughput loses <= 10%", "batch_throughput_loss", "<=", 0.10), loss)
    p95_ratio = ratio(loaded_s["p95"], idle_s["p95"])
    result.rows = [
        Row("submit->POST p50", loaded_s["p50"], idle_s["p50"], latency_ratio, "s", "<= 2x", met_latency),
        Row("submit->POST p95", loaded_s["p95"], idle_s["p95"], p95_ratio, "s"),
        Row("batch POSTs/s", during, without, ratio(during, without), "1/s", "<= 10% less", met_loss),
        Row("batch + interactive POSTs/s", all_rate, without, ratio(all_rate, without), "1/s"),
    ]  # fmt: skip
    result.chart = [
        ChartItem("latency", "9 lanes: interactive submit->POST p50", loaded_s["p50"], idle_s["p50"], "s")
    ]
    result.notes.append(
        f"backlog of {backlog} batch jobs behind a {RATE:g}/s trigger rate; baseline = the same "
        "interactive job on the idle system; batch rate with interactive jobs vs the mean of the windows "
        "before and after"
    )
    return result


def _posts(s) -> int:  # type: ignore[no-untyped-def]
    return int(s.sim.stats(include_jobs=False)["requests"].get(POSTS, 0))


def _waiting(s) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Messages waiting in each stage's broker lists (kombu keeps a list per priority step)."""
    return {
        queue: sum(int(s.redis.llen(queue if p == 0 else f"{queue}\x06\x16{p}")) for p in (0, 3, 6, 9))
        for queue in QUEUES
    }


def _batch_rate(s, seconds: float) -> float:  # type: ignore[no-untyped-def]
    start, t0 = _posts(s), time.monotonic()
    time.sleep(seconds)
    return (_posts(s) - start) / (time.monotonic() - t0)


def _probes(producer: Producer, count: int = 0, seconds: float = 0.0) -> list[float]:
    """Interactive jobs one a second, ``count`` of them or for ``seconds``: the idle baseline and the
    loaded figure at the same pace (back to back, a probe finds the pool warm from the one before,
    and the idle figure came out faster than an interactive job arriving on its own would see)."""
    out: list[float] = []
    started = time.monotonic()
    while len(out) < count or time.monotonic() - started < seconds:
        out.append(_probe(producer))
        time.sleep(max(0.0, 1.0 - out[-1]))
    return out


def _probe(producer: Producer) -> float:
    """Submit one interactive job and return seconds from its record to its POST's answer."""
    handle = producer.submit_image("someone is waiting", num_images=1)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rec = producer.status(handle.id)
        if rec.submitted_at is not None:
            return rec.submitted_at - rec.created_at
        if rec.terminal:
            break
        time.sleep(0.01)
    raise RuntimeError(f"interactive job {handle.id} not posted: {producer.status(handle.id).state}")
