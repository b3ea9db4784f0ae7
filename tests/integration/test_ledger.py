"""The Redis ledger: compare-and-set transitions, events, due index, counts, idempotency."""

from __future__ import annotations

import pytest
import redis

from genq import keys
from genq.embedded import EmbeddedRedis
from genq.ledger import Ledger
from genq.schemas import JobKind, JobState, OutputFile

pytestmark = pytest.mark.integration


@pytest.fixture
def ledger(redis_server: EmbeddedRedis) -> Ledger:
    return Ledger(redis.Redis.from_url(redis_server.url), job_ttl=3600, grace=10, clock=lambda: 100.0)


def _create(ledger: Ledger, job_id: str = "j1", key: str | None = None) -> tuple[str, bool]:
    created = ledger.create(job_id, JobKind.IMAGE, {"prompt": "p"}, expected_outputs=2, idempotency_key=key)
    return created.id, created.created


def test_create_writes_a_pending_record_an_event_and_a_due_entry(ledger: Ledger) -> None:
    assert _create(ledger) == ("j1", True)
    record = ledger.get("j1")
    assert record is not None
    assert record.state is JobState.PENDING and record.request == {"prompt": "p"}
    assert ledger.redis.zscore(keys.DUE, "j1") == 110.0  # created at 100, re-driven after the grace
    events = ledger.redis.xrange(keys.EVENTS)
    assert [e[1][b"to"] for e in events] == [b"pending"]
    assert ledger.counts() == {"image:pending": 1}


def test_idempotency_key_returns_the_first_job(ledger: Ledger) -> None:
    assert _create(ledger, "j1", key="order-7") == ("j1", True)
    assert _create(ledger, "j2", key="order-7") == ("j1", False)
    assert ledger.get("j2") is None


def test_transition_is_compare_and_set(ledger: Ledger) -> None:
    _create(ledger)
    first = ledger.transition("j1", [JobState.PENDING], JobState.SUBMITTING, submit_attempts=1)
    duplicate = ledger.transition("j1", [JobState.PENDING], JobState.SUBMITTING, submit_attempts=2)

    assert (first.ok, first.previous) == (True, JobState.PENDING)
    assert (duplicate.ok, duplicate.previous, duplicate.reason) == (False, JobState.SUBMITTING, "state")
    record = ledger.get("j1")
    assert record is not None and record.submit_attempts == 1
    assert ledger.counts() == {"image:pending": 0, "image:submitting": 1}
    assert [e[1][b"to"] for e in ledger.redis.xrange(keys.EVENTS)] == [b"pending", b"submitting"]


def test_stale_poll_generation_is_refused(ledger: Ledger) -> None:
    _create(ledger)
    ledger.transition("j1", [JobState.PENDING], JobState.SUBMITTED, poll_gen=1)
    assert ledger.transition("j1", [JobState.SUBMITTED], JobState.RUNNING, expect_gen=1, poll_gen=2).ok
    stale = ledger.transition("j1", [JobState.RUNNING], JobState.RUNNING, expect_gen=1, poll_gen=2)
    assert (stale.ok, stale.reason) == (False, "stale")


def test_missing_job(ledger: Ledger) -> None:
    result = ledger.transition("nope", [JobState.PENDING], JobState.FAILED)
    assert (result.ok, result.previous, result.reason) == (False, None, "missing")


def test_terminal_transition_drops_due_entry_and_sets_ttl(ledger: Ledger) -> None:
    _create(ledger)
    ledger.set_urls("j1", {0: "https://x/0.png?token=t"})
    ledger.transition("j1", [JobState.PENDING], JobState.FAILED, error="boom")
    record = ledger.get("j1")
    assert record is not None and record.state is JobState.FAILED and record.error == "boom"
    assert record.finished_at is not None
    assert ledger.redis.zscore(keys.DUE, "j1") is None
    assert 0 < ledger.redis.ttl(keys.job("j1")) <= 3600
    assert not ledger.redis.exists(keys.job_urls("j1"))  # URLs with tokens go with the ending


def test_record_output_counts_down_and_only_while_downloading(ledger: Ledger) -> None:
    _create(ledger)
    out = OutputFile(index=1, remote_id="r", path="/x/01.png", bytes=3, sha256="ab")
    assert ledger.record_output("j1", out) == -1
    ledger.transition("j1", [JobState.PENDING], JobState.DOWNLOADING)
    assert ledger.record_output("j1", out) == 1
    assert ledger.record_output("j1", out) == 1  # the same output again counts once
    assert ledger.record_output("j1", out.model_copy(update={"index": 0})) == 0
    record = ledger.get("j1")
    assert record is not None and [o.index for o in record.outputs] == [0, 1]


def test_a_charge_is_settled_once_and_a_window_gone_meanwhile_is_not_made_again(ledger: Ledger) -> None:
    from genq.budgets import Plan

    def charged(job: str, key: str) -> None:
        plan = Plan("app", 2.0, charge=[(key, 2.0, 60, 0), ("genq:test:capped", 2.0, 60, 1)])
        assert ledger.transition(job, [JobState.PENDING], JobState.SUBMITTING, budget=plan.to_json()).ok

    def window(key: str) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in ledger.redis.hgetall(key).items()}

    _create(ledger, "j1")
    _create(ledger, "j2")
    charged("j1", "genq:test:w")
    charged("j2", "genq:test:gone")
    assert window("genq:test:w") == {"t": 1, "pt": 1, "c": 2}  # no cost cap: no unanswered cost kept
    assert window("genq:test:capped") == {"t": 2, "pt": 2, "c": 4, "pc": 4}
    assert 0 < ledger.redis.ttl("genq:test:w") <= 60
    assert ledger.redis.smembers(keys.PRODUCERS) == {b"app"}

    ledger.redis.delete("genq:test:gone")  # its window expired while the POST was out
    assert ledger.transition("j1", [JobState.SUBMITTING], JobState.SUBMITTED).ok
    assert ledger.transition("j2", [JobState.SUBMITTING], JobState.PENDING, refund=True).ok
    assert window("genq:test:w") == {"t": 1, "pt": 0, "c": 2}
    assert window("genq:test:capped") == {"t": 1, "pt": 0, "c": 2, "pc": 0}  # j2's charge given back
    assert not ledger.redis.exists("genq:test:gone")  # not made again, without a TTL
    # A second step out of submitting (a duplicate) settles nothing again.
    assert ledger.transition("j2", [JobState.PENDING], JobState.SUBMITTING).ok
    assert ledger.transition("j2", [JobState.SUBMITTING], JobState.PENDING, refund=True).ok
    assert window("genq:test:capped") == {"t": 1, "pt": 0, "c": 2, "pc": 0}


def test_a_total_cap_set_in_mid_window_counts_the_spend_before_it(ledger: Ledger) -> None:
    from genq.budgets import BudgetBook
    from genq.settings import BudgetSettings

    def submit(job: str, producer: str, settings: BudgetSettings) -> str:
        if ledger.get(job) is None:
            ledger.create(job, JobKind.IMAGE, {"p": 1}, expected_outputs=1, routing={"producer": producer})
        record = ledger.get(job)
        assert record is not None
        plan = BudgetBook(ledger.redis, settings).plan(record, ledger.clock()).to_json()
        moved = ledger.transition(job, [JobState.PENDING], JobState.SUBMITTING, budget=plan)
        return "charged" if moved.ok else str(moved.reason)

    uncapped = BudgetSettings()
    assert [submit(f"a{i}", "a", uncapped) for i in range(2)] == ["charged"] * 2
    assert submit("b0", "b", uncapped) == "charged"
    total = keys.spend(keys.TOTAL_SCOPE, "h", 0)  # the ledger's clock says 100: the first window
    assert not ledger.redis.exists(total)  # no total cap: nothing charged to the total
    book = BudgetBook(ledger.redis, uncapped)
    assert next(w for w in book.windows(keys.TOTAL_SCOPE, 100.0) if w.period == "hour").triggers == 3

    capped = BudgetSettings(total={"triggers_per_hour": 4})
    assert submit("c0", "c", capped) == "charged"  # 3 before the cap + this one = 4
    assert submit("c1", "c", capped) == "unsettled"  # c0's POST is out: it may yet be refunded
    assert ledger.transition("c0", [JobState.SUBMITTING], JobState.SUBMITTED).ok
    assert submit("c1", "c", capped) == "budget"
    assert ledger.redis.hget(total, "t") == b"4"
    assert next(w for w in book.windows(keys.TOTAL_SCOPE, 100.0) if w.period == "hour").triggers == 4
