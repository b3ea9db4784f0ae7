"""``genq health``: is this deployment working? Each check passes or says why not.

- ``redis``: the ledger's Redis answers PING.
- ``broker``: a broker connection opens.
- ``workers``: at least one live worker consumes each queue (``celery inspect active_queues``), or a
  given worker node answers and consumes the queues asked for.
- ``sweeper``: the sweeper ran recently (``Ledger.last_swept``: beat sends it, a ``poll`` worker runs it).
- ``url``: an HTTP endpoint answers 2xx (Flower's ``/healthcheck``, the exporter's ``/metrics``).

The caller passes a Celery app configured like a producer's (no tasks imported), so this module imports
neither Celery nor any worker code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import redis
import requests

from genq.celeryconf import QUEUES
from genq.clock import RedisClock
from genq.services import ledger_for, redis_client
from genq.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

CHECKS = ("redis", "broker", "workers", "sweeper")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_redis(client: redis.Redis) -> Check:
    try:
        client.ping()
    except redis.RedisError as exc:
        return Check("redis", False, f"the ledger's Redis did not answer: {type(exc).__name__}: {exc}")
    return Check("redis", True, "the ledger's Redis answered PING")


def check_broker(app: Celery, timeout: float) -> Check:
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
            uri = conn.as_uri()  # password masked
    except Exception as exc:  # kombu raises transport-specific errors
        return Check("broker", False, f"no broker connection: {type(exc).__name__}: {exc}")
    return Check("broker", True, f"connected to {uri}")


def check_workers(app: Celery, queues: Sequence[str], node: str | None, timeout: float) -> Check:
    try:
        inspect = app.control.inspect(timeout=timeout, destination=[node] if node else None)
        replies: dict[str, list[dict[str, Any]]] = inspect.active_queues() or {}
    except Exception as exc:
        return Check("workers", False, f"could not ask the workers: {type(exc).__name__}: {exc}")
    if node and node not in replies:
        return Check("workers", False, f"worker {node} did not answer within {timeout:g}s")
    consumers = {
        q: sorted(n for n, qs in replies.items() if any(x.get("name") == q for x in qs)) for q in queues
    }
    missing = [q for q, nodes in consumers.items() if not nodes]
    if missing:
        seen = ", ".join(sorted(replies)) or "none"
        return Check(
            "workers", False, f"no live worker consumes {', '.join(missing)} (workers that answered: {seen})"
        )
    summary = ", ".join(f"{q}: {len(n)}" for q, n in consumers.items())
    who = f"{node} answered" if node else f"{len(replies)} worker(s) answered"
    return Check("workers", True, who + (f"; consumers per queue: {summary}" if summary else ""))


def check_sweeper(client: redis.Redis, settings: Settings, max_age: float, now: float) -> Check:
    try:
        last = ledger_for(client, settings).last_swept()
    except redis.RedisError as exc:
        return Check("sweeper", False, f"could not read the sweeper's last run: {type(exc).__name__}")
    if last is None:
        return Check(
            "sweeper", False, "the sweeper never ran: is beat running, and a worker on the poll queue?"
        )
    age = now - last
    if age > max_age:
        return Check(
            "sweeper",
            False,
            f"the sweeper last ran {age:.0f}s ago (limit {max_age:g}s): is beat running, and a worker on "
            "the poll queue?",
        )
    return Check("sweeper", True, f"the sweeper ran {age:.1f}s ago")


def check_url(url: str, timeout: float) -> Check:
    try:
        response = requests.get(url, timeout=timeout)
    except requests.RequestException as exc:
        return Check("url", False, f"{url}: {type(exc).__name__}")
    if not 200 <= response.status_code < 300:
        return Check("url", False, f"{url}: HTTP {response.status_code}")
    return Check("url", True, f"{url}: HTTP {response.status_code}")


def default_sweep_max_age(settings: Settings) -> float:
    """How stale the sweeper's last run may be: a few of its intervals, and never under a minute."""
    return max(60.0, 5 * settings.worker.sweep_interval)


def run(
    settings: Settings,
    app: Celery,
    *,
    skip: Sequence[str] = (),
    queues: Sequence[str] | None = None,
    node: str | None = None,
    urls: Sequence[str] = (),
    timeout: float = 3.0,
    sweep_max_age: float | None = None,
    clock: Callable[[], float] | None = None,
) -> list[Check]:
    """Every check not skipped. ``queues`` defaults to all of them, or to none when ``node`` is given
    (then the node need only answer)."""
    checks: list[Check] = []
    client = redis_client(settings)
    try:
        if "redis" not in skip:
            checks.append(check_redis(client))
        if "broker" not in skip:
            checks.append(check_broker(app, timeout))
        if "workers" not in skip:
            wanted = list(queues) if queues is not None else ([] if node else list(QUEUES))
            checks.append(check_workers(app, wanted, node, timeout))
        if "sweeper" not in skip:
            max_age = sweep_max_age if sweep_max_age is not None else default_sweep_max_age(settings)
            now = (clock or RedisClock(client))()  # the sweeper stamps its runs with Redis's time
            checks.append(check_sweeper(client, settings, max_age, now))
        checks += [check_url(url, timeout) for url in urls]
    finally:
        client.close()
    return checks
