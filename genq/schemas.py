"""Typed models at every boundary: producer requests, upstream payloads, and the job record."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    field_validator,
    model_validator,
)

from genq.errors import ProtocolError


class JobKind(StrEnum):
    """What a job asks the upstream for."""

    IMAGE = "image"  # POST /images/generation
    UPSCALE = "upscale"  # POST /images/upscaling
    VIDEO = "video"  # POST /videos/generation
    WORKFLOW = "workflow"  # generate, then upscale every output: a parent of ordinary jobs


class JobState(StrEnum):
    """Where a job is in genqueue's ledger. Terminal states never change again."""

    PARKED = "parked"  # waits for its model's training; released (-> pending) when the model is ready
    PENDING = "pending"  # accepted and recorded; submit task sent
    SUBMITTING = "submitting"  # a worker is making the paid POST
    SUBMITTED = "submitted"  # upstream accepted it; polling
    RUNNING = "running"  # upstream reported queued/running; polling
    DOWNLOADING = "downloading"  # upstream succeeded; fetching outputs
    SUCCEEDED = "succeeded"  # every output is on disk, hash recorded
    FAILED = "failed"  # upstream or genqueue gave up; see ``error``
    TIMED_OUT = "timed_out"  # the poll deadline passed
    CANCELLED = "cancelled"  # a producer cancelled it
    SUBMIT_UNKNOWN = "submit_unknown"  # a submit was interrupted mid-POST; not retried to avoid paying twice
    REJECTED = "rejected"  # never sent: it would have passed a spend budget; ``error`` names the budget

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.TIMED_OUT,
        JobState.CANCELLED,
        JobState.SUBMIT_UNKNOWN,
        JobState.REJECTED,
    }
)
POLLING_STATES = frozenset({JobState.SUBMITTED, JobState.RUNNING})


class UpstreamStatus(StrEnum):
    """The upstream's job status, compared lower-cased."""

    CREATED = "created"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"

    @property
    def working(self) -> bool:
        return self in (UpstreamStatus.CREATED, UpstreamStatus.QUEUED, UpstreamStatus.RUNNING)


class Lane(StrEnum):
    """Which queue a job's steps wait in: interactive work goes ahead of any batch backlog."""

    INTERACTIVE = "interactive"  # someone is waiting for it
    BATCH = "batch"  # backfills and bulk work; a reserved share of the upstream rate keeps it moving


class OnBudget(StrEnum):
    """What happens to a job that would pass a spend budget."""

    REJECT = "reject"  # it ends ``rejected`` with the budget named, never sent
    WAIT = "wait"  # it stays pending until the budget's next window starts


DEFAULT_PRODUCER = "default"
ProducerId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
"""Names the app a job comes from (budgets, quotas and fair shares are per producer)."""

# ---------------------------------------------------------------- producer requests

Prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=4000)]
ModelId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]


class TaskCallback(BaseModel):
    """When the job ends, send this Celery task by name with one argument: the job's public record."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    task: Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_.:-]{0,199}$")]
    queue: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,200}$")]


class WebhookCallback(BaseModel):
    """When the job ends, POST its public record here as JSON, signed with HMAC-SHA256."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    url: Annotated[str, StringConstraints(pattern=r"^https?://\S{1,4000}$")]


Callback = TaskCallback | WebhookCallback


ROUTING_FIELDS = frozenset({"callback", "producer", "lane", "on_budget"})
"""Request fields that steer genqueue and are never sent upstream."""


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    callback: Callback | None = None
    """Where to report the end of the job (not sent upstream)."""
    producer: ProducerId | None = None
    """The app the job comes from; ``default`` when none (not sent upstream)."""
    lane: Lane | None = None
    """``interactive`` or ``batch``; the producer's default lane when none (not sent upstream)."""
    on_budget: OnBudget | None = None
    """``reject`` or ``wait`` when a spend budget is used up; the producer's setting when none."""

    def upstream_body(self) -> dict[str, Any]:
        """The JSON body of the upstream trigger."""
        return self.model_dump(exclude_none=True, exclude={"kind", *ROUTING_FIELDS})


ImageId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,255}$")]
ImageUrl = Annotated[str, StringConstraints(pattern=r"^https?://[^\s]{1,4000}$")]


class ImageRequest(_Request):
    """``POST /images/generation``."""

    kind: Literal[JobKind.IMAGE] = JobKind.IMAGE
    prompt: Prompt
    """What to draw."""
    num_images: int = Field(1, ge=1, le=8)
    """How many images the job produces."""
    width: int = Field(1024, ge=64, le=2048, multiple_of=8)
    """Pixels."""
    height: int = Field(1024, ge=64, le=2048, multiple_of=8)
    """Pixels."""
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    negative_prompt: Annotated[str, StringConstraints(max_length=4000)] | None = None
    model_id: ModelId | None = None
    """A trained model to generate with; a job naming a model still training waits for it."""

    @property
    def expected_outputs(self) -> int:
        return self.num_images


class _FromImage(_Request):
    image_id: ImageId | None = None
    """An upstream image id (for example an output of an earlier job)."""
    image_url: ImageUrl | None = None
    """Or an http(s) URL of the image."""

    def _one_source(self, required: bool) -> None:
        given = (self.image_id is not None) + (self.image_url is not None)
        if given > 1 or (required and given == 0):
            raise ValueError("give exactly one of image_id or image_url")

    @property
    def expected_outputs(self) -> int:
        return 1


class UpscaleRequest(_FromImage):
    """``POST /images/upscaling``."""

    kind: Literal[JobKind.UPSCALE] = JobKind.UPSCALE
    factor: Literal[2, 4] = 2
    """How many times larger."""
    model_id: ModelId | None = None

    @model_validator(mode="after")
    def _source(self) -> UpscaleRequest:
        self._one_source(required=True)
        return self


class VideoRequest(_FromImage):
    """``POST /videos/generation``: from a prompt, a source image, or both."""

    kind: Literal[JobKind.VIDEO] = JobKind.VIDEO
    prompt: Prompt | None = None
    duration: float = Field(5.0, gt=0, le=60)
    """Seconds of video."""
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    negative_prompt: Annotated[str, StringConstraints(max_length=4000)] | None = None
    model_id: ModelId | None = None

    @model_validator(mode="after")
    def _source(self) -> VideoRequest:
        self._one_source(required=False)
        if self.prompt is None and self.image_id is None and self.image_url is None:
            raise ValueError("give a prompt, a source image, or both")
        return self


class WorkflowRequest(_Request):
    """Generate images, then upscale every one of them: one id to follow, each step its own job."""

    kind: Literal[JobKind.WORKFLOW] = JobKind.WORKFLOW
    generate: ImageRequest
    upscale_factor: Literal[2, 4] = 2

    @model_validator(mode="after")
    def _one_callback(self) -> WorkflowRequest:
        if self.generate.callback is not None:
            raise ValueError("a workflow calls back once, when it ends: give the callback on the workflow")
        return self

    @property
    def expected_outputs(self) -> int:
        return self.generate.num_images


JobRequest = Annotated[ImageRequest | UpscaleRequest | VideoRequest, Field(discriminator="kind")]
"""A request for one upstream job."""
AnyRequest = Annotated[
    ImageRequest | UpscaleRequest | VideoRequest | WorkflowRequest, Field(discriminator="kind")
]
"""Everything a producer can submit, as the by-name intake task accepts it (JSON with a ``kind``)."""
REQUEST_ADAPTER: TypeAdapter[ImageRequest | UpscaleRequest | VideoRequest | WorkflowRequest] = TypeAdapter(
    AnyRequest
)


# ---------------------------------------------------------------- upstream payloads


class UpstreamOutput(BaseModel):
    """One produced file, as the upstream describes it. Both fields are untrusted."""

    model_config = ConfigDict(extra="ignore")
    id: str = Field(max_length=512)
    url: str = Field(max_length=8192)


class UpstreamJob(BaseModel):
    """The ``result`` object of ``GET /jobs/{id}`` (and of a trigger's answer)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    job_id: str = Field(alias="jobId", min_length=1, max_length=256)
    status: UpstreamStatus = UpstreamStatus.CREATED
    images: list[UpstreamOutput] = Field(default_factory=list)
    videos: list[UpstreamOutput] = Field(default_factory=list)
    error: str | None = None
    model_id: str | None = Field(None, alias="modelId")
    created_at: str | None = Field(None, alias="createdAt")

    @field_validator("status", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
            if value not in UpstreamStatus._value2member_map_:
                raise ValueError(f"unknown upstream status {value[:40]!r}")
        return value

    @field_validator("images", "videos", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value

    @property
    def outputs(self) -> list[UpstreamOutput]:
        return [*self.images, *self.videos]

    @classmethod
    def from_payload(cls, payload: Any) -> UpstreamJob:
        """Parse ``{"result": {...}}`` or a bare ``{...}``; raise :class:`ProtocolError` otherwise."""
        return _parse_result(cls, payload, "job")


_Result = TypeVar("_Result", bound=BaseModel)


def _parse_result(model: type[_Result], payload: Any, what: str) -> _Result:
    """The upstream wraps its answers in ``{"result": {...}}`` (or not): either way one object, or a
    :class:`ProtocolError` naming what was wrong with it."""
    body = payload.get("result", payload) if isinstance(payload, dict) else payload
    if not isinstance(body, dict):
        raise ProtocolError(f"expected a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValueError as exc:
        raise ProtocolError(f"unexpected {what} payload: {_first_error(exc)}") from None


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return str(exc)


# ---------------------------------------------------------------- the ledger's job record


class OutputFile(BaseModel):
    """A downloaded output."""

    index: int
    remote_id: str
    path: str
    bytes: int
    sha256: str
    content_type: str | None = None


class JobRecord(BaseModel):
    """A job as the ledger holds it (the public view: no URLs, no secrets)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    kind: JobKind
    state: JobState
    request: dict[str, Any]
    created_at: float
    updated_at: float
    upstream_id: str | None = None
    upstream_status: str | None = None
    error: str | None = None
    submit_attempts: int = 0
    polls: int = 0
    poll_gen: int = 0
    errors_in_row: int = 0
    next_poll_at: float | None = None
    submitted_at: float | None = None
    """When the upstream accepted the POST (poll times and learned durations count from it)."""
    deadline_at: float | None = None
    expected_outputs: int = 0
    remote_ids: list[str] = Field(default_factory=list)
    parent_id: str | None = None
    """The workflow this job is a step of."""
    children: list[str] = Field(default_factory=list)
    """A workflow's steps, in order."""
    model_id: str | None = None
    callback: dict[str, Any] | None = None
    """Where the end of the job is reported (a task by name, or a webhook URL)."""
    callback_state: str | None = None  # pending, delivered, failed
    callback_id: str | None = None
    """The delivery id: the same on every attempt, so a receiver can deduplicate."""
    callback_attempts: int = 0
    callback_error: str | None = None
    outputs: list[OutputFile] = Field(default_factory=list)
    finished_at: float | None = None
    producer: str = DEFAULT_PRODUCER
    """The app the job comes from (its budgets and quota)."""
    lane: Lane = Lane.INTERACTIVE
    on_budget: OnBudget = OnBudget.REJECT
    budget_waits: int = 0
    """Submits held back by a quota or a budget (they cost no attempt)."""

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> JobRecord:
        data: dict[str, Any] = dict(raw)
        data["request"] = json.loads(raw.get("request", "{}"))
        data["remote_ids"] = json.loads(raw.get("remote_ids") or "[]")
        data["children"] = json.loads(raw.get("children") or "[]")
        data["callback"] = json.loads(raw["callback"]) if raw.get("callback") else None
        outputs = [json.loads(v) for k, v in sorted(raw.items()) if k.startswith("out:")]
        data["outputs"] = sorted(outputs, key=lambda o: o["index"])
        for key in (
            "next_poll_at",
            "submitted_at",
            "deadline_at",
            "finished_at",
            "upstream_id",
            "upstream_status",
            "error",
            "parent_id",
            "model_id",
            "callback_state",
            "callback_id",
            "callback_error",
        ):
            if data.get(key) == "":
                data[key] = None
        for key in ("producer", "lane", "on_budget"):
            if not data.get(key):
                data.pop(key, None)  # a record written before lanes and budgets: the defaults
        return cls.model_validate(data)

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    @property
    def batch(self) -> bool:
        """In the batch lane: its messages wait behind interactive work."""
        return self.lane is Lane.BATCH


# ---------------------------------------------------------------- model training


class ModelState(StrEnum):
    """A trained model's state in genqueue's ledger."""

    UNTRAINED = "untrained"  # never trained through genqueue
    REQUESTED = "requested"  # a train task is on its way
    TRAINING = "training"  # the upstream accepted the train call; polled every few minutes
    READY = "ready"  # generations naming it run
    FAILED = "failed"  # the upstream reported a failure; see ``error``
    TIMED_OUT = "timed_out"  # not ready within the deadline

    @property
    def in_progress(self) -> bool:
        return self in (ModelState.REQUESTED, ModelState.TRAINING)


UPSTREAM_MODEL_FAILED = frozenset({"failed", "error", "cancelled", "canceled"})


class UpstreamModel(BaseModel):
    """The ``result`` of ``GET /models/{id}``. Only ``ready`` and failure statuses end training; the
    contract leaves the in-progress values open, so any other status counts as still training."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model_id: str | None = Field(None, alias="modelId")
    status: str = Field(min_length=1, max_length=64)
    error: str | None = None

    @field_validator("status", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def failed(self) -> bool:
        return self.status in UPSTREAM_MODEL_FAILED

    @classmethod
    def from_payload(cls, payload: Any) -> UpstreamModel:
        return _parse_result(cls, payload, "model")


class ModelRecord(BaseModel):
    """A model as the ledger holds it."""

    model_config = ConfigDict(extra="ignore")

    id: str
    state: ModelState
    requested_at: float | None = None
    started_at: float | None = None
    ready_at: float | None = None
    updated_at: float | None = None
    deadline_at: float | None = None
    checks: int = 0
    train_calls: int = 0
    call_started_at: float | None = None
    """When the train call of this request began: set before the call, so it is never made twice."""
    poll_gen: int = 0
    errors_in_row: int = 0
    upstream_status: str | None = None
    error: str | None = None
    parked: int = 0
    """Generations waiting for this model."""
    history: list[dict[str, Any]] = Field(default_factory=list)

    @classmethod
    def from_hash(cls, raw: dict[str, str], history: list[str], parked: int) -> ModelRecord:
        data: dict[str, Any] = {k: (None if v == "" else v) for k, v in raw.items()}
        data["history"] = [json.loads(h) for h in history]
        data["parked"] = parked
        return cls.model_validate(data)
