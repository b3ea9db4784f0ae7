"""Fakes for the model-based test: a shared fake clock, a scriptable upstream, a file server mounted
on a ``requests.Session``, a callback sink, and a fuse that kills a step before its N-th Redis write.

Every fake answers according to an *outcome* the state machine sets before each step, so a step's
upstream call (there is at most one per service step) can get any class of answer.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.response import HTTPResponse

from genq.errors import ProtocolError, RateLimited, Throttled, UpstreamRejected, UpstreamUnavailable
from genq.limits import Tick, UpstreamLimiter
from genq.schemas import JobKind, UpstreamJob, UpstreamModel

# Answer classes of one upstream call. "ok" first: hypothesis shrinks towards it. "queued" (last, so with
# the admission queue off the answers drawn are those of earlier runs) is a full rate window for a
# submit, which then joins the admission queue; for any other call it is "throttled".
OUTCOMES = ("ok", "429", "throttled", "5xx", "timeout", "malformed", "401", "404", "queued")
ACTED = frozenset({"ok", "timeout", "malformed"})
"""Outcomes after which the upstream DID act on a trigger / train call (it was paid for)."""

FILE_HOST = "https://files.test"


class FakeClock:
    """One shared float; every service gets this callable."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class DeterministicUuid:
    """Stands in for ``uuid.uuid4`` so job ids (and so Redis set/zset orders) replay identically."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> uuid.UUID:
        self.n += 1
        return uuid.UUID(int=self.n)


# ---------------------------------------------------------------------------------------- upstream


@dataclass
class UpJob:
    id: str
    kind: JobKind
    ledger_job: str | None
    created_at: float
    done_at: float
    fate: str  # success | failed
    outputs: int


@dataclass
class UpModel:
    id: str
    started_at: float
    ready_at: float
    fate: str  # ready | failed


@dataclass
class PaidCall:
    subject: str  # ledger job id (trigger) or model id (train)
    epoch: int
    outcome: str
    acted: bool
    at: float


@dataclass
class FakeUpstream:
    """The ``UpstreamClient`` interface; records every paid call."""

    clock: FakeClock
    files: FileServer
    limiter: UpstreamLimiter | None = None
    """The admission queue's limiter (``JobService`` parks, ticks and rearms through it)."""
    gate: UpstreamLimiter | None = None
    """The same limits on a client outside the write fuse: the POST's own admission, as the real
    client asks before every trigger. Not counted as a write, so a crash's write numbers (and the
    findings' sequences) mean what they did before the queue: dying between this admission and the
    POST is dying before the POST, as far as the ledger can tell."""
    outcome: str = "ok"
    retry_after: float = 1.0
    fate: str = "success"
    duration: float = 5.0
    current_job: str | None = None  # the ledger job whose submit message is being delivered
    current_epoch: int = 0
    posts: list[PaidCall] = field(default_factory=list)
    trains: list[PaidCall] = field(default_factory=list)
    model_epochs: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, UpJob] = field(default_factory=dict)
    models: dict[str, UpModel] = field(default_factory=dict)
    calls: int = 0
    during: Callable[[], None] | None = None
    """Runs once inside the next upstream call, after the upstream acted and before it answers: another
    worker's step (or a producer's cancel) racing with this one."""

    def _meanwhile(self) -> None:
        hook, self.during = self.during, None
        if hook is not None:
            saved = (self.outcome, self.current_job, self.current_epoch, self.fate, self.duration)
            hook()
            self.outcome, self.current_job, self.current_epoch, self.fate, self.duration = saved

    # -- faults shared by every call
    def _fail_before_acting(self, what: str) -> None:
        o = self.outcome
        if o in ("throttled", "queued"):
            raise Throttled(f"{what}: held back by the shared rate limit", retry_after=self.retry_after)
        if o == "429":
            if self.limiter is not None:
                # As the real client: the upstream is closed for every worker until its Retry-After
                # (Redis's clock; the model's expiry of the closure's key reopens it in fake time).
                # Ticks then grant nothing, so the admission queue outlives them.
                self.limiter.block(self.retry_after)
            raise RateLimited(f"{what}: 429 rate limited", retry_after=self.retry_after)
        if o == "5xx":
            raise UpstreamUnavailable(f"{what}: 503 unavailable")
        if o == "401":
            raise UpstreamRejected(f"{what}: 401 unauthorized", 401)
        if o == "404":
            raise UpstreamRejected(f"{what}: 404 not found", 404)

    def trigger(self, kind: JobKind, body: dict[str, Any], lane: str = "", caller: str = "") -> UpstreamJob:
        self.calls += 1
        what = f"POST {kind.value}"
        if self.outcome == "queued":
            # The model's stand-in for a full window (the real windows never fill: see the machine).
            raise Throttled(f"{what}: held back by the shared rate limit", self.retry_after, queued=True)
        if self.gate is not None:
            # A granted turn is taken here; without one, a submit with others queued ahead joins them.
            permit, wait, queued = self.gate.admit("trigger", lane, caller, queue=bool(caller))
            if permit is None:
                raise Throttled(f"{what}: held back by the shared rate limit", wait, queued)
        self._fail_before_acting(what)
        now = self.clock()
        n = int(body.get("num_images", 1)) if kind is JobKind.IMAGE else 1
        up = UpJob(
            id=f"up{len(self.jobs) + 1}",
            kind=kind,
            ledger_job=self.current_job,
            created_at=now,
            done_at=now + self.duration,
            fate=self.fate,
            outputs=n,
        )
        self.jobs[up.id] = up
        self.posts.append(PaidCall(self.current_job or "?", self.current_epoch, self.outcome, True, now))
        for i in range(n):
            self.files.add(up, i)
        self._meanwhile()
        if self.outcome == "timeout":
            raise UpstreamUnavailable(f"{what}: read timeout", ambiguous=True)
        if self.outcome == "malformed":
            raise ProtocolError(f"{what}: 200 answer is not JSON: '<html>'")
        return UpstreamJob.model_validate({"jobId": up.id, "status": "created"})

    def get_job(self, upstream_id: str, lane: str = "") -> UpstreamJob:
        self.calls += 1
        what = f"GET /jobs/{upstream_id}"
        self._fail_before_acting(what)
        self._meanwhile()
        if self.outcome == "timeout":
            raise UpstreamUnavailable(f"{what}: read timeout", ambiguous=True)
        if self.outcome == "malformed":
            raise ProtocolError(f"{what}: unexpected job payload: status: unknown upstream status 'weird'")
        up = self.jobs.get(upstream_id)
        if up is None:
            raise UpstreamRejected(f"{what}: 404 no such job", 404)
        now = self.clock()
        if now < up.created_at + (up.done_at - up.created_at) / 3:
            return UpstreamJob.model_validate({"jobId": up.id, "status": "created"})
        if now < up.done_at:
            return UpstreamJob.model_validate({"jobId": up.id, "status": "running"})
        if up.fate == "failed":
            return UpstreamJob.model_validate({"jobId": up.id, "status": "failed", "error": "boom"})
        outs = [{"id": f"{up.id}-o{i}", "url": self.files.url(up, i) + "?token=t"} for i in range(up.outputs)]
        key = "videos" if up.kind is JobKind.VIDEO else "images"
        return UpstreamJob.model_validate({"jobId": up.id, "status": "success", key: outs})

    def train_model(self, model_id: str) -> str:
        self.calls += 1
        what = f"GET /models/{model_id}/train"
        self._fail_before_acting(what)
        now = self.clock()
        # malformed 2xx is fine here: the client accepts a text answer
        self.models[model_id] = UpModel(model_id, now, now + self.duration, self.fate_model())
        epoch = self.model_epochs.get(model_id, 0)
        self.trains.append(PaidCall(model_id, epoch, self.outcome, True, now))
        self._meanwhile()
        if self.outcome == "timeout":
            raise UpstreamUnavailable(f"{what}: read timeout", ambiguous=True)
        return "training started"

    def fate_model(self) -> str:
        return "ready" if self.fate == "success" else "failed"

    def get_model(self, model_id: str) -> UpstreamModel:
        self.calls += 1
        what = f"GET /models/{model_id}"
        self._fail_before_acting(what)
        self._meanwhile()
        if self.outcome == "timeout":
            raise UpstreamUnavailable(f"{what}: read timeout", ambiguous=True)
        if self.outcome == "malformed":
            raise ProtocolError(f"{what}: unexpected model payload: status: missing")
        up = self.models.get(model_id)
        if up is None:
            raise UpstreamRejected(f"{what}: 404 no such model", 404)
        if self.clock() < up.ready_at:
            return UpstreamModel.model_validate({"modelId": model_id, "status": "training"})
        if up.fate == "failed":
            return UpstreamModel.model_validate(
                {"modelId": model_id, "status": "failed", "error": "bad data"}
            )
        return UpstreamModel.model_validate({"modelId": model_id, "status": "ready"})


class TickWatch(UpstreamLimiter):
    """The real limiter, telling the model each time it (re)set a family's tick key. A tick sets it
    again with the same token and often the same TTL, which reading PTTLs cannot tell from the old
    TTL running down; the model's fake-time expiry would then end the tick chain too early."""

    def __init__(
        self, *args: Any, retimed: Callable[[str], None], counts: Counter[str], **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.retimed = retimed
        self.counts = counts  # what the queue did, for the run's summary line

    def park(self, family: str, job_id: str, gen: int, lane: str, producer: str) -> str | None:
        token = super().park(family, job_id, gen, lane, producer)
        self.counts["parked"] += 1
        if token:
            self.retimed(family)
        return token

    def tick(self, family: str, token: str) -> Tick:
        tick = super().tick(family, token)
        self.counts["ticks"] += 1
        self.counts["granted"] += len(tick.grants)
        if tick.next_in is not None:
            self.retimed(family)
        return tick

    def rearm(self, family: str) -> str | None:
        token = super().rearm(family)
        if token:
            self.counts["rearmed"] += 1
            self.retimed(family)
        return token


# ---------------------------------------------------------------------------------------- files


class FileServer(BaseAdapter):
    """Serves each output's bytes (Range supported); ``outcome`` makes it fail the next request."""

    def __init__(self) -> None:
        super().__init__()
        self.content: dict[str, tuple[bytes, str]] = {}
        self.outcome = "ok"
        self.full_hashes: set[str] = set()
        self.requests = 0

    def url(self, up: UpJob, index: int) -> str:
        return f"{FILE_HOST}/{up.id}/{index}"

    def add(self, up: UpJob, index: int) -> None:
        seed = f"{up.id}/{index}".encode()
        body = (hashlib.sha256(seed).digest() * 200)[: 3000 + 97 * index]
        ctype = "video/mp4" if up.kind is JobKind.VIDEO else "image/png"
        self.content[self.url(up, index)] = (body, ctype)
        self.full_hashes.add(hashlib.sha256(body).hexdigest())

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        self.requests += 1
        url = (request.url or "").split("?", 1)[0]
        found = self.content.get(url)
        headers: dict[str, str] = {}
        status = 200
        if found is None or self.outcome in ("404", "401"):
            status, body = 404, b"not found"
            headers["Content-Type"] = "text/plain"
        elif self.outcome in ("5xx", "429", "throttled", "queued"):
            status, body = 503, b"busy"
            headers["Content-Type"] = "text/plain"
        else:
            data, ctype = found
            headers["Content-Type"] = ctype
            start = 0
            rng = request.headers.get("Range", "")
            if rng.startswith("bytes=") and rng.endswith("-") and rng[6:-1].isdigit():
                start = int(rng[6:-1])
                if start < len(data):
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                else:
                    start = 0
            body = data[start:]
            headers["Content-Length"] = str(len(body))
            if self.outcome in ("timeout", "malformed"):
                body = body[: len(body) // 2]  # the connection drops half way
        raw = HTTPResponse(
            body=io.BytesIO(body),
            headers=headers,
            status=status,
            preload_content=False,
            decode_content=False,
            enforce_content_length=False,
        )
        response = requests.Response()
        response.status_code = status
        response.headers = CaseInsensitiveDict(headers)
        response.raw = raw
        response.url = request.url or ""
        response.request = request
        response.reason = "OK" if status < 400 else "ERR"
        response.encoding = None
        return response

    def close(self) -> None:
        pass


def file_session(server: FileServer) -> requests.Session:
    session = requests.Session()
    session.mount(FILE_HOST + "/", server)
    return session


# ---------------------------------------------------------------------------------------- callbacks


@dataclass
class Sent:
    task: str
    record: dict[str, Any]
    queue: str
    at: float


@dataclass
class CallbackSink:
    """The ``send`` given to ``CallbackService.deliver``: records each task sent by name."""

    clock: FakeClock
    outcome: str = "ok"
    sent: list[Sent] = field(default_factory=list)

    def __call__(self, name: str, args: list[Any], queue: str) -> None:
        if self.outcome != "ok":
            raise OSError("broker connection lost while sending the callback")
        self.sent.append(Sent(name, dict(args[0]), queue, self.clock()))


# ---------------------------------------------------------------------------------------- crashes


class WorkerDied(BaseException):
    """The worker process died here (SIGKILL, OOM): nothing after this point of the step ran."""


WRITES = frozenset(
    {
        "EVALSHA",
        "EVAL",
        "HSET",
        "HDEL",
        "HINCRBY",
        "DEL",
        "ZADD",
        "ZREM",
        "EXPIRE",
        "PERSIST",
        "SET",
        "RPUSH",
        "SADD",
        "SREM",
        "INCR",
        "XADD",
    }
)


class WriteFuse:
    """Wraps one redis client so that, when armed with ``n``, the step dies just before its n-th write
    (a Lua script call or a pipeline counts as one write: Redis runs each atomically)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.left: int | None = None
        self.writes = 0
        real_exec: Callable[..., Any] = client.execute_command
        real_pipeline: Callable[..., Any] = client.pipeline
        fuse = self

        def execute_command(*args: Any, **options: Any) -> Any:
            if str(args[0]).upper() in WRITES:
                fuse.tick()
            return real_exec(*args, **options)

        def pipeline(*args: Any, **kwargs: Any) -> Any:
            pipe = real_pipeline(*args, **kwargs)
            real_execute = pipe.execute

            def execute(*a: Any, **k: Any) -> Any:
                if any(str(c[0][0]).upper() in WRITES for c in pipe.command_stack):
                    fuse.tick()
                return real_execute(*a, **k)

            pipe.execute = execute
            return pipe

        client.execute_command = execute_command  # type: ignore[method-assign]
        client.pipeline = pipeline  # type: ignore[method-assign]

    def tick(self) -> None:
        self.writes += 1
        if self.left is not None:
            self.left -= 1
            if self.left <= 0:
                self.left = None
                raise WorkerDied(f"worker died before write {self.writes}")

    @contextmanager
    def armed(self, n: int | None) -> Iterator[None]:
        self.left = n
        try:
            yield
        finally:
            self.left = None
