"""In-memory simulator state: jobs, models and request counters.

Job and model status are computed lazily from the monotonic clock on every read, so no background tasks
exist and a paused or overloaded event loop can never make a job "late".
"""

from __future__ import annotations

import random
import re
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import web

from genq.simulator.config import SimConfig

JobKind = Literal["image", "upscale", "video"]
Outcome = Literal["success", "failed", "never"]
ModelStatus = Literal["untrained", "training", "ready", "failed"]

# Enough to check poll spacing; bounded so a benchmark hammering one job cannot grow memory forever.
GET_TIMES_KEPT = 1000

_DIRECTIVE = re.compile(r"\[sim:([a-z_]+)(?:=([^\]]*))?\]", re.IGNORECASE)


def iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Directives:
    fail: bool = False
    never: bool = False
    duration: float | None = None
    images: int | None = None


def parse_directives(text: str) -> Directives:
    """Read `[sim:fail]`, `[sim:never]`, `[sim:duration=S]`, `[sim:images=N]`; unknown ones are ignored."""
    fail = never = False
    duration: float | None = None
    images: int | None = None
    for match in _DIRECTIVE.finditer(text):
        name, value = match.group(1).lower(), (match.group(2) or "").strip()
        try:
            if name == "fail":
                fail = True
            elif name == "never":
                never = True
            elif name == "duration":
                duration = max(0.0, float(value))
            elif name == "images":
                images = min(max(int(value), 0), 8)
        except ValueError:
            continue
    return Directives(fail=fail, never=never, duration=duration, images=images)


@dataclass
class Job:
    job_id: str
    kind: JobKind
    request: dict[str, Any]
    created_mono: float
    created_at: str
    duration: float
    outcome: Outcome
    error: str | None
    model_id: str | None
    model_status_at_submit: ModelStatus | None
    n_images: int
    n_videos: int
    # Captured at creation so a later config change cannot alter the bytes a job already promised.
    image_size: int
    video_bytes: int
    body_cache: dict[tuple[str, str, str], bytes] = field(default_factory=dict)

    def status(self, now: float) -> str:
        elapsed = now - self.created_mono
        if self.outcome != "never" and elapsed >= self.duration:
            return self.outcome
        fraction = elapsed / self.duration if self.duration > 0 else 1.0
        if fraction < 0.1:
            return "created"
        if fraction < 0.3:
            return "queued"
        return "running"

    @property
    def output_ext(self) -> str:
        return "mp4" if self.kind == "video" else "png"

    @property
    def output_count(self) -> int:
        if self.outcome != "success":
            return 0
        return self.n_videos if self.kind == "video" else self.n_images


@dataclass
class Model:
    model_id: str
    status: ModelStatus = "untrained"
    started_mono: float = 0.0
    training_duration: float = 0.0
    started_at: str | None = None
    trained_at: str | None = None
    error: str | None = None

    def refresh(self, now: float) -> None:
        if self.status == "training" and now - self.started_mono >= self.training_duration:
            if "fail" in self.model_id.lower():
                self.status, self.error = "failed", "simulated training failure"
            else:
                self.status, self.trained_at = "ready", iso_now()

    def as_result(self) -> dict[str, Any]:
        return {
            "modelId": self.model_id,
            "status": self.status,
            "error": self.error,
            "trainedAt": self.trained_at,
            "trainingStartedAt": self.started_at,
        }


@dataclass
class JobCounters:
    posts: int = 0
    gets: int = 0
    get_times: deque[float] = field(default_factory=lambda: deque(maxlen=GET_TIMES_KEPT))
    files: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "posts": self.posts,
            "gets": self.gets,
            "get_times": list(self.get_times),
            "files": self.files,
        }


class Stats:
    """Request counters; `total` and `max_rate_1s` cover API routes only (not files, not control)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests: Counter[str] = Counter()
        self.responses: Counter[str] = Counter()
        self.per_job: dict[str, JobCounters] = {}
        self.train_calls: Counter[str] = Counter()
        self.total = 0
        self.max_rate_1s = 0
        self.jobs_created = 0
        self.jobs_with_unready_model = 0
        self._window: deque[float] = deque()
        self.started = time.monotonic()

    def api_request(self, route: str, now: float) -> None:
        self.requests[route] += 1
        self.total += 1
        window = self._window
        window.append(now)
        while window[0] <= now - 1.0:
            window.popleft()
        if len(window) > self.max_rate_1s:
            self.max_rate_1s = len(window)

    def job(self, job_id: str) -> JobCounters:
        counters = self.per_job.get(job_id)
        if counters is None:
            counters = self.per_job[job_id] = JobCounters()
        return counters

    def as_dict(self, include_jobs: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": dict(self.requests),
            "train_calls": dict(self.train_calls),
            "total": self.total,
            "max_rate_1s": self.max_rate_1s,
            "responses": dict(self.responses),
            "jobs_created": self.jobs_created,
            "jobs_with_unready_model": self.jobs_with_unready_model,
            "uptime": time.monotonic() - self.started,
        }
        if include_jobs:
            out["per_job"] = {job_id: c.as_dict() for job_id, c in self.per_job.items()}
        return out


class SimState:
    """All mutable simulator state, owned by one event loop (no locking needed)."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.jobs: dict[str, Job] = {}
        self.models: dict[str, Model] = {}
        self.stats = Stats()
        self._seed(config.seed)

    def _seed(self, seed: int) -> None:
        # Separate streams: fault rolls must not shift the per-job outcome sequence (and vice versa).
        self.job_rng = random.Random(seed)
        self.fault_rng = random.Random(seed + 1_000_003)

    def set_config(self, config: SimConfig) -> None:
        if config.seed != self.config.seed:
            self._seed(config.seed)
        self.config = config

    def model(self, model_id: str, now: float) -> Model:
        model = self.models.get(model_id)
        if model is None:
            return Model(model_id)
        model.refresh(now)
        return model

    def create_job(
        self,
        kind: JobKind,
        request: dict[str, Any],
        directive_text: str,
        model_id: str | None,
        count: int | None,
    ) -> Job:
        cfg = self.config
        now = time.monotonic()
        rng = self.job_rng
        # Always draw the same values in the same order so directives do not perturb later jobs.
        sampled = (cfg.video_duration if kind == "video" else cfg.duration).sample(rng)
        fail_roll, never_roll = rng.random(), rng.random()
        directives = parse_directives(directive_text)

        duration = directives.duration if directives.duration is not None else sampled
        outcome: Outcome = "success"
        error: str | None = None
        if directives.never:
            outcome = "never"
        elif directives.fail:
            outcome, error = "failed", "simulated failure: [sim:fail] directive"
        elif never_roll < cfg.never_finish_rate:
            outcome = "never"
        elif fail_roll < cfg.fail_rate:
            outcome, error = "failed", f"simulated failure: injected (fail_rate={cfg.fail_rate})"

        if kind == "image":
            if directives.images is not None:
                n_images = directives.images
            else:
                n_images = count if count is not None else cfg.images_per_job
        else:
            n_images = 1 if kind == "upscale" else 0

        model_status: ModelStatus | None = None
        if model_id is not None:
            model_status = self.model(model_id, now).status
            if model_status != "ready":
                self.stats.jobs_with_unready_model += 1

        job = Job(
            job_id=uuid.uuid4().hex,
            kind=kind,
            request=request,
            created_mono=now,
            created_at=iso_now(),
            duration=duration,
            outcome=outcome,
            error=error,
            model_id=model_id,
            model_status_at_submit=model_status,
            n_images=n_images,
            n_videos=1 if kind == "video" else 0,
            image_size=cfg.image_size,
            video_bytes=cfg.video_bytes,
        )
        self.jobs[job.job_id] = job
        self.stats.jobs_created += 1
        self.stats.job(job.job_id).posts += 1
        return job

    def train(self, model_id: str, now: float) -> Model:
        model = self.models.get(model_id)
        if model is None:
            model = self.models[model_id] = Model(model_id)
        model.refresh(now)
        # Training or ready models keep their state: the call is acknowledged but changes nothing.
        if model.status in ("untrained", "failed"):
            model.status, model.error, model.trained_at = "training", None, None
            model.started_mono, model.started_at = now, iso_now()
            model.training_duration = self.config.training_duration
        return model


STATE_KEY = web.AppKey("sim_state", SimState)
