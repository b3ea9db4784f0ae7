"""Spend budgets and in-flight quotas with a real Redis, real worker processes and the simulator: POSTs
are counted where they land, at the simulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from genq import keys
from genq.budgets import window_start
from genq.dashboard.app import broker_health
from genq.embedded import free_port
from genq.producer import Producer
from genq.schemas import JobState
from tests.helpers import Stack, wait_all
from tests.integration.procs import Service, genq, sample, scrape, wait_http

pytestmark = pytest.mark.integration

POSTS = "POST /images/generation"


def _budgets(**producers: dict[str, object]) -> str:
    return json.dumps(producers)


def _clear_of_the_hour_edge(stack: Stack, margin: float = 120.0) -> None:
    """Hourly caps count in fixed windows; a test straddling :00 would see its budget renewed."""
    now = stack.ledger().clock()
    left = window_start(now, "h") + 3600 - now
    if left < margin:
        time.sleep(left + 1)


def _posts(stack: Stack) -> int:
    return int(stack.sim.stats(include_jobs=False)["requests"].get(POSTS, 0))


def _spent(stack: Stack, scope: str) -> dict[str, float]:
    ledger = stack.ledger()
    raw = ledger.redis.hgetall(keys.spend(scope, "h", window_start(ledger.clock(), "h")))
    return {k.decode(): float(v) for k, v in raw.items()}


def test_fifty_concurrent_submits_against_ten_left_make_exactly_ten_posts(stack: Stack) -> None:
    env = {"GENQ_BUDGETS_PRODUCERS": _budgets(app={"triggers_per_hour": 12})}
    _clear_of_the_hour_edge(stack)
    stack.worker(concurrency=4, **env)
    stack.worker(concurrency=4, **env)
    producer = Producer(stack.settings(**env), producer_id="app")
    stack.producers.append(producer)
    first = [producer.submit_image(f"warm-up {i}", num_images=1).id for i in range(2)]
    assert all(r.state is JobState.SUCCEEDED for r in wait_all(producer, first, timeout=60))
    assert producer.budget().remaining()["triggers"] == 10

    with ThreadPoolExecutor(max_workers=25) as pool:
        ids = list(pool.map(lambda i: producer.submit_image(f"race {i}", num_images=1).id, range(50)))
    records = wait_all(producer, ids, timeout=180)

    assert _posts(stack) == 12
    states = [r.state for r in records]
    assert states.count(JobState.SUCCEEDED) == 10, [(r.state, r.error) for r in records]
    rejected = [r for r in records if r.state is JobState.REJECTED]
    assert len(rejected) == 40
    assert all(r.error == "budget exceeded: producer app triggers_per_hour=12" for r in rejected)
    assert all(r.upstream_id is None for r in rejected)
    # No cost cap: the cost of POSTs still unanswered ("pc") is not kept (a cost cap's wait needs it).
    assert _spent(stack, "app") == {"t": 12, "pt": 0, "c": 12}
    # No total cap: the total's windows are not kept, and the report adds up the producers' windows.
    assert _spent(stack, "*") == {}
    assert next(w for w in producer.budget().total if w.period == "hour").triggers == 12
    assert producer.budget().remaining()["triggers"] == 0


def test_a_total_cap_holds_over_every_producer_and_cost_units_count(stack: Stack) -> None:
    env = {
        "GENQ_BUDGETS_TOTAL": '{"cost_per_hour": 7}',
        "GENQ_BUDGETS_COSTS": '{"image": 1}',
    }
    _clear_of_the_hour_edge(stack)
    stack.worker(concurrency=4, **env)
    a = Producer(stack.settings(**env), producer_id="a")
    b = Producer(stack.settings(**env), producer_id="b")
    stack.producers += [a, b]
    # 2 + 2 + 2 images fit in 7 units; any further 2-image job would make 8.
    ids = [a.submit_image("a0", num_images=2).id, b.submit_image("b0", num_images=2).id]
    assert all(r.state is JobState.SUCCEEDED for r in wait_all(a, ids, timeout=60))
    more = [a.submit_image(f"a{i}", num_images=2).id for i in range(1, 4)]
    more += [b.submit_image(f"b{i}", num_images=2).id for i in range(1, 4)]
    records = wait_all(a, more, timeout=90)

    assert [r.state for r in records].count(JobState.SUCCEEDED) == 1
    assert _posts(stack) == 3
    rejected = [r for r in records if r.state is JobState.REJECTED]
    assert len(rejected) == 5
    assert {r.error for r in rejected} == {"budget exceeded: total cost_per_hour=7"}
    assert _spent(stack, "*")["c"] == 6


def test_a_producer_that_asked_to_wait_stays_pending_until_the_window_ends(stack: Stack) -> None:
    env = {"GENQ_BUDGETS_PRODUCERS": _budgets(patient={"triggers_per_day": 1, "on_budget": "wait"})}
    stack.worker(concurrency=2, **env)
    stack.beat(**env)
    producer = Producer(stack.settings(**env), producer_id="patient")
    stack.producers.append(producer)
    first = producer.submit_image("paid for", num_images=1)
    assert first.wait(timeout=60).state is JobState.SUCCEEDED
    second = producer.submit_image("waits for tomorrow", num_images=1)

    deadline = time.monotonic() + 30
    while producer.status(second.id).budget_waits == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    record = producer.status(second.id)
    assert record.state is JobState.PENDING
    assert record.error is not None
    assert record.error.startswith("waiting for budget producer patient triggers_per_day=1")
    ledger = stack.ledger()
    due = ledger.redis.zscore(keys.DUE, second.id)
    assert due is not None and due >= window_start(ledger.clock(), "d") + 86400
    time.sleep(3)  # several sweeps: none sends it early
    assert producer.status(second.id).state is JobState.PENDING
    assert _posts(stack) == 1


def test_a_post_the_upstream_did_not_act_on_is_refunded(stack: Stack) -> None:
    # A cost cap that never binds: the refund gives back the unanswered cost it keeps too.
    env = {"GENQ_BUDGETS_PRODUCERS": _budgets(app={"triggers_per_hour": 2, "cost_per_hour": 100})}
    _clear_of_the_hour_edge(stack)
    stack.sim.configure(rate_429_rate=1.0, retry_after=0.2)
    stack.worker(concurrency=2, **env)
    producer = Producer(stack.settings(**env), producer_id="app")
    stack.producers.append(producer)
    refused = producer.submit_image("always 429", num_images=1)
    (record,) = wait_all(producer, [refused.id], timeout=60)
    assert record.state is JobState.FAILED
    assert _posts(stack) == 5  # each try was charged, and refunded on its 429
    assert _spent(stack, "app") == {"t": 0, "pt": 0, "c": 0, "pc": 0}

    stack.sim.configure(rate_429_rate=0.0)
    ids = [producer.submit_image(f"after {i}", num_images=1).id for i in range(3)]
    states = sorted(r.state.value for r in wait_all(producer, ids, timeout=60))
    assert states == ["rejected", "succeeded", "succeeded"]


def test_an_ambiguous_answer_stays_charged(stack: Stack) -> None:
    env = {"GENQ_BUDGETS_PRODUCERS": _budgets(app={"triggers_per_hour": 1})}
    _clear_of_the_hour_edge(stack)
    stack.sim.configure(gateway_error_rate=1.0)
    stack.worker(concurrency=2, **env)
    producer = Producer(stack.settings(**env), producer_id="app")
    stack.producers.append(producer)
    job = producer.submit_image("a 502: the upstream may have started it", num_images=1)
    (record,) = wait_all(producer, [job.id], timeout=60)
    assert record.state is JobState.SUBMIT_UNKNOWN
    assert _spent(stack, "app")["t"] == 1

    stack.sim.configure(gateway_error_rate=0.0)
    (later,) = wait_all(producer, [producer.submit_image("no budget left").id], timeout=60)
    assert later.state is JobState.REJECTED
    assert _posts(stack) == 1


def test_a_producer_never_has_more_jobs_in_flight_than_its_quota(stack: Stack) -> None:
    env = {"GENQ_BUDGETS_PRODUCERS": _budgets(narrow={"max_in_flight": 2})}
    stack.worker(concurrency=4, **env)
    stack.beat(**env)
    narrow = Producer(stack.settings(**env), producer_id="narrow")
    wide = Producer(stack.settings(**env), producer_id="wide")
    stack.producers += [narrow, wide]
    ids = [narrow.submit_image(f"narrow {i} [sim:duration=2]", num_images=1).id for i in range(6)]
    others = [wide.submit_image(f"wide {i} [sim:duration=2]", num_images=1).id for i in range(4)]

    records = wait_all(narrow, ids + others, timeout=120)

    assert all(r.state is JobState.SUCCEEDED for r in records), [(r.state, r.error) for r in records]
    mine = [r for r in records if r.producer == "narrow"]
    # In flight in the ledger from the claim on the POST to the end; submitted_at..finished_at lies
    # within that, so no instant may see three of them.
    for job in mine:
        assert job.submitted_at is not None and job.finished_at is not None
        overlapping = [
            o
            for o in mine
            if o.submitted_at <= job.submitted_at < o.finished_at  # type: ignore[operator]
        ]
        assert len(overlapping) <= 2, [(o.submitted_at, o.finished_at) for o in mine]
    assert sum(r.budget_waits for r in mine) > 0  # the quota did hold some back
    assert all(r.budget_waits == 0 for r in records if r.producer == "wide")  # a quota is per producer
    assert stack.ledger().redis.scard(keys.inflight("narrow")) == 0


def test_genq_budgets_shows_spend_against_each_cap(stack: Stack) -> None:
    env = {
        "GENQ_BUDGETS_PRODUCERS": _budgets(shop={"triggers_per_day": 5, "max_in_flight": 3}),
        "GENQ_BUDGETS_TOTAL": '{"cost_per_hour": 100}',
    }
    _clear_of_the_hour_edge(stack)
    stack.worker(concurrency=2, **env)
    genq = str(Path(sys.executable).with_name("genq"))
    cli_env = {**{k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}, **stack.env, **env}
    submitted = subprocess.run(
        [genq, "submit", "image", "--prompt", "a kite", "--num-images", "3", "--producer", "shop",
         "--lane", "batch", "--wait", "--json"],
        env=cli_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    record = json.loads(submitted.stdout)
    assert (record["state"], record["producer"], record["lane"]) == ("succeeded", "shop", "batch")

    shown = subprocess.run(
        [genq, "budgets", "--json"], env=cli_env, capture_output=True, text=True, timeout=30
    )
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    total_hour = next(w for w in report["total"] if w["period"] == "hour")
    assert (total_hour["cost"], total_hour["cost_cap"], total_hour["cost_left"]) == (3, 100, 97)
    shop = next(p for p in report["producers"] if p["producer"] == "shop")
    assert (shop["in_flight"], shop["max_in_flight"]) == (0, 3)
    day = next(w for w in shop["windows"] if w["period"] == "day")
    assert (day["triggers"], day["triggers_cap"], day["triggers_left"]) == (1, 5, 4)
    table = subprocess.run([genq, "budgets"], env=cli_env, capture_output=True, text=True, timeout=30)
    assert table.returncode == 0 and "1 / 5" in table.stdout and "3 / 100" in table.stdout


def test_the_exporter_exports_spend_caps_quotas_and_rejections(stack: Stack) -> None:
    env = {"GENQ_BUDGETS_PRODUCERS": _budgets(shop={"triggers_per_day": 2, "max_in_flight": 3})}
    stack.worker(concurrency=2, **env)
    producer = Producer(stack.settings(**env), producer_id="shop")
    stack.producers.append(producer)
    ids = [producer.submit_image(f"shop {i}", num_images=1).id for i in range(3)]
    states = sorted(r.state.value for r in wait_all(producer, ids, timeout=60))
    assert states == ["rejected", "succeeded", "succeeded"]

    port = free_port()
    service = Service(
        genq("metrics", "--port", str(port)), {**os.environ, **stack.env, **env}, stack.tmp / "metrics.log"
    )
    service.start()
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        wait_http(url, service=service)
        samples = scrape(requests.get(url, timeout=30).text)
    finally:
        service.stop()
    assert sample(samples, "genq_budget_triggers", scope="shop", period="day") == 2
    assert sample(samples, "genq_budget_triggers_cap", scope="shop", period="day") == 2
    assert sample(samples, "genq_budget_triggers", scope="total", period="day") == 2
    assert sample(samples, "genq_producer_max_in_flight", producer="shop") == 3
    assert sample(samples, "genq_producer_in_flight", producer="shop") == 0
    assert sample(samples, "genq_jobs", kind="image", state="rejected") == 1

    # The dashboard's health page shows the same budget windows.
    shown = broker_health(stack.settings(**env))()["budgets"]
    shop = next(p for p in shown["producers"] if p["producer"] == "shop")
    day = next(w for w in shop["windows"] if w["period"] == "day")
    assert (day["triggers"], day["triggers_cap"], shop["max_in_flight"]) == (2, 2, 3)
