"""10. Fair shares between producers under one rate limit.

Producer ``flood`` is a runaway loop submitting at three times the trigger rate; once it has built a
backlog, producer ``shop`` (same weight) submits a batch of its own. Both share one trigger rate.
Measured: shop's share of all POSTs from its first POST to its last (the time both have work waiting),
with fair shares on (goal: it keeps its 50 % share within 10 %, i.e. >= 0.45) and, as the baseline, off
(``GENQ_BUDGETS_FAIR_SHARES=false``: first come, first served); and how long shop waited for its first
POST. First come, first served, shop's batch goes as one block (a share near 1 within its own span)
but only after the flood's whole backlog: the wait is what fair shares save.
"""

from __future__ import annotations

import threading
import time

from benchmarks.context import Context, records, settings_for
from benchmarks.harness import stack
from benchmarks.result import BenchResult, ChartItem, Row
from benchmarks.stats import Goal, ratio
from genq.producer import Producer
from genq.simulator import Duration, SimConfig

NAME = "fairness"
RATE = 4.0
SLOTS = 4
POLL = '{"first_delay": 0.5, "interval": 0.5, "backoff": 1, "max_interval": 0.5, "deadline": 900}'


def run(ctx: Context) -> BenchResult:
    flood_jobs = ctx.size(1_500, 10_000)  # at most; it floods until shop's jobs are done
    shop_jobs = ctx.size(60, 300)
    lead = ctx.size(8.0, 20.0)  # seconds of flood before shop comes: its backlog is 2x that x the rate
    result = BenchResult(NAME, "Fair shares: one producer flooding, another's share of the rate")
    result.size = {
        "flood_jobs": flood_jobs,
        "shop_jobs": shop_jobs,
        "flood_lead_s": lead,
        "trigger_rate": RATE,
        "weights": "1:1",
    }
    sim = SimConfig(
        api_key="bench-key", images_per_job=1, image_size=16, duration=Duration(kind="fixed", value=0.5)
    )
    runs = {}
    with stack(sim, ctx.workdir / NAME, NAME) as s:
        for fair in (True, False):
            env = {
                "GENQ_LIMITS_TRIGGER_RATE": str(RATE),
                "GENQ_POLL_IMAGE": POLL,
                "GENQ_POLL_ADAPTIVE": "false",
                "GENQ_BUDGETS_FAIR_SHARES": "true" if fair else "false",
            }
            ctx.log(f"{NAME}: fair shares {'on' if fair else 'off'}: {flood_jobs} flood + {shop_jobs} shop")
            runs[fair] = _run(ctx, s, env, flood_jobs, shop_jobs, lead)
            s.reset()

    fair, fifo = runs[True], runs[False]
    # Shortfall from its share (more than its share is the flood's backlog giving way, not a loss).
    shortfall = max(0.0, 0.5 - fair["shop_share"]) / 0.5 if fair["shop_share"] is not None else None
    result.figures = fair
    result.baseline = fifo
    share, base = fair["shop_share"], fifo["shop_share"]
    result.ratios = {"shop_share_shortfall": shortfall, "shop_share_vs_fifo": ratio(share, base)}
    goal = Goal("shop keeps its 50% share within 10%", "shop_share_shortfall", "<=", 0.10)
    met = result.check(goal, shortfall)
    rates = (fair["posts_per_s"], fifo["posts_per_s"])
    result.rows = [
        Row("shop's share of POSTs", share, base, ratio(share, base), "", ">= 0.45", met),
        Row("shop: first to last POST", fair["shop_span_s"], fifo["shop_span_s"], None, "s"),
        Row("shop: submit to first POST", fair["shop_first_wait_s"], fifo["shop_first_wait_s"], None, "s"),
        Row("all POSTs/s", rates[0], rates[1], ratio(*rates), "1/s"),
    ]
    result.chart = [ChartItem("throughput", "10 fairness: shop's share", share, base, "")]
    result.notes.append(
        "baseline: the same run with GENQ_BUDGETS_FAIR_SHARES=false (first come, first served)"
    )
    return result


def _run(ctx: Context, s, env: dict[str, str], flood_jobs: int, shop_jobs: int, lead: float) -> dict:  # type: ignore[no-untyped-def]
    s.worker(concurrency=SLOTS, env=env)
    s.beat(env=env)
    flood = Producer(settings_for(s, env), producer_id="flood")
    shop = Producer(settings_for(s, env), producer_id="shop")
    flood_ids: list[str] = []
    stop = threading.Event()

    def flooding() -> None:
        # A runaway loop: keeps submitting at three times the rate the upstream admits.
        for i in range(flood_jobs):
            if stop.is_set():
                return
            flood_ids.append(flood.submit_image(f"flood {i}", num_images=1).id)
            time.sleep(1 / (3 * RATE))

    thread = threading.Thread(target=flooding, daemon=True)
    thread.start()
    time.sleep(lead)  # the flood has built a backlog
    shop_ids = [shop.submit_image(f"shop {i}", num_images=1).id for i in range(shop_jobs)]
    deadline = time.monotonic() + shop_jobs / RATE * 4 + 120
    while time.monotonic() < deadline:
        if all(r.terminal for r in records(s.redis, shop_ids)):
            break
        time.sleep(0.5)
    stop.set()
    thread.join()
    recs = records(s.redis, flood_ids + shop_ids)
    flood.close()
    shop.close()
    posted = sorted((r.submitted_at, r.producer) for r in recs if r.submitted_at is not None)
    shop_times = [t for t, p in posted if p == "shop"]
    if not shop_times:
        return {"shop_share": None, "shop_span_s": None, "posts_per_s": None, "shop_first_wait_s": None}
    first, last = shop_times[0], shop_times[-1]
    within = [p for t, p in posted if first <= t <= last]
    return {
        "shop_share": within.count("shop") / len(within),
        "shop_span_s": last - first,
        "shop_first_wait_s": first - min(r.created_at for r in recs if r.producer == "shop"),
        "posts_per_s": len(within) / (last - first) if last > first else None,
        "shop_succeeded": sum(1 for r in recs if r.producer == "shop" and r.state.value == "succeeded"),
        "flood_submitted": len(flood_ids),
    }
