"""What a service step asks to happen next. The task layer turns these into Celery messages."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SubmitLater:
    job_id: str
    delay: float
    gen: int = 0  # the step generation it is sent for; 0 for a new job
    batch: bool = False  # sent in the batch lane (behind interactive work)
    turn: bool = False  # sent at the turn the rate limit granted it (ahead of the batch backlog)


@dataclass(frozen=True)
class PollLater:
    job_id: str
    gen: int
    delay: float
    batch: bool = False


@dataclass(frozen=True)
class Download:
    job_id: str
    index: int
    attempt: int = 0
    delay: float = 0.0
    batch: bool = False


@dataclass(frozen=True)
class Finalize:
    job_id: str


@dataclass(frozen=True)
class TrainLater:
    model_id: str
    delay: float
    gen: int


@dataclass(frozen=True)
class PollModelLater:
    model_id: str
    gen: int
    delay: float


@dataclass(frozen=True)
class Notify:
    """Deliver the job's completion callback."""

    job_id: str
    delay: float = 0.0


@dataclass(frozen=True)
class Admit:
    """Run the admission tick of ``family`` (token ``token``) after ``delay`` seconds: it grants
    queued submits their turns (:meth:`genq.limits.UpstreamLimiter.tick`)."""

    family: str
    token: str
    delay: float = 0.0


Action = SubmitLater | PollLater | Download | Finalize | TrainLater | PollModelLater | Notify | Admit
