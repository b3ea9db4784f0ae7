"""10. Fair shares between producers under one rate limit.

Producer ``flood`` is a runaway loop submitting at three times the trigger rate; once it has built a
backlog, producer ``shop`` (same weight) submits a batch of its own. Both share one trigger rate. Measured:
shop's share of all POSTs from its first POST to its last (the time both have work waiting), with fair
shares on (goal: it keeps its 50 % share within 10 %, i.e. >= 0.45) and, as the baseline, off
(``GENQ_BUDGETS_FAIR_SHARES=false``: first come, first served), both at once on separate stacks.
Quick mode stops measuring 6 s after shop submits: both still have work waiting, which is the
time the share is about. Also reported: how long shop waited for its first POST. First come, first
served, shop's batch goes as one block (a share near 1 within its own span) but only after the flood's
whole backlog: that wait is what fair shares save.
"""

from __future__ import annotations

import threading
import time

from benchmarks.context import Context, records, settings_for
from benchmarks.harness import Stack, in_parallel, stacks
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
    shop_jobs = ctx.size(10, 300)
    # Quick: measured for at most this long after shop submits. Without fair shares shop gets a few
    # percent of the rate and would take minutes to finish; its share while both wait is the figure,
    # and a window in which both still wait measures just that.
    window = ctx.size(6.0, None)
    lead = ctx.size(2.0, 20.0)  # seconds of flood first: its backlog grows by 2x the rate per second
    result = BenchResult(NAME, "Fair shares: one producer flooding, another's share of the rate")
    result.size = {
        "flood_jobs": flood_jobs,
        "shop_jobs": shop_jobs,
        "trigger_rate": RATE,
        "weights": "1:1",
        "window_s": window,
        "flood_lead_s": lead,
    }
    sim = SimConfig(
        api_key="bench-key", images_per_job=1, image_size=16, duration=Duration(kind="fixed", value=0.5)
    )
    runs: dict[bool, dict] = {}  # type: ignore[type-arg]
    ctx.log(
        f"{NAME}: fair shares on and off side by side: {flood_jobs} flood + {shop_jobs} shop"
        + (f", at most {window:g}s after shop submits" if window else "")
    )
    # Both sides at once, each on its own stack: the same machine load for both, and the wall time
    # of one run, not two.
    specs = [(sim, ctx.workdir / f"{NAME}-{'fair' if fair else 'fifo'}", NAME) for fair in (True, False)]
    with stacks(*specs) as (sf, sb):

        def side(fair: bool, s: Stack) -> None:
            env = {
                "GENQ_LIMITS_TRIGGER_RATE": str(RATE),
                "GENQ_POLL_IMAGE": POLL,
                "GENQ_POLL_ADAPTIVE": "false",
                "GENQ_BUDGETS_FAIR_SHARES": "true" if fair else "false",
            }
            runs[fair] = _run(s, env, flood_jobs, shop_jobs, lead, window)

        in_parallel(lambda: side(True, sf), lambda: side(False, sb))

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
        "baseline: the same run with GENQ_BUDGETS_FAIR_SHARES=false (first come, first served), on its "
        "own stack at the same time"
    )
    cut = [label for label, r in (("fair shares on", fair), ("off", fifo)) if not r.get("shop_finished")]
    if window and cut:
        result.notes.append(
            f"quick: measured for {window:g} s after shop submitted; shop still had jobs waiting "
            f"({', '.join(cut)}), so the share is over "
            "the POSTs until then and the span is shorter than shop's whole batch"
        )
    return result


def _run(
    s: Stack, env: dict[str, str], flood_jobs: int, shop_jobs: int, lead: float, window: float | None
) -> dict:  # type: ignore[type-arg]
    s.workers([{"concurrency": SLOTS, "env": env}], beat_env=env)
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
    deadline = time.monotonic() + (window or shop_jobs / RATE * 4 + 120)
    finished = False
    while time.monotonic() < deadline:
        if all(r.terminal for r in records(s.redis, shop_ids)):
            finished = True
            break
        time.sleep(0.25)
    stop.set()
    thread.join()
    recs = records(s.redis, flood_ids + shop_ids)
    flood.close()
    shop.close()
    posted = sorted((r.submitted_at, r.producer) for r in recs if r.submitted_at is not None)
    shop_times = [t for t, p in posted if p == "shop"]
    if not shop_times:
        return {
            "shop_share": None,
            "shop_span_s": None,
            "posts_per_s": None,
            "shop_first_wait_s": None,
            "shop_finished": finished,
        }
    first, last = shop_times[0], shop_times[-1]
    within = [p for t, p in posted if first <= t <= last]
    return {
        "shop_share": within.count("shop") / len(within),
        "shop_span_s": last - first,
        "shop_first_wait_s": first - min(r.created_at for r in recs if r.producer == "shop"),
        "posts_per_s": len(within) / (last - first) if last > first else None,
        "shop_succeeded": sum(1 for r in recs if r.producer == "shop" and r.state.value == "succeeded"),
        "flood_submitted": len(flood_ids),
        "shop_posted": len(shop_times),
        "shop_finished": finished,
    }
