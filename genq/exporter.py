"""``genq metrics``: a Prometheus exporter for what Flower does not show.

Everything is read when Prometheus scrapes (nothing is kept here, so any number of exporters can run
and a restart loses nothing): the ledger's per-state counts and due indexes, model states, the sweeper's
last run, the broker's queues, and the counters workers add to (:mod:`genq.metrics`).

Queue age: Celery's messages carry no send time, so every message a genqueue process publishes is
stamped with one (the ``genq_sent_at`` header, :data:`genq.metrics.SENT_AT_HEADER`); the oldest waiting
message is the tail of the queue's Redis list. AMQP does not expose message ages, so with RabbitMQ only
depths are exported (RabbitMQ's own Prometheus plugin has the rest).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from types import FrameType
from typing import Any, NamedTuple, Protocol

import redis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from genq import keys, metrics
from genq.budgets import BudgetBook
from genq.celeryconf import QUEUES
from genq.ledger import Ledger
from genq.limits import admission_queued
from genq.schemas import JobState
from genq.services import broker_redis_client, redis_client
from genq.settings import BudgetSettings, Settings

log = logging.getLogger(__name__)

MODELS_CAP = 10_000
"""Most models whose state is read per scrape (newest first)."""


class QueueStats(NamedTuple):
    messages: int
    oldest_age: float | None  # seconds the oldest stamped message has waited; None: unknown


class QueueProbe(Protocol):
    def stats(self) -> dict[str, QueueStats]: ...

    def unacked(self) -> int | None: ...


def message_age(raw: bytes | str, now: float) -> float | None:
    """Seconds a broker message has been waiting, from its ``genq_sent_at`` stamp; a countdown message
    waits only from its ETA. None when it carries no stamp (sent by another client)."""
    try:
        headers = json.loads(raw).get("headers") or {}
        since = float(headers[metrics.SENT_AT_HEADER])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    eta = headers.get("eta")
    if isinstance(eta, str):
        with contextlib.suppress(ValueError):
            since = max(since, datetime.fromisoformat(eta).timestamp())
    return max(0.0, now - since)


class RedisQueues:
    """Depth and oldest age of each queue on a Redis broker: kombu keeps a queue as a list (pushed at the
    head, popped at the tail), and messages of priority 3, 6 or 9 in lists of their own."""

    PRIORITY_LISTS = ("", "\x06\x163", "\x06\x166", "\x06\x169")
    SAMPLE = 5  # oldest messages read per list, in case the very oldest carries no stamp

    def __init__(self, client: redis.Redis, queues: Sequence[str], clock: Callable[[], float]) -> None:
        self.redis = client
        self.queues = queues
        self.clock = clock

    def stats(self) -> dict[str, QueueStats]:
        pipe = self.redis.pipeline(transaction=False)
        for queue in self.queues:
            for suffix in self.PRIORITY_LISTS:
                pipe.llen(queue + suffix)
                pipe.lrange(queue + suffix, -self.SAMPLE, -1)
        answers = iter(pipe.execute())
        now = self.clock()
        out = {}
        for queue in self.queues:
            depth, ages = 0, []
            for _ in self.PRIORITY_LISTS:
                depth += int(next(answers))
                ages += [a for a in (message_age(m, now) for m in next(answers)) if a is not None]
            out[queue] = QueueStats(depth, max(ages) if ages else (0.0 if depth == 0 else None))
        return out

    def unacked(self) -> int | None:
        # Delivered, not yet acknowledged: running, or countdowns held by a worker until due.
        return int(self.redis.hlen("unacked"))


class AmqpQueues:
    """Depths of the queues on a RabbitMQ broker (passive declares: nothing is created)."""

    def __init__(self, url: str, queues: Sequence[str]) -> None:
        self.url = url
        self.queues = queues

    def stats(self) -> dict[str, QueueStats]:
        from kombu import Connection  # type: ignore[attr-defined]

        out = {}
        with Connection(self.url, connect_timeout=5) as conn:  # type: ignore[no-untyped-call]
            for queue in self.queues:
                channel = conn.channel()
                try:
                    _, count, _ = channel.queue_declare(queue=queue, passive=True)
                except conn.channel_errors:
                    count = 0  # not declared yet: no worker has consumed from it
                finally:
                    channel.close()
                out[queue] = QueueStats(int(count), None)
        return out

    def unacked(self) -> int | None:
        return None


class Collector:
    """Builds every metric from Redis (and the broker) at each scrape."""

    def __init__(
        self,
        client: redis.Redis,
        queues: QueueProbe | None,
        clock: Callable[[], float] = time.time,
        budgets: BudgetSettings | None = None,
    ) -> None:
        self.redis = client
        self.ledger = Ledger(client)
        self.queues = queues
        self.clock = clock
        self.budgets = BudgetBook(client, budgets or BudgetSettings())

    def describe(self) -> list[Metric]:
        return []  # so that registering does not scrape

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        up = 1.0
        try:
            families = [*self._ledger(now), *self._counters(), *self._budgets()]
        except redis.RedisError as exc:
            log.warning("scrape: Redis unavailable (%s)", type(exc).__name__)
            families, up = [], 0.0
        yield from families
        yield GaugeMetricFamily("genq_redis_up", "1 if the ledger's Redis answered this scrape", value=up)
        if self.queues is not None:
            broker_up = 1.0
            try:
                queue_families = list(self._queues())
            except Exception as exc:  # kombu and redis-py raise unrelated error types; a scrape must answer
                log.warning("scrape: broker unavailable (%s)", type(exc).__name__)
                queue_families, broker_up = [], 0.0
            yield from queue_families
            yield GaugeMetricFamily("genq_broker_up", "1 if the broker answered this scrape", value=broker_up)

    def _ledger(self, now: float) -> Iterable[Metric]:
        jobs = GaugeMetricFamily(
            "genq_jobs",
            "Jobs by kind and state (terminal states count every job that ended there, even once its "
            "record expired)",
            labels=["kind", "state"],
        )
        in_flight: Counter[str] = Counter()
        for pair, count in sorted(self.ledger.counts().items()):
            kind, _, state = pair.partition(":")
            jobs.add_metric([kind, state], count)
            if state in JobState._value2member_map_ and not JobState(state).terminal:
                in_flight[kind] += count
        yield jobs
        flight = GaugeMetricFamily("genq_jobs_in_flight", "Jobs not yet in a terminal state", labels=["kind"])
        for kind, count in sorted(in_flight.items()):
            flight.add_metric([kind], count)
        yield flight

        due = GaugeMetricFamily(
            "genq_due",
            "Entries of the sweeper's due indexes: 'scheduled' wait for a step due later (a poll, a held "
            "wait); 'overdue' are past due, for the sweeper to dispatch or re-drive",
            labels=["index", "when"],
        )
        pipe = self.redis.pipeline(transaction=False)
        for key in (keys.DUE, keys.MODELS_DUE):
            pipe.zcount(key, f"({now}", "+inf")
            pipe.zcount(key, "-inf", now)
        scheduled_jobs, overdue_jobs, scheduled_models, overdue_models = pipe.execute()
        due.add_metric(["jobs", "scheduled"], scheduled_jobs)
        due.add_metric(["jobs", "overdue"], overdue_jobs)
        due.add_metric(["models", "scheduled"], scheduled_models)
        due.add_metric(["models", "overdue"], overdue_models)
        yield due

        models = GaugeMetricFamily("genq_models", "Trained models by state", labels=["state"])
        ids = self.redis.zrevrange(keys.MODELS, 0, MODELS_CAP - 1)
        # One field per model, pipelined: ModelLedger.get would also read each one's history.
        pipe = self.redis.pipeline(transaction=False)
        for model_id in ids:
            pipe.hget(keys.model(_text(model_id)), "state")
        for state, count in sorted(Counter(_text(s) for s in pipe.execute() if s).items()):
            models.add_metric([state], count)
        yield models

        swept = self.ledger.last_swept()
        yield GaugeMetricFamily(
            "genq_sweeper_last_run_timestamp_seconds",
            "When the sweeper last ran (Unix time; 0: never)",
            value=swept or 0.0,
        )

    def _counters(self) -> Iterable[Metric]:
        c = metrics.read(self.redis)
        latency = HistogramMetricFamily(
            "genq_upstream_request_duration_seconds",
            "Upstream API requests: seconds until the answer's headers (or the failure), by endpoint family",
            labels=["family"],
        )
        for family, hist in sorted(c.latency.items()):
            latency.add_metric([family], hist.buckets, sum_value=hist.sum)
        yield latency
        errors = CounterMetricFamily(
            "genq_upstream_errors",
            "Upstream API requests that failed, by family and class",
            labels=["family", "error"],
        )
        for (family, error), count in sorted(c.errors.items()):
            errors.add_metric([family, error], count)
        yield errors
        waits = CounterMetricFamily(
            "genq_ratelimit_waits", "Upstream calls held back by the shared rate limit", labels=["family"]
        )
        wait_seconds = CounterMetricFamily(
            "genq_ratelimit_wait_seconds", "Seconds those calls were deferred by", labels=["family"]
        )
        for family, (count, seconds) in sorted(c.throttled.items()):
            waits.add_metric([family], count)
            wait_seconds.add_metric([family], seconds)
        yield waits
        yield wait_seconds
        yield CounterMetricFamily(
            "genq_upstream_closures",
            "429s that closed the upstream for every worker",
            value=c.upstream_closed[0],
        )
        yield CounterMetricFamily("genq_downloads", "Output files downloaded and recorded", value=c.downloads)
        yield CounterMetricFamily("genq_download_bytes", "Bytes of those files", value=c.download_bytes)

    def _budgets(self) -> Iterable[Metric]:
        # Budget windows follow the ledger's clock (Redis's time), as the charges do.
        total, usage = self.budgets.report(self.ledger.clock())
        labels = ["scope", "period"]
        spent = {
            "triggers": GaugeMetricFamily(
                "genq_budget_triggers", "Paid triggers charged in the current budget window", labels=labels
            ),
            "cost": GaugeMetricFamily(
                "genq_budget_cost", "Cost units charged in the current budget window", labels=labels
            ),
        }
        caps = {
            "triggers": GaugeMetricFamily(
                "genq_budget_triggers_cap", "Cap on paid triggers per window (set caps only)", labels=labels
            ),
            "cost": GaugeMetricFamily(
                "genq_budget_cost_cap", "Cap on cost units per window (set caps only)", labels=labels
            ),
        }
        for line in [*total, *(w for u in usage for w in u.windows)]:
            spent["triggers"].add_metric([line.scope, line.period], line.triggers)
            spent["cost"].add_metric([line.scope, line.period], line.cost)
            if line.triggers_cap is not None:
                caps["triggers"].add_metric([line.scope, line.period], line.triggers_cap)
            if line.cost_cap is not None:
                caps["cost"].add_metric([line.scope, line.period], line.cost_cap)
        yield from spent.values()
        yield from caps.values()
        flight = GaugeMetricFamily(
            "genq_producer_in_flight", "A producer's jobs submitted and not ended", labels=["producer"]
        )
        quota = GaugeMetricFamily(
            "genq_producer_max_in_flight", "A producer's in-flight quota (if set)", labels=["producer"]
        )
        for u in usage:
            flight.add_metric([u.producer], u.in_flight)
            if u.max_in_flight is not None:
                quota.add_metric([u.producer], u.max_in_flight)
        yield flight
        yield quota
        waiting = GaugeMetricFamily(
            "genq_admission_queued",
            "Submits waiting in the rate limit's admission queue for a turn",
            labels=["lane", "producer"],
        )
        for (lane, producer), n in admission_queued(self.redis).items():
            waiting.add_metric([lane, producer], n)
        yield waiting

    def _queues(self) -> Iterable[Metric]:
        assert self.queues is not None
        stats = self.queues.stats()
        depth = GaugeMetricFamily(
            "genq_queue_messages", "Messages waiting in a broker queue", labels=["queue"]
        )
        age = GaugeMetricFamily(
            "genq_queue_oldest_message_age_seconds",
            "Seconds the oldest waiting message has waited (Redis broker; messages stamped by genqueue)",
            labels=["queue"],
        )
        for queue, s in stats.items():
            depth.add_metric([queue], s.messages)
            if s.oldest_age is not None:
                age.add_metric([queue], s.oldest_age)
        yield depth
        yield age
        unacked = self.queues.unacked()
        if unacked is not None:
            yield GaugeMetricFamily(
                "genq_broker_unacked_messages",
                "Messages delivered to workers and not yet acknowledged (running, or countdowns held)",
                value=unacked,
            )


def queue_probe(settings: Settings, clock: Callable[[], float] = time.time) -> QueueProbe | None:
    broker = settings.redis.broker
    client = broker_redis_client(settings)
    if client is not None:
        return RedisQueues(client, QUEUES, clock)
    if broker.startswith(("amqp://", "amqps://", "pyamqp://")):
        return AmqpQueues(broker, QUEUES)
    log.warning("no queue metrics for this broker's transport")
    return None


def registry(settings: Settings) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(redis_client(settings), queue_probe(settings), budgets=settings.budgets))
    return reg


def serve(settings: Settings, address: str, port: int) -> None:
    """Serve ``/metrics`` until SIGTERM or SIGINT."""
    server, thread = start_http_server(port, addr=address, registry=registry(settings))
    log.info("metrics on http://%s:%d/metrics", address, server.server_port)
    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stop.wait()
    server.shutdown()
    thread.join(timeout=5)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
