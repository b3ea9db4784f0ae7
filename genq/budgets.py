"""Spend budgets and in-flight quotas per producer app, and over all of them. Plain Python, no Celery.

Every paid trigger is charged to fixed UTC windows (:func:`genq.keys.spend`): its producer's hour and
day, and the total's hour or day while a total cap is set for that period (with none, the total is the
sum of the producers' windows, and charging it would cost every submit Redis commands for nothing).
The charge is made, and every cap checked, inside the ledger's
``pending -> submitting`` compare-and-set (:meth:`genq.ledger.Ledger.transition` with a plan from
:meth:`BudgetBook.plan`), so no number of concurrent submits can pass a cap. A POST the upstream surely
did not act on (a 4xx, a 429, a refused connection, our own limiter) is refunded when the job leaves
``submitting``; an ambiguous one stays charged, since the money may have been spent.

Cost units: an image job costs ``costs.image`` per image asked for, an upscale ``costs.upscale``, a
video ``costs.video_second`` per second asked for::

    >>> cost_of(JobKind.IMAGE, {"num_images": 4}, CostTable(image=0.5))
    2.0
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
from pydantic import BaseModel

from genq import keys
from genq.schemas import JobKind, JobRecord
from genq.settings import BudgetCaps, BudgetSettings, CostTable

PERIODS: dict[str, int] = {"h": 3600, "d": 86400}
"""Budget windows: their one-letter name and length in seconds."""
_CAP_FIELDS = {
    ("h", "t"): "triggers_per_hour",
    ("d", "t"): "triggers_per_day",
    ("h", "c"): "cost_per_hour",
    ("d", "c"): "cost_per_day",
}


def cost_of(kind: JobKind, request: Mapping[str, Any], costs: CostTable) -> float:
    """Cost units of one trigger of ``kind`` with this upstream body."""
    if kind is JobKind.IMAGE:
        return costs.image * int(request.get("num_images", 1))
    if kind is JobKind.UPSCALE:
        return costs.upscale
    if kind is JobKind.VIDEO:
        return costs.video_second * float(request.get("duration", 5.0))
    return 0.0


def window_start(now: float, period: str) -> int:
    """Start (Unix seconds) of the fixed UTC window of ``period`` that holds ``now``."""
    length = PERIODS[period]
    return int(now // length) * length


def _capped(caps: BudgetCaps, period: str) -> bool:
    return any(getattr(caps, _CAP_FIELDS[(period, what)]) is not None for what in ("t", "c"))


def scope_name(scope: str) -> str:
    return "total" if scope == keys.TOTAL_SCOPE else f"producer {scope}"


@dataclass(frozen=True)
class Plan:
    """What one submit is checked against and charged to, as the ledger's Lua step reads it."""

    producer: str
    cost: float
    checks: list[tuple[str, str, float, float, str, int]] = field(default_factory=list)
    """``(key, field, cap, amount, name, window end)``: ``field`` is ``t`` (triggers) or ``c`` (cost)."""
    charge: list[tuple[str, float, int, int]] = field(default_factory=list)
    """``(key, cost, ttl, tracked)``: every window the trigger is counted in, capped or not; ``tracked``
    is 1 where a cost cap is checked, so the window also keeps the cost of POSTs still unanswered."""
    quota: tuple[str, int, str] | None = None
    """``(key, max in flight, name)``."""
    seed: list[tuple[str, str, str, int]] = field(default_factory=list)
    """``(key, producer key prefix, suffix, ttl)``: a total window to start from the sum of the
    producers' windows of the same period and start, if it does not exist yet."""

    def to_json(self) -> str:
        plan: dict[str, Any] = {"producer": self.producer, "checks": self.checks, "charge": self.charge}
        if self.quota is not None:
            plan["quota"] = self.quota
        if self.seed:
            plan["seed"] = self.seed
        return json.dumps(plan, separators=(",", ":"))


class BudgetLine(BaseModel):
    """One budget window's spend against its caps (``None``: no cap)."""

    scope: str
    """``total`` or the producer id."""
    period: str
    """``hour`` or ``day``."""
    window_start: int
    window_end: int
    triggers: int
    cost: float
    unanswered: int
    """Triggers charged whose POST has no answer yet (refunded if it turns out not sent)."""
    triggers_cap: int | None = None
    cost_cap: float | None = None
    triggers_left: int | None = None
    cost_left: float | None = None


class ProducerUsage(BaseModel):
    """A producer's in-flight jobs against its quota, and its budget windows."""

    producer: str
    in_flight: int
    max_in_flight: int | None = None
    lane: str
    on_budget: str
    windows: list[BudgetLine]


class BudgetReport(BaseModel):
    """A producer's quota and budgets, and the total's: what :meth:`genq.producer.Producer.budget`
    returns."""

    producer: ProducerUsage
    total: list[BudgetLine]

    def remaining(self) -> dict[str, float | None]:
        """The least left of each kind of cap, over the producer's and the total's windows
        (``None``: uncapped)::

            {"triggers": 40, "cost": None}
        """
        lines = [*self.producer.windows, *self.total]
        triggers = [ln.triggers_left for ln in lines if ln.triggers_left is not None]
        cost = [ln.cost_left for ln in lines if ln.cost_left is not None]
        return {"triggers": min(triggers, default=None), "cost": min(cost, default=None)}


class BudgetBook:
    """Makes submit plans and reads spend. Windows follow ``clock`` (the ledger's, Redis's time)."""

    def __init__(self, client: redis.Redis, settings: BudgetSettings) -> None:
        self.redis = client
        self.settings = settings

    def plan(self, rec: JobRecord, now: float) -> Plan:
        cost = cost_of(rec.kind, rec.request, self.settings.costs)
        policy = self.settings.policy(rec.producer)
        checks: list[tuple[str, str, float, float, str, int]] = []
        charge: list[tuple[str, float, int, int]] = []
        seed: list[tuple[str, str, str, int]] = []
        for scope, caps in ((rec.producer, policy), (keys.TOTAL_SCOPE, self.settings.total)):
            for period, length in PERIODS.items():
                if scope == keys.TOTAL_SCOPE and not _capped(caps, period):
                    continue
                start = window_start(now, period)
                key = keys.spend(scope, period, start)
                if scope == keys.TOTAL_SCOPE:
                    seed.append((key, keys.SPEND_PREFIX, f":{period}:{start}", 2 * length))
                cost_capped = getattr(caps, _CAP_FIELDS[(period, "c")]) is not None
                # Kept a window past its end, so `genq budgets` still shows the last one.
                charge.append((key, cost, 2 * length, int(cost_capped)))
                for what, amount in (("t", 1.0), ("c", cost)):
                    name = _CAP_FIELDS[(period, what)]
                    cap = getattr(caps, name)
                    if cap is not None:
                        label = f"{scope_name(scope)} {name}={cap:g}"
                        checks.append((key, what, float(cap), amount, label, start + length))
        quota = None
        if policy.max_in_flight is not None:
            label = f"producer {rec.producer} max_in_flight={policy.max_in_flight}"
            quota = (keys.inflight(rec.producer), policy.max_in_flight, label)
        return Plan(rec.producer, cost, checks, charge, quota, seed)

    def producers(self) -> list[str]:
        """Producers named in the settings or ever charged, sorted."""
        seen = {m.decode() if isinstance(m, bytes) else str(m) for m in self.redis.smembers(keys.PRODUCERS)}
        return sorted(seen | set(self.settings.producers))

    def windows(self, scope: str, now: float) -> list[BudgetLine]:
        caps: BudgetCaps = self.settings.total if scope == keys.TOTAL_SCOPE else self.settings.policy(scope)
        lines = []
        for period, length in PERIODS.items():
            start = window_start(now, period)
            data = self._spent(scope, period, start)
            triggers, cost = round(data.get("t", 0)), round(data.get("c", 0.0), 6)
            t_cap = getattr(caps, _CAP_FIELDS[(period, "t")])
            c_cap = getattr(caps, _CAP_FIELDS[(period, "c")])
            lines.append(
                BudgetLine(
                    scope="total" if scope == keys.TOTAL_SCOPE else scope,
                    period="hour" if period == "h" else "day",
                    window_start=start,
                    window_end=start + length,
                    triggers=triggers,
                    cost=cost,
                    unanswered=round(data.get("pt", 0)),
                    triggers_cap=t_cap,
                    cost_cap=c_cap,
                    triggers_left=None if t_cap is None else max(0, t_cap - triggers),
                    cost_left=None if c_cap is None else max(0.0, round(c_cap - cost, 6)),
                )
            )
        return lines

    def _spent(self, scope: str, period: str, start: int) -> dict[str, float]:
        """One window's fields; the total's, where it is not kept (no total cap), added up."""
        raw = self.redis.hgetall(keys.spend(scope, period, start))
        if not raw and scope == keys.TOTAL_SCOPE:
            pipe = self.redis.pipeline(transaction=False)
            for producer in self.producers():
                pipe.hgetall(keys.spend(producer, period, start))
            summed: dict[str, float] = {}
            for window in pipe.execute():
                for k, v in window.items():
                    name = k.decode() if isinstance(k, bytes) else k
                    summed[name] = summed.get(name, 0.0) + float(v)
            return summed
        return {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}

    def usage(self, producer: str, now: float) -> ProducerUsage:
        policy = self.settings.policy(producer)
        return ProducerUsage(
            producer=producer,
            in_flight=int(self.redis.scard(keys.inflight(producer))),
            max_in_flight=policy.max_in_flight,
            lane=policy.lane,
            on_budget=policy.on_budget,
            windows=self.windows(producer, now),
        )

    def report(self, now: float) -> tuple[list[BudgetLine], list[ProducerUsage]]:
        """The total's windows and every producer's usage."""
        return self.windows(keys.TOTAL_SCOPE, now), [self.usage(p, now) for p in self.producers()]
