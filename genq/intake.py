"""Accepting requests into the ledger: shared by the Python producer, the by-name intake task and
workflows, so every way in validates and records a job the same way."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from genq.callbacks import check_callback
from genq.errors import InvalidRequest
from genq.ledger import Ledger
from genq.limits import UpstreamLimiter
from genq.schemas import (
    DEFAULT_PRODUCER,
    REQUEST_ADAPTER,
    ImageRequest,
    JobKind,
    JobState,
    Lane,
    OnBudget,
    UpscaleRequest,
    VideoRequest,
    WorkflowRequest,
)
from genq.settings import BudgetSettings, Settings

JobRequest = ImageRequest | UpscaleRequest | VideoRequest
AnyRequest = JobRequest | WorkflowRequest
_NAMESPACE = uuid.UUID("6f1c9a52-3b7e-4d0a-9c55-2f8e4b1d7a10")


@dataclass(frozen=True)
class Accepted:
    """A recorded request: its id, whether it is new, and the jobs ready to be submitted now."""

    id: str
    created: bool
    state: JobState | None
    to_submit: list[str] = field(default_factory=list)
    queued: bool = False
    """The job waits in the admission queue for its turn (see :class:`TurnQueue`): no submit to send."""
    tick: str | None = None
    """A new admission tick's token, to send as its first message: the job was queued for its turn
    (see :class:`TurnQueue`) and no tick was scheduled."""


@dataclass(frozen=True)
class TurnQueue:
    """Queues a new job for its turn at the rate limit, with no message, when submits of its lane (or
    a higher one) are already waiting theirs. A backlog of thousands then waits in Redis: not in the
    broker, where each message would cost a worker step only to be queued, ahead of interactive work."""

    limiter: UpstreamLimiter
    fair_shares: bool = True

    def turn_in(self, request: JobRequest) -> float | None:
        """About how long until its turn, when it is to queue; None when it is to be sent."""
        if request.model_id is not None:  # it may wait for its model first
            return None
        return self.limiter.waiting_ahead("trigger", (request.lane or Lane.INTERACTIVE).value)

    def park(self, job_id: str, request: JobRequest) -> str | None:
        producer = (request.producer if self.fair_shares else None) or DEFAULT_PRODUCER
        lane = (request.lane or Lane.INTERACTIVE).value
        return self.limiter.park("trigger", job_id, 0, lane, producer)


def validate(data: Mapping[str, Any]) -> AnyRequest:
    """Parse a JSON request (with its ``kind``); raise :class:`InvalidRequest` naming each problem."""
    try:
        return REQUEST_ADAPTER.validate_python(dict(data))
    except ValidationError as exc:
        raise InvalidRequest(describe(exc)) from None


def describe(exc: ValidationError) -> str:
    """One readable line per problem: ``field: message``."""
    problems = []
    for err in exc.errors():
        # Drop the discriminator tag ("image", "upscale"...) pydantic puts first in union paths.
        loc = [str(p) for p in err["loc"] if str(p) not in JobKind._value2member_map_]
        problems.append(f"{'.'.join(loc) or 'request'}: {err['msg']}")
    return "invalid request: " + "; ".join(problems)


def job_id_for(request_id: str) -> str:
    """The job id of a by-name intake request: derived from its request id, so the sender knows it."""
    return uuid.uuid5(_NAMESPACE, request_id).hex


def routed(request: AnyRequest, budgets: BudgetSettings | None, producer: str | None = None) -> AnyRequest:
    """The request with its producer, lane and ``on_budget`` filled in: from the request, else the
    producer's policy in the settings, else ``default``, ``interactive`` and ``reject``."""
    name = request.producer or producer or DEFAULT_PRODUCER
    policy = budgets.policy(name) if budgets is not None else None
    return request.model_copy(
        update={
            "producer": name,
            "lane": request.lane or Lane(policy.lane if policy else Lane.INTERACTIVE),
            "on_budget": request.on_budget or OnBudget(policy.on_budget if policy else OnBudget.REJECT),
        }
    )


def accept(
    ledger: Ledger,
    request: AnyRequest,
    *,
    job_id: str | None = None,
    idempotency_key: str | None = None,
    parent_id: str | None = None,
    turns: TurnQueue | None = None,
) -> Accepted:
    """Write the job (or workflow and its first step) to the ledger. Sends nothing. A request not yet
    :func:`routed` gets the defaults (producer ``default``, lane ``interactive``). With ``turns``, a
    job whose lane has submits waiting at the rate limit is queued behind them instead of submitted."""
    job_id = job_id or uuid.uuid4().hex
    if isinstance(request, WorkflowRequest):
        return _accept_workflow(ledger, request, job_id, idempotency_key)
    turn_in = turns.turn_in(request) if turns is not None else None
    created = ledger.create(
        job_id,
        JobKind(request.kind),
        request.upstream_body(),
        expected_outputs=request.expected_outputs,
        idempotency_key=idempotency_key,
        model_id=request.model_id,
        parent_id=parent_id,
        callback=request.callback.model_dump() if request.callback else None,
        routing=_routing(request),
        turn_in=turn_in,
    )
    if turns is not None and turn_in is not None and created.created and created.state is JobState.PENDING:
        return Accepted(created.id, True, created.state, queued=True, tick=turns.park(created.id, request))
    ready = [created.id] if created.state is JobState.PENDING else []
    return Accepted(created.id, created.created, created.state, ready)


def _accept_workflow(
    ledger: Ledger, request: WorkflowRequest, job_id: str, idempotency_key: str | None
) -> Accepted:
    created = ledger.create(
        job_id,
        JobKind.WORKFLOW,
        request.model_dump(mode="json", exclude_none=True, exclude={"callback"}),
        expected_outputs=request.expected_outputs,
        idempotency_key=idempotency_key,
        callback=request.callback.model_dump() if request.callback else None,
        routing=_routing(request),
    )
    if not created.created:
        # A retry of a request whose first try failed half-way (Redis went away after the workflow
        # was written): finish what it began rather than hand back a workflow that never starts.
        earlier = ledger.get(created.id)
        if earlier is not None and earlier.kind is JobKind.WORKFLOW and earlier.state is JobState.PENDING:
            return Accepted(created.id, False, None, start_workflow(ledger, earlier.id, request))
        return Accepted(created.id, False, None)
    return Accepted(job_id, True, JobState.RUNNING, start_workflow(ledger, job_id, request))


def start_workflow(ledger: Ledger, workflow_id: str, request: WorkflowRequest) -> list[str]:
    """Record a pending workflow's first step and set it running; returns the jobs to submit. Safe to
    repeat: the step is keyed on the workflow id, so a second call never makes two."""
    generate = request.generate.model_copy(update=_routing(request))
    step = accept(ledger, generate, idempotency_key=f"{workflow_id}:generate", parent_id=workflow_id)
    ledger.transition(workflow_id, [JobState.PENDING], JobState.RUNNING, children=[step.id])
    if step.created:
        return step.to_submit
    made = ledger.get(step.id)  # made by the try that failed half-way
    return [step.id] if made is not None and made.state is JobState.PENDING else []


def _routing(request: AnyRequest) -> dict[str, Any]:
    return {
        "producer": request.producer or DEFAULT_PRODUCER,
        "lane": request.lane or Lane.INTERACTIVE,
        "on_budget": request.on_budget or OnBudget.REJECT,
    }


def intake(
    ledger: Ledger, payload: Any, request_id: str, settings: Settings, turns: TurnQueue | None = None
) -> Accepted:
    """The by-name intake task's step, for producers in other languages: validate and record (see
    :func:`accept`). The job id is :func:`job_id_for` the request id, so a resent request is one
    job, and a request that fails validation is recorded ``failed`` with the reason, never dropped."""
    job_id = job_id_for(str(request_id))
    try:
        if not isinstance(payload, dict):
            raise InvalidRequest("invalid request: expected a JSON object")
        request = validate(payload)
        check_callback(request.callback, settings)
    except InvalidRequest as exc:
        kind = str(payload.get("kind")) if isinstance(payload, dict) else ""
        created = ledger.create(
            job_id,
            JobKind(kind) if kind in JobKind._value2member_map_ else JobKind.IMAGE,
            {"rejected": True},
            expected_outputs=0,
            idempotency_key=f"intake:{request_id}",
        )
        if created.created:
            ledger.transition(job_id, [JobState.PENDING], JobState.FAILED, error=str(exc))
        return Accepted(created.id, created.created, None)
    request = routed(request, settings.budgets)
    return accept(ledger, request, job_id=job_id, idempotency_key=f"intake:{request_id}", turns=turns)
