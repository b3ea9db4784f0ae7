"""Counters that Flower lacks, written by worker processes into one Redis hash (:data:`genq.keys.METRICS`)
and exported by ``genq metrics`` (:mod:`genq.exporter`): upstream request latency (a bucketed histogram)
and errors by class, per endpoint family; waits imposed by the shared rate limiter and 429 closures;
downloaded files and bytes.

Cheap by construction, never a read: in a worker, observations are summed in the process and written
at most once a second (:data:`FLUSH_SECONDS`), one pipelined round trip of increments for all of them,
instead of three commands per upstream call; a process killed outright loses at most that second of
counts, a stopped one writes them on its way out. A write that fails is logged and dropped: a metric
must never fail the job it describes.

The upstream client needs no metrics code: :func:`instrument` wraps its transport (a ``requests``
adapter around the one it had) and its limiter. Fields of the hash::

    latency:<family>:<le>       requests that took at most <le> seconds and more than the bucket below
    latency_sum:<family>        seconds, summed
    latency_count:<family>
    error:<family>:<class>      http_429, http_5xx, http_4xx, connect_timeout, read_timeout, connection, other
    throttled:<family>          calls the shared limiter held back; throttled_seconds:<family> their waits
    upstream_closed             429s that closed the upstream for every worker; upstream_closed_seconds
    downloads, download_bytes   files recorded in the ledger, and their size
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import redis
import requests
from requests.adapters import BaseAdapter

from genq import keys
from genq.api import UpstreamClient
from genq.limits import Permit, UpstreamLimiter

log = logging.getLogger(__name__)

LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds of the latency histogram's buckets, in seconds (one more, +Inf, above them)."""
INF = "+Inf"

SENT_AT_HEADER = "genq_sent_at"
"""Message header: when a genqueue process published the task (Unix time), for queue-age metrics."""


def sent_at_header() -> dict[str, float]:
    """Headers to publish a task with, so ``genq metrics`` can tell how long it waited in its queue."""
    return {SENT_AT_HEADER: time.time()}


def bucket(seconds: float) -> str:
    """The histogram bucket ``seconds`` falls in, as its upper bound's label.

    >>> bucket(0.03), bucket(99)
    ('0.05', '+Inf')
    """
    i = bisect.bisect_left(LATENCY_BUCKETS, seconds)
    return INF if i == len(LATENCY_BUCKETS) else repr(LATENCY_BUCKETS[i])


def family_of(method: str, path: str) -> str:
    """The endpoint family of an upstream request (the rate limiter's families), from its path below
    the API's base URL."""
    if path.startswith("/models/"):
        return "models"
    if path.startswith("/jobs/"):
        return "status"
    return "trigger" if method.upper() == "POST" else "other"


def status_class(status: int) -> str | None:
    """The error class of an HTTP answer, or None for a success."""
    if status == 429:
        return "http_429"
    if status >= 500:
        return "http_5xx"
    if status >= 400:
        return "http_4xx"
    return None


def exception_class(exc: BaseException) -> str:
    """The error class of a request that got no answer."""
    if isinstance(exc, requests.ConnectTimeout):
        return "connect_timeout"
    if isinstance(exc, requests.ReadTimeout):
        return "read_timeout"
    if isinstance(exc, requests.ConnectionError):
        return "connection"
    return "other"


FLUSH_SECONDS = 1.0
"""How long a worker process sums observations before writing them (one round trip for all)."""


class Recorder:
    """Adds observations to the metrics hash. Thread-safe (one redis-py client, pooled connections).

    With ``flush_interval`` 0 each observation is written at once; otherwise observations are summed
    and written by a timer that many seconds after the first one not yet written (and by :meth:`flush`).
    """

    def __init__(self, client: redis.Redis, flush_interval: float = 0.0) -> None:
        self.redis = client
        self.flush_interval = flush_interval
        self._lock = threading.Lock()
        self._incr: dict[str, int] = {}
        self._incr_float: dict[str, float] = {}
        self._timer: threading.Timer | None = None

    def upstream(self, family: str, seconds: float, error: str | None = None) -> None:
        """One upstream request: how long until its answer (or failure), and its error class if any."""
        incr: dict[str, int] = {f"latency:{family}:{bucket(seconds)}": 1, f"latency_count:{family}": 1}
        if error:
            incr[f"error:{family}:{error}"] = 1
        self._write(incr, {f"latency_sum:{family}": seconds})

    def throttled(self, family: str, wait: float) -> None:
        """A call the shared rate limiter held back; its task comes back after ``wait`` seconds."""
        self._write({f"throttled:{family}": 1}, {f"throttled_seconds:{family}": wait})

    def upstream_closed(self, seconds: float) -> None:
        """A 429 closed the upstream for every worker for ``seconds``."""
        self._write({"upstream_closed": 1}, {"upstream_closed_seconds": seconds})

    def download(self, size: int) -> None:
        """One output file recorded in the ledger, of ``size`` bytes."""
        self._write({"downloads": 1, "download_bytes": size}, {})

    def _write(self, incr: Mapping[str, int], incr_float: Mapping[str, float]) -> None:
        if self.flush_interval <= 0:
            self._send(incr, incr_float)
            return
        with self._lock:
            for name, amount in incr.items():
                self._incr[name] = self._incr.get(name, 0) + amount
            for name, value in incr_float.items():
                self._incr_float[name] = self._incr_float.get(name, 0.0) + value
            if self._timer is None:
                self._timer = threading.Timer(self.flush_interval, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        """Write what has been summed so far (the timer does this; so does a process on its way out)."""
        with self._lock:
            incr, incr_float = self._incr, self._incr_float
            self._incr, self._incr_float = {}, {}
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()  # a no-op when the timer itself is flushing
        if incr or incr_float:
            self._send(incr, incr_float)

    def _send(self, incr: Mapping[str, int], incr_float: Mapping[str, float]) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            for name, amount in incr.items():
                pipe.hincrby(keys.METRICS, name, amount)
            for name, value in incr_float.items():
                pipe.hincrbyfloat(keys.METRICS, name, value)
            pipe.execute()
        except redis.RedisError as exc:
            log.debug("metrics write dropped: %s", type(exc).__name__)


# ---------------------------------------------------------------------------- instrumentation


class MeteredAdapter(BaseAdapter):
    """Times each request the adapter it wraps sends (until the answer's headers) and records the
    outcome; it changes nothing about the request, so any guard the inner adapter applies still does."""

    def __init__(self, inner: BaseAdapter, recorder: Recorder, base_url: str) -> None:
        super().__init__()
        self.inner = inner
        self.recorder = recorder
        self.base_path = urlsplit(base_url).path.rstrip("/")

    def send(  # type: ignore[override]  # passes requests' keyword arguments through unchanged
        self, request: requests.PreparedRequest, **kwargs: Any
    ) -> requests.Response:
        path = urlsplit(request.url or "").path.removeprefix(self.base_path)
        family = family_of(request.method or "GET", path)
        started = time.perf_counter()
        try:
            response = self.inner.send(request, **kwargs)
        except requests.RequestException as exc:
            self.recorder.upstream(family, time.perf_counter() - started, exception_class(exc))
            raise
        self.recorder.upstream(family, time.perf_counter() - started, status_class(response.status_code))
        return response

    def close(self) -> None:
        self.inner.close()


class MeteredLimiter(UpstreamLimiter):
    """The shared limiter, counting the calls it holds back and the 429s that close the upstream."""

    def __init__(self, inner: UpstreamLimiter, recorder: Recorder) -> None:
        super().__init__(inner.redis, inner.limits)
        self.recorder = recorder

    def admit(
        self, family: str, lane: str = "", caller: str = "", queue: bool = False
    ) -> tuple[Permit | None, float, bool]:
        permit, wait, queued = super().admit(family, lane, caller, queue)
        if permit is None:
            self.recorder.throttled(family, wait)
        return permit, wait, queued

    def block(self, seconds: float) -> None:
        super().block(seconds)
        self.recorder.upstream_closed(seconds)


def instrument(api: UpstreamClient, recorder: Recorder) -> bool:
    """Meter ``api``'s requests and limiter; False when it already was (safe to call per task)."""
    prefix = api.base_url + "/"
    inner = api.session.get_adapter(prefix)
    if isinstance(inner, MeteredAdapter):
        return False
    api.session.mount(prefix, MeteredAdapter(inner, recorder, api.base_url))
    if api.limiter is not None:
        api.limiter = MeteredLimiter(api.limiter, recorder)
    return True


# ---------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts (``(upper bound, count)``, the last one ``+Inf``), sum and count."""

    buckets: list[tuple[str, int]]
    sum: float
    count: int


@dataclass
class Counters:
    """Everything in the metrics hash, parsed."""

    latency: dict[str, Histogram] = field(default_factory=dict)
    errors: dict[tuple[str, str], int] = field(default_factory=dict)
    throttled: dict[str, tuple[int, float]] = field(default_factory=dict)
    upstream_closed: tuple[int, float] = (0, 0.0)
    downloads: int = 0
    download_bytes: int = 0


def read(client: redis.Redis) -> Counters:
    raw: dict[Any, Any] = client.hgetall(keys.METRICS)
    fields = {_text(k): _text(v) for k, v in raw.items()}
    out = Counters(
        upstream_closed=(
            int(fields.get("upstream_closed", 0)),
            float(fields.get("upstream_closed_seconds", 0)),
        ),
        downloads=int(fields.get("downloads", 0)),
        download_bytes=int(fields.get("download_bytes", 0)),
    )
    per_bucket: dict[str, dict[str, int]] = {}
    for name, value in fields.items():
        kind, _, rest = name.partition(":")
        if kind == "latency":
            family, _, le = rest.partition(":")
            per_bucket.setdefault(family, {})[le] = int(value)
        elif kind == "error":
            family, _, error = rest.partition(":")
            out.errors[(family, error)] = int(value)
        elif kind == "throttled":
            out.throttled[rest] = (int(value), float(fields.get(f"throttled_seconds:{rest}", 0)))
    for family, counts in per_bucket.items():
        running, buckets = 0, []
        for le in [repr(b) for b in LATENCY_BUCKETS] + [INF]:
            running += counts.get(le, 0)
            buckets.append((le, running))
        out.latency[family] = Histogram(
            buckets,
            float(fields.get(f"latency_sum:{family}", 0)),
            int(fields.get(f"latency_count:{family}", 0)),
        )
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
