"""The model of issue #11: a hypothesis state machine over the real services, the real Lua scripts and a
real redis-server, with a fake clock, a fake upstream, a fake file host and a fake broker.

The broker is a list of pending messages (:mod:`genq.actions` dataclasses with an ETA on the fake
clock), faithful to Celery with ``task_acks_late`` and ``task_reject_on_worker_lost``: a message may be
delivered late (any time at or after its ETA), out of order, twice (a redelivery after a worker death
or a visibility timeout), or never (lost). A worker may die between any two Redis writes of a step;
its message is then redelivered or lost. The sweeper (beat) runs whenever a rule says so.

What the model does NOT claim (the system does not promise it):

- with ``api.submit_at_least_once`` off, a submit whose POST outcome is unknown (a timeout after
  sending, a worker death between the POST and the recording) ends ``submit_unknown``: that is a
  terminal state with a reason, not a violation;
- after an operator's ``resubmit`` of a ``submit_unknown`` job, a second paid POST is the operator's
  choice: paid POSTs are counted per *submit epoch* (bumped by each resubmit);
- a callback that failed ``callbacks.max_attempts`` times ends ``callback_failed`` (documented);
- the poison-message guard of ``workers/base.py`` (Celery task layer) is not modelled.

Redis expiry is emulated on the fake clock: after every step each key's TTL is read, and keys whose
TTL has run out in fake time are deleted when the clock moves past it (real Redis would have expired
them by then). The rate limit's keys are always emulated (``expire`` off or not): a lost tick is only
started again once its token's TTL has run out, and a 429's closure ends when its key does.

The rate limit's admission queue (:mod:`genq.limits`) runs for real: a real ``UpstreamLimiter`` on the
model's Redis parks, ticks and rearms, and every POST asks it first, as the real client does. Its
rates are so high (``ADMISSION_LIMITS``) that its windows never refuse by themselves; the answer
``queued`` stands for a full window (the submit joins the queue). A submit then also joins the queue
whenever others are queued ahead of it without a turn, as in production, and a new job does so at
intake, with no message (``intake.TurnQueue``), when its lane already waits. A ``429`` closes the
upstream through the limiter, as the real client does, so ticks grant nothing meanwhile and a queue
outlives them. ``Admit`` messages (the tick) are delivered, lost, duplicated and crashed like any
other; ``lose_queue`` deletes the whole queue (a failover that lost it). The limiter keeps Redis's
clock, not the fake one: a closure's remaining time is real, so delays derived from it jitter a
little between replays of a seed.

Environment knobs (all optional):

``GENQ_MODEL_SKIP``   comma list of invariants not checked (``I3,I7``), to look past a known failure;
``GENQ_MODEL_OFF``    comma list of rules or features disabled: ``resend``, ``resubmit``, ``train``,
                      ``cancel``, ``crash``, ``race``, ``intake`` (submit through ``accept`` only),
                      ``expire`` (no emulated Redis expiry, but for the rate limit's keys),
                      ``backlog`` (the sweeper sees no submit or poll queue), ``admission`` (no rate limit:
                      no ``queued`` answer, no admission queue), ``losequeue`` (its loss is not
                      modelled), ``intakequeue`` (a new job is always sent, never queued at
                      intake behind its lane), ``lookahead`` (the sweeper sends only what is due:
                      no claim ahead of time, no countdown to a due time), or a job kind
                      (``workflow``, ``video``...).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import redis
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from genq import control, intake, keys
from genq.actions import (
    Action,
    Admit,
    Download,
    Finalize,
    Notify,
    PollLater,
    PollModelLater,
    SubmitLater,
    TrainLater,
)
from genq.callbacks import CallbackService, check_callback
from genq.intake import TurnQueue
from genq.jobs import JobService
from genq.ledger import Ledger, QueuedSince, state_counts
from genq.limits import Limits, UpstreamLimiter
from genq.model_ledger import ModelLedger
from genq.schemas import POLLING_STATES, JobRecord, JobState, ModelRecord, ModelState
from genq.settings import Settings
from genq.sweeper import Sweeper
from genq.training import TrainingService
from genq.workflows import WorkflowService
from tests.model.fakes import (
    ACTED,
    OUTCOMES,
    CallbackSink,
    DeterministicUuid,
    FakeClock,
    FakeUpstream,
    FileServer,
    TickWatch,
    WorkerDied,
    WriteFuse,
    file_session,
)

MODELS = ("m1", "m2")
CALLBACK = {"task": "app.on_done", "queue": "app"}
LIVE_BOUND = 3
"""I3: live messages per job or model, beyond the duplicates the model itself injected."""
QUIESCE_SECONDS = 4 * 3600.0
"""I1/I4/I5: after faults stop, everything must settle within this much fake time (the longest chain:
model deadline 600 s, then a parked video's 120 s deadline, callback retries, sweeps)."""
QUIESCE_ROUNDS = 3000
STALL_SECONDS = 900.0
"""Quiesce stops early when nothing moved for this long (no poll, no state change): stuck."""


def _csv(name: str) -> frozenset[str]:
    return frozenset(x.strip() for x in os.environ.get(name, "").split(",") if x.strip())


SKIP = _csv("GENQ_MODEL_SKIP")
OFF = _csv("GENQ_MODEL_OFF")
KINDS = [k for k in ("image", "video", "upscale", "workflow") if k not in OFF]
ADMISSION = "admission" not in OFF
AHEAD = 0.0 if "lookahead" in OFF else 2.0
"""The sweeper's look-ahead (seconds; the services give it one sweep interval): a job to submit or
poll (a model to train or check) due within it is claimed early and sent with a countdown to its due
time."""
ANSWERS = tuple(o for o in OUTCOMES if ADMISSION or o != "queued")
ADMISSION_LIMITS = Limits(rates={"trigger": 1e6})
"""A million calls per 1.05 s: the real windows never fill in real time, so every tick grants all
that is queued; a full window is the model's ``queued`` answer instead."""
ADMIT_PREFIX = keys.admit_prefix("trigger")
TICK_KEY = f"{ADMIT_PREFIX}:tick"


class InvariantBroken(AssertionError):
    """An invariant of issue #11 does not hold; the message names it and shows the steps so far."""


@dataclass
class Msg:
    action: Action
    eta: float
    seq: int
    sent: float = 0.0
    copy: bool = False  # a duplicate or a redelivery the model injected


@dataclass
class World:
    """Everything one example shares; built fresh (FLUSHALL, empty download dir) per example."""

    settings: Settings
    client: redis.Redis
    download_dir: Path
    start: float


@dataclass
class Stats:
    examples: int = 0
    steps: int = 0
    deliveries: int = 0
    quiesce_deliveries: int = 0
    jobs: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    end_states: Counter[str] = field(default_factory=Counter)
    admission: Counter[str] = field(default_factory=Counter)
    ahead: int = 0  # submits and polls the sweeper sent before their due time (a countdown to it)


STATS = Stats()
UUIDS = DeterministicUuid()


def subject(action: Action) -> str:
    if isinstance(action, Admit):
        return f"admit:{action.family}"
    return action.model_id if isinstance(action, TrainLater | PollModelLater) else action.job_id


def show(action: Action) -> str:
    name = type(action).__name__
    fields = {k: v for k, v in vars(action).items() if not (k in ("delay", "attempt") and not v)}
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


class GenqMachine(RuleBasedStateMachine):
    world: ClassVar[World]

    def __init__(self) -> None:
        super().__init__()
        w = self.world
        w.client.flushall()
        shutil.rmtree(w.download_dir, ignore_errors=True)
        w.download_dir.mkdir(parents=True)
        UUIDS.n = 0
        STATS.examples += 1
        self.settings = w.settings
        # The fake clock starts at the real time: the one place that reads time.time() itself
        # (intake.resubmit's due time) then agrees with it, whatever the run has taken so far. A whole
        # second, so float sums of start + delays round the same in every example (replays agree).
        w.start = float(int(time.time()))
        self.clock = FakeClock(w.start)
        client = redis.Redis.from_url(w.settings.redis.url)
        self.redis = client
        self.fuse = WriteFuse(client)
        grace = w.settings.worker.sweep_grace
        self.ledger = Ledger(client, job_ttl=w.settings.worker.job_ttl, grace=grace, clock=self.clock)
        self.models = ModelLedger(client, grace=grace, clock=self.clock)
        self.files = FileServer()
        self.upstream = FakeUpstream(self.clock, self.files)
        if ADMISSION:
            self.upstream.limiter = TickWatch(
                client, ADMISSION_LIMITS, retimed=self._retimed, counts=STATS.admission
            )
            self.upstream.gate = UpstreamLimiter(w.client, ADMISSION_LIMITS)
        self.turns = TurnQueue(self.upstream.limiter) if ADMISSION and "intakequeue" not in OFF else None
        rng = random.Random(0)
        self.jobs = JobService(
            w.settings,
            self.ledger,
            self.upstream,  # type: ignore[arg-type]
            file_session(self.files),
            self.clock,
            rng,
            WorkflowService(self.ledger),
        )
        self.training = TrainingService(
            w.settings,
            self.models,
            self.upstream,  # type: ignore[arg-type]
            self.jobs,
            self.clock,
            rng,
        )
        submits, polls = (QueuedSince, QueuedSince) if "backlog" in OFF else (self._submits, self._polls)
        self.sweeper = Sweeper(self.ledger, self.models, self.jobs, self.clock, submits, polls, ahead=AHEAD)
        self.callbacks = CallbackService(w.settings, self.ledger, file_session(self.files), self.clock, rng)
        self.sink = CallbackSink(self.clock)
        self.msgs: list[Msg] = []
        self.seq = 0
        self.n = 0
        self.trace: list[str] = []
        self.failed = False
        self.skip: set[str] = set(SKIP)  # invariants not checked (GENQ_MODEL_SKIP)
        # what the model knows
        self.known: dict[str, JobRecord] = {}  # last record seen of every job ever listed
        self.expired: set[str] = set()
        self.swept_expired: set[str] = set()  # expired before a sweep that has run since
        self.with_callback: set[str] = set()
        self.epoch: Counter[str] = Counter()  # submit epoch per job (bumped by resubmit)
        self.injected: Counter[str] = Counter()  # duplicates/requeues the model injected per subject
        self.requests: list[tuple[dict[str, Any], str, str, str]] = []  # payload, via, key, job id
        self.terminal_seen: dict[str, JobState] = {}
        self.expire_at: dict[str, float] = {}
        self.pttl_seen: dict[str, int] = {}
        self.records: dict[str, JobRecord] = {}
        self.model_records: dict[str, ModelRecord] = {}
        self._hash_cache: dict[tuple[str, float, int], str] = {}

    # ------------------------------------------------------------------ plumbing

    def _log(self, text: str) -> None:
        self.trace.append(f"t+{self.clock.now - self.world.start:7.1f}  {text}")

    def _submits(self) -> QueuedSince:
        return self._backlog(SubmitLater)

    def _polls(self) -> QueuedSince:
        return self._backlog(PollLater)

    def _backlog(self, step: type[SubmitLater] | type[PollLater]) -> QueuedSince:
        """The sweeper's view of the submit or poll queue (``genq.backlog``): when the oldest message
        of that step that is due and not delivered was sent, per lane. The model delivers in any
        order, so this also tests the skip where the queue is not first in, first out."""
        waiting = [m for m in self.msgs if isinstance(m.action, step) and m.eta <= self.clock.now]
        lanes = {lane: [m.sent for m in waiting if m.action.batch is lane] for lane in (False, True)}
        return QueuedSince(min(lanes[False], default=None), min(lanes[True], default=None))

    def _enqueue(self, actions: list[Action], copy: bool = False) -> None:
        for a in actions:
            self.seq += 1
            delay = float(getattr(a, "delay", 0.0) or 0.0)
            self.msgs.append(Msg(a, self.clock.now + delay, self.seq, self.clock.now, copy))
        self.msgs.sort(key=lambda m: (m.eta, m.seq))
        if actions:
            self._log("    -> " + ", ".join(show(a) for a in actions))

    def _outcome(self, outcome: str, retry_after: float = 1.0) -> None:
        self.upstream.outcome = outcome
        self.upstream.retry_after = retry_after
        self.files.outcome = outcome
        self.sink.outcome = outcome

    def _run(self, action: Action) -> list[Action]:
        """What the task layer (``tasks/jobs.py``) runs for a message."""
        match action:
            case SubmitLater(job_id, _, gen):
                self.upstream.current_job = job_id
                self.upstream.current_epoch = self.epoch[job_id]
                return self.jobs.submit(job_id, gen)
            case PollLater(job_id, gen, _):
                return self.jobs.poll(job_id, gen)
            case Download(job_id, index, attempt, _):
                return self.jobs.download(job_id, index, attempt)
            case Finalize(job_id):
                return self.jobs.finalize(job_id)
            case TrainLater(model_id, _, gen):
                return self.training.train(model_id, gen)
            case PollModelLater(model_id, gen, _):
                return self.training.poll(model_id, gen)
            case Notify(job_id, _):
                return self.callbacks.deliver(job_id, self.sink)
            case Admit(family, token, _):
                return self.jobs.admit(family, token)
        raise AssertionError(f"unknown action {action!r}")

    def _advance(self, seconds: float) -> None:
        self._track_ttls()  # TTLs set by this step, before time moves past them
        self.clock.now += seconds
        self._expire()

    def _retimed(self, family: str) -> None:
        """The limiter just set ``family``'s tick key: its TTL starts now, whatever PTTL said before."""
        self.pttl_seen.pop(f"{keys.admit_prefix(family)}:tick", None)

    def _expire(self) -> None:
        """Delete keys whose TTL ran out in fake time, as Redis would have."""
        gone = [k for k, at in self.expire_at.items() if at <= self.clock.now]
        for k in gone:
            if k.startswith(keys.JOB_PREFIX) and ":" not in k[len(keys.JOB_PREFIX) :]:
                last = self.ledger.get(k[len(keys.JOB_PREFIX) :])
                if last is not None:
                    self.known[last.id] = last  # its state when it expired
            self.redis.delete(k)
            self.expire_at.pop(k, None)
            self.pttl_seen.pop(k, None)
            if k.startswith(keys.JOB_PREFIX) and ":" not in k[len(keys.JOB_PREFIX) :]:
                job_id = k[len(keys.JOB_PREFIX) :]
                self.expired.add(job_id)
                self._log(f"(redis expired the record of {job_id})")
            elif k.startswith(f"{keys.PREFIX}:idem:") or k == TICK_KEY:
                self._log(f"(redis expired {k})")

    def _track_ttls(self) -> None:
        patterns = ["*"] if "expire" not in OFF else [f"{keys.PREFIX}:admit:*", f"{keys.PREFIX}:limit:*"]
        names = [k.decode() for pattern in patterns for k in self.redis.keys(pattern)]
        pipe = self.redis.pipeline()
        for k in names:
            pipe.pttl(k)
        for k, p in zip(names, pipe.execute(), strict=True):
            if p is None or p < 0:
                self.expire_at.pop(k, None)
                self.pttl_seen.pop(k, None)
                continue
            prev = self.pttl_seen.get(k)
            if prev is None or p > prev + 100:  # new, or EXPIRE set again
                self.expire_at[k] = self.clock.now + p / 1000.0
            self.pttl_seen[k] = p

    def _step(self, text: str, fn: Any) -> None:
        STATS.steps += 1
        self._log(text)
        try:
            fn()
        except BaseException:
            self.failed = True
            raise

    def _pick_msg(self, pick: int) -> Msg:
        return self.msgs[pick % len(self.msgs)]

    def _job_ids(self) -> list[str]:
        return sorted(self.known, key=lambda j: (self.known[j].created_at, j))

    def _deliver(self, m: Msg, outcome: str = "ok", retry_after: float = 1.0) -> None:
        if m.eta > self.clock.now:
            self._advance(m.eta - self.clock.now)
        self._outcome(outcome, retry_after)
        STATS.outcomes[outcome] += 1
        actions = self._run(m.action)
        self._enqueue(actions)

    # ------------------------------------------------------------------ producers

    @precondition(lambda self: len(self.requests) < 8 and KINDS)
    @rule(
        kind=st.sampled_from(KINDS or ["image"]),
        n=st.integers(1, 3),
        idem=st.booleans(),
        callback=st.booleans(),
        via_intake=st.booleans(),
        model=st.sampled_from([None, *MODELS]),
    )
    def submit(
        self, kind: str, n: int, idem: bool, callback: bool, via_intake: bool, model: str | None
    ) -> None:
        """A producer submits a job (``Producer.submit``), or sends ``genq.intake`` by name."""
        if via_intake and "intake" in OFF:
            via_intake = False
        self.n += 1
        k = self.n
        payload: dict[str, Any]
        extra: dict[str, Any] = {"model_id": model} if model else {}
        if kind == "image":
            payload = {"kind": "image", "prompt": f"p{k}", "num_images": n, **extra}
        elif kind == "video":
            payload = {"kind": "video", "prompt": f"p{k}", "duration": 4, **extra}
        elif kind == "upscale":
            payload = {"kind": "upscale", "image_id": f"src{k}", "factor": 2, **extra}
        else:
            payload = {
                "kind": "workflow",
                "generate": {"prompt": f"p{k}", "num_images": n, **extra},
                "upscale_factor": 2,
            }
        if callback:
            payload["callback"] = dict(CALLBACK)
        via = "intake" if via_intake else "accept"
        key = f"r{k}" if via_intake else (f"key{k}" if idem else "")

        def go() -> None:
            job_id = self._send_request(payload, via, key, f"{kind}{k}")
            self.requests.append((payload, via, key, job_id))
            if callback:
                self.with_callback.add(job_id)

        self._step(f"submit {via} {payload} key={key or None}", go)

    def _send_request(self, payload: dict[str, Any], via: str, key: str, job_id: str) -> str:
        if via == "intake":
            accepted = intake.intake(self.ledger, payload, key, self.settings, self.turns)
            made = intake.job_id_for(key)
        else:
            request = intake.validate(payload)
            check_callback(request.callback, self.settings)
            accepted = intake.accept(
                self.ledger, request, job_id=job_id, idempotency_key=key or None, turns=self.turns
            )
            made = accepted.id
        self._log(f"    accepted as {made}" + (" and queued for its turn" if accepted.queued else ""))
        STATS.admission["queued at intake"] += accepted.queued
        if made in self.expired and self.redis.exists(keys.job(made)):
            # Its record and key both expired, so genqueue had forgotten the request: a by-name resend
            # (same derived id) is a new job, not the old one brought back.
            self.expired.discard(made)
            self.swept_expired.discard(made)
            self.terminal_seen.pop(made, None)
            self.epoch[made] += 1  # I2: its POST is paid anew, not a second one of the old job
            # A submit message of the old job still undelivered now drives the new one too (same id
            # and generation): a leftover of the by-name id, not a chain genqueue added. I3 counts it
            # as a copy; it costs nothing (the first delivery claims the POST, the other finds it made).
            self.injected[made] += sum(
                1 for m in self.msgs if isinstance(m.action, SubmitLater) and m.action.job_id == made
            )
        ticks: list[Action] = [Admit("trigger", accepted.tick)] if accepted.tick else []
        self._enqueue([SubmitLater(j, 0.0) for j in accepted.to_submit] + ticks)
        self._refresh_known()
        return made

    @precondition(lambda self: "resend" not in OFF and any(r[2] for r in self.requests))
    @rule(pick=st.integers(0, 1000))
    def resend(self, pick: int) -> None:
        """The producer resends a request with the same idempotency key / intake request id (a retry
        after a timeout, a duplicated ``genq.intake`` message)."""
        keyed = [r for r in self.requests if r[2]]
        payload, via, key, first = keyed[pick % len(keyed)]

        def go() -> None:
            idem = keys.idempotency(f"intake:{key}" if via == "intake" else key)
            still = bool(self.redis.exists(idem))
            self.n += 1
            again = self._send_request(payload, via, key, f"{payload['kind']}{self.n}")
            if still:
                check_i0_idempotent(self, key, first, again)
            else:  # the key had expired: the resend is a new request, and later resends must find it
                self.requests[self.requests.index((payload, via, key, first))] = (payload, via, key, again)
            if payload.get("callback"):
                self.with_callback.add(again)

        self._step(f"resend {via} key={key} (first accepted as {first})", go)

    @precondition(lambda self: "train" not in OFF)
    @rule(model=st.sampled_from(MODELS), force=st.booleans())
    def train(self, model: str, force: bool) -> None:
        """A producer asks for a model (``Producer.train_model``): one train task if this call won."""

        def go() -> None:
            gen = self.training.request(model, force=force)
            if gen:
                self.upstream.model_epochs[model] = self.upstream.model_epochs.get(model, 0) + 1
                self._log(f"    request won: epoch {self.upstream.model_epochs[model]}")
                self._enqueue([TrainLater(model, 0.0, gen)])

        self._step(f"train {model} force={force}", go)

    @precondition(lambda self: self.known and "cancel" not in OFF)
    @rule(pick=st.integers(0, 1000))
    def cancel(self, pick: int) -> None:
        """A producer cancels a job (``Producer.cancel``: a callback pending now is sent at once)."""
        ids = self._job_ids()
        job_id = ids[pick % len(ids)]

        def go() -> None:
            rec = self.ledger.get(job_id)
            if control.cancel(self.ledger, job_id):
                top = (rec.parent_id if rec else None) or job_id
                top_rec = self.ledger.get(top)
                if top_rec is not None and top_rec.callback_state == "pending":
                    self._enqueue([Notify(top)])

        self._step(f"cancel {job_id}", go)

    @precondition(
        lambda self: (
            "resubmit" not in OFF and any(r.state is JobState.SUBMIT_UNKNOWN for r in self.records.values())
        )
    )
    @rule(pick=st.integers(0, 1000))
    def resubmit(self, pick: int) -> None:
        """An operator resubmits a ``submit_unknown`` job (``genq resubmit``): a new submit epoch."""
        ids = sorted(j for j, r in self.records.items() if r.state is JobState.SUBMIT_UNKNOWN)
        job_id = ids[pick % len(ids)]

        def go() -> None:
            rec = self.ledger.get(job_id)
            gen = control.resubmit(self.ledger, job_id)
            if gen is not None:
                # A new epoch only when the ledger did not know of an upstream job: resubmitting a
                # job whose upstream id is recorded is not an operator's informed choice.
                if rec is not None and rec.upstream_id:
                    self._log(f"    (the record already held upstream id {rec.upstream_id})")
                else:
                    self.epoch[job_id] += 1
                self.terminal_seen.pop(job_id, None)
                self._enqueue([SubmitLater(job_id, 0.0, gen)])

        self._step(f"resubmit {job_id}", go)

    # ------------------------------------------------------------------ the broker and the workers

    @precondition(lambda self: self.msgs)
    @rule(
        pick=st.integers(0, 1000),
        outcome=st.sampled_from(ANSWERS),
        retry_after=st.sampled_from([1.0, 4.0, 30.0]),
        fate=st.sampled_from(["success", "failed"]),
        duration=st.sampled_from([3.0, 12.0, 40.0, 200.0]),
    )
    def deliver(self, pick: int, outcome: str, retry_after: float, fate: str, duration: float) -> None:
        """A worker takes a message (at or after its ETA, in any order) and runs its step. ``outcome``
        is the class of answer of the step's upstream call (or file GET, or callback send)."""
        m = self._pick_msg(pick)
        self.upstream.fate, self.upstream.duration = fate, duration
        extra = f" [upstream job {fate} after {duration:.0f}s]" if isinstance(m.action, SubmitLater) else ""

        def go() -> None:
            self.msgs.remove(m)
            STATS.deliveries += 1
            self._deliver(m, outcome, retry_after)

        self._step(f"deliver {show(m.action)} answer={outcome}/{retry_after:.0f}s{extra}", go)

    @precondition(lambda self: ADMISSION and any(isinstance(m.action, SubmitLater) for m in self.msgs))
    @rule(pick=st.integers(0, 1000), retry_after=st.sampled_from([1.0, 4.0, 30.0]))
    def deliver_to_full_window(self, pick: int, retry_after: float) -> None:
        """A submit message is taken while the rate window is full: it joins the admission queue. (A
        rule of its own: ``deliver`` draws this answer for one message in nine, mostly not a submit.)"""
        submits = [m for m in self.msgs if isinstance(m.action, SubmitLater)]
        m = submits[pick % len(submits)]

        def go() -> None:
            self.msgs.remove(m)
            STATS.deliveries += 1
            self._deliver(m, "queued", retry_after)

        self._step(f"deliver {show(m.action)} answer=queued/{retry_after:.0f}s", go)

    @precondition(lambda self: self.msgs and "race" not in OFF)
    @rule(
        pick=st.integers(0, 1000),
        other=st.integers(0, 1000),
        racer=st.sampled_from(["message", "cancel", "slow"]),
        outcome=st.sampled_from(ANSWERS),
    )
    def race(self, pick: int, other: int, racer: str, outcome: str) -> None:
        """Two things at once: while a worker's step is inside its upstream call (the upstream has
        acted, the answer is not back), another worker runs a message (``other``, possibly a
        duplicate of the same one), or the producer cancels that job, or the call is slow: it takes
        45 s (past the submit window of connect + read timeout + 5 s), beat sweeps meanwhile and the
        re-driven messages about the same job or model run at once."""
        m = self._pick_msg(pick)

        def meanwhile() -> None:
            if racer == "cancel":
                target = subject(m.action)
                self._log(f"    meanwhile: cancel {target}")
                if control.cancel(self.ledger, target):
                    rec = self.ledger.get(target)
                    top = (rec.parent_id if rec else None) or target
                    top_rec = self.ledger.get(top)
                    if top_rec is not None and top_rec.callback_state == "pending":
                        self._enqueue([Notify(top)])
            elif racer == "slow":
                self._log("    meanwhile: 45 s pass; sweep; run what it re-drove for the same subject")
                self._advance(45.0)
                self._outcome("ok")
                for a in self.sweeper.sweep()[0]:
                    if subject(a) == subject(m.action):
                        self._log(f"    meanwhile: deliver {show(a)} answer=ok")
                        self._enqueue(self._run(a))
                    else:
                        self._enqueue([a])
            elif self.msgs:
                o = self._pick_msg(other)
                self.msgs.remove(o)
                self._log(f"    meanwhile: deliver {show(o.action)} answer=ok")
                self._outcome("ok")
                self._enqueue(self._run(o.action))

        def go() -> None:
            self.msgs.remove(m)
            if m.eta > self.clock.now:
                self._advance(m.eta - self.clock.now)
            self.upstream.during = meanwhile
            try:
                self._outcome(outcome)
                actions = self._run(m.action)
            finally:
                self.upstream.during = None
            self._log("    (first step returns)")
            self._enqueue(actions)

        self._step(f"race {show(m.action)} answer={outcome} against {racer}", go)

    @precondition(lambda self: self.msgs)
    @rule(pick=st.integers(0, 1000))
    def duplicate(self, pick: int) -> None:
        """The broker will deliver a message twice (redelivery after a visibility timeout)."""
        m = self._pick_msg(pick)

        def go() -> None:
            self.injected[subject(m.action)] += 1
            self.seq += 1
            self.msgs.append(Msg(m.action, m.eta, self.seq, m.sent, copy=True))
            self.msgs.sort(key=lambda x: (x.eta, x.seq))

        self._step(f"duplicate {show(m.action)}", go)

    @precondition(lambda self: self.msgs)
    @rule(pick=st.integers(0, 1000))
    def lose(self, pick: int) -> None:
        """A message is lost (a broker restart without persistence, a purge)."""
        m = self._pick_msg(pick)
        self._step(f"lose {show(m.action)}", lambda: self.msgs.remove(m))

    @precondition(lambda self: any(isinstance(m.action, PollLater) for m in self.msgs))
    @rule(pick=st.integers(0, 1000))
    def lose_poll(self, pick: int) -> None:
        """A poll message is lost. A rule of its own: ``lose`` picks from every message, and the queue
        holds mostly submits and training calls, so it lost no poll in a whole long run."""
        polls = [m for m in self.msgs if isinstance(m.action, PollLater)]
        m = polls[pick % len(polls)]
        self._step(f"lose {show(m.action)}", lambda: self.msgs.remove(m))

    @precondition(lambda self: ADMISSION)
    @rule(seconds=st.sampled_from([4.0, 30.0]))
    def upstream_closes(self, seconds: float) -> None:
        """Another worker got a 429: the limiter closes the upstream for every worker (``block``).
        Ticks meanwhile grant nothing and schedule themselves for its end, so the queue outlives them
        (a rule of its own: a 429 answer to a step of this model is rare)."""
        limiter = self.upstream.limiter
        assert limiter is not None
        self._step(
            f"the upstream closes for {seconds:.0f}s (a 429 elsewhere)", lambda: limiter.block(seconds)
        )

    @precondition(lambda self: ADMISSION and "losequeue" not in OFF)
    @rule()
    def lose_queue(self) -> None:
        """The admission queue is lost (a failover to a replica that missed it, a flush): its queued
        submits, turns granted and tick token are gone; the ledger is not. ``JobService._queue`` holds
        each queued job in the due index for this: the sweeper sends it again after its hold."""

        def go() -> None:
            gone = [k.decode() for k in self.redis.keys(f"{keys.PREFIX}:admit:*")]
            STATS.admission["queue lost"] += bool(gone)
            if gone:
                self.redis.delete(*gone)
            self._log(f"    deleted {sorted(gone)}")

        self._step("lose the admission queue", go)

    @precondition(lambda self: self.msgs and "crash" not in OFF)
    @rule(
        pick=st.integers(0, 1000),
        writes=st.sampled_from([99, 1, 2, 3, 4]),
        redelivered=st.booleans(),
        outcome=st.sampled_from(ANSWERS),
    )
    def crash(self, pick: int, writes: int, redelivered: bool, outcome: str) -> None:
        """A worker dies while running a message: before its ``writes``-th Redis write (99: after all
        of them, before it published its next messages). With acks_late the message is redelivered,
        unless the broker lost it too."""
        m = self._pick_msg(pick)
        where = "after its writes" if writes == 99 else f"before Redis write #{writes}"

        def go() -> None:
            self.msgs.remove(m)
            try:
                with self.fuse.armed(None if writes == 99 else writes):
                    if m.eta > self.clock.now:
                        self._advance(m.eta - self.clock.now)
                    self._outcome(outcome)
                    self._run(m.action)
            except WorkerDied:
                self._log("    (died)")
            if redelivered:
                self.injected[subject(m.action)] += 1
                self._enqueue([m.action], copy=True)

        verb = "redelivered" if redelivered else "lost"
        self._step(f"crash {show(m.action)} answer={outcome} {where}; message {verb}", go)

    @rule()
    def sweep(self) -> None:
        """Beat runs the sweeper."""

        def go() -> None:
            actions, _ = self.sweeper.sweep()
            self._check_swept(actions)
            self._enqueue(actions)
            self.swept_expired |= self.expired  # each sweep trims what had expired by then

        self._step("sweep", go)

    def _check_swept(self, actions: list[Action]) -> None:
        """I13: a poll (of a job or a model) the sweeper sends waits at most the look-ahead: a held
        wait stays in Redis until then, never a long countdown in a worker."""
        chains = PollLater | SubmitLater | PollModelLater | TrainLater
        STATS.ahead += sum(1 for a in actions if isinstance(a, chains) and a.delay > 0)
        for a in actions:
            if isinstance(a, PollLater | PollModelLater) and a.delay > AHEAD and "I13" not in self.skip:
                self.fail("I13 short sweep countdowns", f"{show(a)} waits past the look-ahead ({AHEAD} s)")

    @rule(seconds=st.sampled_from([0.5, 2.0, 6.0, 20.0, 90.0, 700.0, 4000.0]))
    def tick(self, seconds: float) -> None:
        """Time passes."""
        self._step(f"tick {seconds:.1f}s", lambda: self._advance(seconds))

    # ------------------------------------------------------------------ invariants (every step)

    def _refresh_known(self) -> None:
        for raw in self.redis.zrange(keys.JOBS, 0, -1):
            job_id = raw.decode()
            if job_id not in self.known and job_id not in self.expired:
                rec = self.ledger.get(job_id)
                if rec is not None:
                    self.known[job_id] = rec
                    STATS.jobs += 1

    def _snapshot(self) -> None:
        self._refresh_known()
        self.records = {}
        for job_id in list(self.known):
            if job_id in self.expired:
                continue
            rec = self.ledger.get(job_id)
            if rec is not None:
                self.records[job_id] = rec
                self.known[job_id] = rec
        self.model_records = {}
        for model in MODELS:
            mrec = self.models.get(model, history=0)
            if mrec is not None:
                self.model_records[model] = mrec

    @invariant()
    def step_invariants(self) -> None:
        try:
            self._track_ttls()
            self._snapshot()
            for name, check in STEP_CHECKS:
                if name not in self.skip:
                    check(self)
        except BaseException:
            self.failed = True
            raise

    def fail(self, name: str, message: str) -> None:
        self.failed = True
        full = os.environ.get("GENQ_MODEL_TRACE")  # a file for the whole trace of a failure
        if full:
            Path(full).write_text("\n".join(self.trace) + "\n")
        lines = self.trace if len(self.trace) <= 120 else [*self.trace[:60], "...", *self.trace[-60:]]
        tail = "\n".join(lines)
        raise InvariantBroken(f"{name}: {message}\n--- steps (fake time since start) ---\n{tail}")

    # ------------------------------------------------------------------ quiesce (teardown)

    def teardown(self) -> None:
        if self.failed:
            return
        self._log("=== quiesce: faults off; deliver everything, sweep, let time pass ===")
        self._outcome("ok")
        self.upstream.fate, self.upstream.duration = "success", 3.0
        start = self.clock.now
        last_change, fingerprint = start, None
        for _ in range(QUIESCE_ROUNDS):
            while self.msgs and self.msgs[0].eta <= self.clock.now:
                m = self.msgs.pop(0)
                self._log(f"deliver {show(m.action)}")
                STATS.quiesce_deliveries += 1
                self._deliver(m)
            self._log("sweep")
            actions, _ = self.sweeper.sweep()
            self._check_swept(actions)
            self._enqueue(actions)
            if self.msgs and self.msgs[0].eta <= self.clock.now:
                continue
            self._track_ttls()
            self._snapshot()
            if self._settled():
                break
            now_print = self._fingerprint()
            if now_print != fingerprint:
                fingerprint, last_change = now_print, self.clock.now
            elif self.clock.now - last_change > STALL_SECONDS:
                self._log(f"(nothing moved for {STALL_SECONDS:.0f}s: stuck)")
                break
            nxt = self._next_event()
            target = max(self.clock.now + 0.5, nxt if nxt is not None else self.clock.now + 5.0)
            if target - start > QUIESCE_SECONDS:
                break
            self._log(f"tick {target - self.clock.now:.1f}s")
            self._advance(target - self.clock.now)
        self._track_ttls()
        self._snapshot()
        for name, check in STEP_CHECKS + END_CHECKS:
            if name not in self.skip:
                check(self)
        for rec in self.records.values():
            STATS.end_states[rec.state.value] += 1

    def _fingerprint(self) -> tuple[Any, ...]:
        """What progress changes: states, upstream checks made, files, callbacks, model checks."""
        jobs = sorted(
            (j, r.state, r.polls, r.submit_attempts, len(r.outputs), r.callback_state, r.callback_attempts)
            for j, r in self.records.items()
        )
        models = sorted((k, r.state, r.checks, r.errors_in_row) for k, r in self.model_records.items())
        return (tuple(jobs), tuple(models), len(self.msgs))

    def _settled(self) -> bool:
        if self.msgs:
            return False
        if any(not r.terminal or r.callback_state == "pending" for r in self.records.values()):
            return False
        return not any(m.state.in_progress for m in self.model_records.values())

    def _next_event(self) -> float | None:
        times = [m.eta for m in self.msgs]
        for index in (keys.DUE, keys.CALLBACKS_DUE, keys.MODELS_DUE):
            first = self.redis.zrange(index, 0, 0, withscores=True)
            if first:
                times.append(float(first[0][1]))
        times += [j.done_at for j in self.upstream.jobs.values()]
        times += [m.ready_at for m in self.upstream.models.values()]
        later = [t for t in times if t > self.clock.now]
        return min(later) if later else None


# ---------------------------------------------------------------------------------------- the checks


def check_i0_idempotent(m: GenqMachine, key: str, first: str, again: str) -> None:
    """I0: a request resent with the same idempotency key (or intake request id) while the key is
    still recorded is the same job: the same id comes back and nothing new is created."""
    if "I0" not in m.skip and first != again:
        m.fail("I0 idempotency", f"key {key} first made job {first}, the resend made {again}")


def check_i2_one_paid_post(m: GenqMachine) -> None:
    """I2: at most one paid trigger POST per job and submit epoch (the upstream acted on it: answered,
    timed out after acting, or answered garbage), unless ``api.submit_at_least_once``. An operator's
    resubmit of a ``submit_unknown`` job starts a new epoch, unless the record already held the
    upstream job id (then the system knew the first POST had been acted on)."""
    if m.settings.api.submit_at_least_once:
        return
    acted = Counter((p.subject, p.epoch) for p in m.upstream.posts if p.acted)
    for (job_id, epoch), count in acted.items():
        if count > 1:
            calls = [
                f"{p.outcome}@t+{p.at - m.world.start:.1f}" for p in m.upstream.posts if p.subject == job_id
            ]
            m.fail("I2 one paid POST", f"job {job_id} epoch {epoch}: {count} paid POSTs ({calls})")


def _live(m: GenqMachine, msg: Msg) -> str | None:
    """The subject a pending message would still drive if delivered now (None: a no-op)."""
    a = msg.action
    if isinstance(a, SubmitLater | PollLater):
        rec = m.records.get(a.job_id)
        if rec is None:
            return None
        if isinstance(a, SubmitLater):
            # A submit of an older step generation finds itself stale (a pending job's chain).
            live = rec.state is JobState.SUBMITTING or (
                rec.state is JobState.PENDING and rec.poll_gen == a.gen
            )
            return a.job_id if live else None
        return a.job_id if rec.state in POLLING_STATES and rec.poll_gen == a.gen else None
    if isinstance(a, TrainLater | PollModelLater):
        mrec = m.model_records.get(a.model_id)
        if mrec is None:
            return None
        if isinstance(a, TrainLater):
            return a.model_id if mrec.state is ModelState.REQUESTED and mrec.poll_gen == a.gen else None
        return a.model_id if mrec.state is ModelState.TRAINING and mrec.poll_gen == a.gen else None
    return None


def check_i3_bounded_messages(m: GenqMachine) -> None:
    """I3: per job (and per model) at most LIVE_BOUND (3) *live* driver messages are in flight, plus
    one per duplicate/redelivery the model itself injected for it. A driver is a submit or poll message
    (train or model poll for a model) that would act if delivered now: a submit while the job is
    pending/submitting, a poll of the current poll generation. Stale messages are harmless no-ops and
    not counted; retries, re-drives and throttled waits must replace a chain, never add one."""
    live = Counter(s for s in (_live(m, msg) for msg in m.msgs) if s)
    for subj, count in live.items():
        if count > LIVE_BOUND + m.injected[subj]:
            shown = [show(x.action) for x in m.msgs if _live(m, x) == subj]
            m.fail(
                "I3 bounded messages",
                f"{subj}: {count} live messages (bound {LIVE_BOUND} + {m.injected[subj]} injected): {shown}",
            )


def check_i3_one_submit_chain(m: GenqMachine) -> None:
    """I3 (submits): a pending job has at most one live submit message (of its current step
    generation), plus one per duplicate the model injected. Each step generation is sent at most
    once (a retry, a re-drive, a budget wait, an admission grant all start a new one), so a second
    live message is a second chain: a grant must replace the job's chain, never add one."""
    live = Counter(
        msg.action.job_id
        for msg in m.msgs
        if isinstance(msg.action, SubmitLater)
        and (rec := m.records.get(msg.action.job_id)) is not None
        and rec.state is JobState.PENDING
        and rec.poll_gen == msg.action.gen
    )
    for job_id, count in live.items():
        if count > 1 + m.injected[job_id]:
            shown = [
                show(x.action)
                for x in m.msgs
                if isinstance(x.action, SubmitLater) and x.action.job_id == job_id
            ]
            m.fail(
                "I3 bounded messages",
                f"pending {job_id}: {count} live submit messages "
                f"(bound 1 + {m.injected[job_id]} injected): {shown}",
            )


def check_i11_one_admission_tick(m: GenqMachine) -> None:
    """I11: one admission tick chain (docs/design.md: "guarded by a token in Redis so a superseded or
    duplicated chain stops"). The ``Admit`` messages still live (their token is the one scheduled in
    Redis; any other token's tick does nothing) are one, plus the injected copies (duplicates,
    redeliveries) not yet run: once a copy or its original has run, the other must find itself
    superseded, not go on as a second chain."""
    token = m.redis.get(TICK_KEY)
    if token is None:
        return
    live = [msg for msg in m.msgs if isinstance(msg.action, Admit) and msg.action.token == token.decode()]
    copies = sum(msg.copy for msg in live)
    if len(live) > 1 + copies:
        m.fail(
            "I11 one admission tick",
            f"{len(live)} live ticks (bound 1 + {copies} injected copies not yet run): "
            f"{[show(x.action) for x in live]}",
        )


def check_i12_live_jobs_are_swept(m: GenqMachine) -> None:
    """I12: every job not ended is in the due index, the sweeper's net: whatever is lost (a message,
    a tick, the admission queue, a worker mid-step), the sweeper finds the job there and drives it on.
    Every step writes a job's state and its due time in one script, so there is no moment between."""
    pipe = m.redis.pipeline()
    live = [j for j, r in m.records.items() if not r.terminal]
    for job_id in live:
        pipe.zscore(keys.DUE, job_id)
    lost = [j for j, score in zip(live, pipe.execute(), strict=True) if score is None]
    if lost:
        details = {j: (m.records[j].state.value, m.records[j].poll_gen) for j in lost}
        m.fail("I12 live jobs are swept", f"not in {keys.DUE}: {details}")


def _sha(m: GenqMachine, path: Path) -> str:
    st_ = path.stat()
    key = (str(path), st_.st_mtime, st_.st_size)
    if key not in m._hash_cache:
        m._hash_cache[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return m._hash_cache[key]


def check_i6_whole_files(m: GenqMachine) -> None:
    """I6: every output recorded in the ledger exists on disk with the recorded size and sha256, which
    is the sha256 of the whole file the upstream served; no final path (a name not starting with a
    dot) ever holds a partial file."""
    for rec in m.records.values():
        for out in rec.outputs:
            p = Path(out.path)
            if not p.is_file():
                m.fail("I6 whole files", f"job {rec.id} output {out.index}: {p} does not exist")
            if p.stat().st_size != out.bytes or _sha(m, p) != out.sha256:
                m.fail("I6 whole files", f"job {rec.id} output {out.index}: {p} differs from its record")
            if out.sha256 not in m.files.full_hashes:
                m.fail("I6 whole files", f"job {rec.id} output {out.index}: recorded a partial file")
    for p in m.world.download_dir.rglob("*"):
        if p.is_file() and not p.name.startswith(".") and _sha(m, p) not in m.files.full_hashes:
            m.fail("I6 whole files", f"{p} is at its final path but is not a whole served file")


def check_i7_keys_and_indexes(m: GenqMachine) -> None:
    """I7: each job has at most 2 keys (its record and its URLs), and once a sweep has run after a
    record expired, no index (``genq:jobs``, ``genq:due``, ``genq:callbacks:due``) holds its id: the
    sweeper trims them, so every index stays bounded by the records alive."""
    per_job = Counter()
    for raw in m.redis.keys(f"{keys.JOB_PREFIX}*"):
        per_job[raw.decode()[len(keys.JOB_PREFIX) :].split(":", 1)[0]] += 1
    for job_id, count in per_job.items():
        if count > 2:
            m.fail("I7 keys", f"job {job_id} has {count} keys")
    for index in (keys.JOBS, keys.DUE, keys.CALLBACKS_DUE):
        ids = [raw.decode() for raw in m.redis.zrange(index, 0, -1)]
        pipe = m.redis.pipeline()
        for job_id in ids:
            pipe.exists(keys.job(job_id))
        dangling = [
            j for j, there in zip(ids, pipe.execute(), strict=True) if not there and j in m.swept_expired
        ]
        if dangling:
            m.fail("I7 indexes", f"{index} holds {dangling} whose records have expired")


def check_i8_one_train_call(m: GenqMachine) -> None:
    """I8: at most one paid train call per model request (a request that won ``TrainingService.request``;
    ``force=True`` makes a new request): counted when the upstream acted on it."""
    acted = Counter((t.subject, t.epoch) for t in m.upstream.trains if t.acted)
    for (model, epoch), count in acted.items():
        if count > 1:
            calls = [
                f"{t.outcome}@t+{t.at - m.world.start:.1f}" for t in m.upstream.trains if t.subject == model
            ]
            m.fail("I8 one train call", f"model {model} request #{epoch}: {count} train calls ({calls})")


def check_i9_terminal_is_final(m: GenqMachine) -> None:
    """I9: a terminal state never changes again (README: "Terminal states never change again"), except
    an operator's resubmit of a ``submit_unknown`` job."""
    for job_id, rec in m.records.items():
        seen = m.terminal_seen.get(job_id)
        if seen is not None and rec.state is not seen:
            m.fail("I9 terminal is final", f"job {job_id} went from {seen.value} to {rec.state.value}")
        if rec.terminal:
            m.terminal_seen[job_id] = rec.state


def check_i1_all_end(m: GenqMachine) -> None:
    """I1 (after quiesce): every accepted job (workflow steps included) is in a terminal state, with a
    non-empty reason unless it succeeded. A record that expired was terminal when it did."""
    stuck = {j: r.state.value for j, r in m.records.items() if not r.terminal}
    if stuck:
        details = {
            j: (r.state.value, r.kind.value, r.model_id, r.poll_gen, r.error)
            for j, r in m.records.items()
            if not r.terminal
        }
        m.fail("I1 every job ends", f"not terminal after {QUIESCE_SECONDS:.0f}s without faults: {details}")
    for job_id, rec in m.known.items():
        if rec.terminal and rec.state is not JobState.SUCCEEDED and not (rec.error or "").strip():
            m.fail("I1 every job ends", f"job {job_id} ended {rec.state.value} without a reason")


def check_i1_only_ended_records_expire(m: GenqMachine) -> None:
    """I1 (every step): a record leaves Redis only after its job ended; a live job whose record
    expired would be lost without a trace."""
    for job_id in m.expired:
        last = m.known.get(job_id)
        if last is not None and not last.terminal:
            m.fail("I1 every job ends", f"the record of {job_id} expired while {last.state.value}")


def check_i4_parked_released(m: GenqMachine) -> None:
    """I4 (after quiesce): no job is still parked on a model that has ended (ready, failed, timed out),
    and a model's parked set is empty once it ended."""
    for job_id, rec in m.records.items():
        if rec.state is JobState.PARKED:
            model = m.model_records.get(rec.model_id or "")
            state = model.state.value if model else "unknown"
            m.fail("I4 parked released", f"job {job_id} still parked on model {rec.model_id} ({state})")
    for model_id, mrec in m.model_records.items():
        if not mrec.state.in_progress and mrec.parked:
            m.fail(
                "I4 parked released", f"model {model_id} {mrec.state.value} still has {mrec.parked} parked"
            )


def check_i5_callbacks(m: GenqMachine) -> None:
    """I5 (after quiesce): every job submitted with a callback had it delivered, and the last delivery
    carries the job's final state and reason, under the delivery id of this ending (a job's record
    expiring first is a lost callback). Every delivery reports a terminal state. A callback given up
    after ``callbacks.max_attempts`` failed attempts (``callback_failed``, documented) is accepted,
    also once its record has expired (its TTL starts when the callback is settled)."""
    by_job: dict[str, list[dict[str, Any]]] = {}
    for sent in m.sink.sent:
        by_job.setdefault(sent.record["id"], []).append(sent.record)
        if not JobState(sent.record["state"]).terminal:
            m.fail("I5 callbacks", f"job {sent.record['id']} called back while {sent.record['state']}")
    for job_id in sorted(m.with_callback):
        rec = m.records.get(job_id) or m.known.get(job_id)
        if rec is None:
            continue
        if rec.callback_state == "failed":
            # Given up (documented). The record's TTL starts then, so it may have expired since:
            # ``known`` holds its state when it did.
            continue
        got = by_job.get(job_id, [])
        if rec.callback_id:
            # Only a delivery of this ending counts: not one of an earlier ending (before a
            # resubmit) or of an earlier job that had the same id (a reborn by-name id).
            got = [sent for sent in got if sent["delivery_id"] == rec.callback_id]
        if not got:
            where = "record expired" if job_id in m.expired else f"callback_state={rec.callback_state}"
            m.fail(
                "I5 callbacks", f"job {job_id} ended {rec.state.value}: callback never delivered ({where})"
            )
        last = got[-1]
        if last["state"] != rec.state.value or last["reason"] != rec.error:
            m.fail(
                "I5 callbacks",
                f"job {job_id} ended {rec.state.value} ({rec.error!r}) but its last callback said "
                f"{last['state']} ({last['reason']!r}); callback_state={rec.callback_state}",
            )


def check_i10_budget_caps(m: GenqMachine) -> None:
    """I10: no paid POST past a spend budget: the trigger POSTs the upstream acted on within one budget
    window (the total's day, ``GENQ_BUDGETS_TOTAL``) never outnumber its cap, whatever races, crashes
    and redeliveries; a job held back ends ``rejected`` with the budget named (I1 sees it end)."""
    cap = m.settings.budgets.total.triggers_per_day
    if cap is None:
        return
    per_day = Counter(int(p.at // 86400) for p in m.upstream.posts)
    for day, count in per_day.items():
        if count > cap:
            m.fail("I10 budget caps", f"{count} paid POSTs in day window {day}, cap {cap}")


def check_i14_spend_settles(m: GenqMachine) -> None:
    """I14: spend is accounted for. Once every job has ended, no budget window still holds a charge
    whose POST was not answered (``pt``, and ``pc`` where kept, back to 0), none was made without its
    TTL, and the total's day windows have charged at least every POST the upstream acted on (a refund
    only gives back a POST surely not acted on)."""
    charged = 0.0
    for key in m.redis.scan_iter(match=keys.SPEND_PREFIX + "*"):
        window = {k.decode(): float(v) for k, v in m.redis.hgetall(key).items()}
        if abs(window.get("pt", 0.0)) > 1e-9 or abs(window.get("pc", 0.0)) > 1e-9:
            m.fail("I14 spend settles", f"{key.decode()} still holds unanswered charges: {window}")
        if m.redis.ttl(key) < 0:
            m.fail("I14 spend settles", f"{key.decode()} has no TTL: {window}")
        if key.decode().startswith(keys.spend(keys.TOTAL_SCOPE, "d", 0)[:-1]):
            charged += window.get("t", 0.0)
    if m.settings.budgets.total.triggers_per_day is not None:
        acted = sum(1 for p in m.upstream.posts if p.acted)
        if charged < acted:
            m.fail("I14 spend settles", f"{acted} POSTs acted on, {charged:.0f} charged to the total's days")


def check_i15_counts(m: GenqMachine) -> None:
    """I15: the per-state counts (``genq:counts``, one count per move) hold exactly the jobs in each
    live state, and at least the records still there in each ended one (an ended record expires)."""
    counts = state_counts(m.redis.hgetall(keys.COUNTS))
    there = Counter(f"{r.kind.value}:{r.state.value}" for r in m.records.values())
    for pair in sorted(set(counts) | set(there)):
        n, records = counts.get(pair, 0), there[pair]
        if n != records and (n < records or not JobState(pair.split(":", 1)[1]).terminal):
            m.fail("I15 counts", f"{pair}: counted {n}, {records} records in it")


STEP_CHECKS = [
    ("I1", check_i1_only_ended_records_expire),
    ("I2", check_i2_one_paid_post),
    ("I3", check_i3_bounded_messages),
    ("I3", check_i3_one_submit_chain),
    ("I6", check_i6_whole_files),
    ("I7", check_i7_keys_and_indexes),
    ("I8", check_i8_one_train_call),
    ("I9", check_i9_terminal_is_final),
    ("I10", check_i10_budget_caps),
    ("I11", check_i11_one_admission_tick),
    ("I12", check_i12_live_jobs_are_swept),
    ("I15", check_i15_counts),
]
END_CHECKS = [
    ("I1", check_i1_all_end),
    ("I4", check_i4_parked_released),
    ("I5", check_i5_callbacks),
    ("I14", check_i14_spend_settles),
]

__all__ = ["ACTED", "STATS", "UUIDS", "GenqMachine", "InvariantBroken", "World"]
