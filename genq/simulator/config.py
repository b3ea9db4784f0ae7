"""Simulator configuration: one validated model, mutable at runtime through `POST /_sim/config`."""

from __future__ import annotations

import math
import random
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Duration(BaseModel):
    """A job-duration distribution in seconds, sampled once per job."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["fixed", "uniform", "lognormal"] = "fixed"
    value: float = Field(default=1.0, ge=0)
    low: float = Field(default=0, ge=0)
    high: float = Field(default=0, ge=0)
    # A median of 0 means "use `value`", so switching kind alone keeps a sensible scale.
    median: float = Field(default=0, ge=0)
    sigma: float = Field(default=0.5, ge=0)
    max: float = Field(default=3600, ge=0)

    @model_validator(mode="after")
    def _check_bounds(self) -> Duration:
        if self.kind == "uniform" and self.high < self.low:
            raise ValueError("uniform duration needs high >= low")
        return self

    def sample(self, rng: random.Random) -> float:
        """Draw one duration. Always consumes exactly one gauss/uniform draw for reproducibility."""
        if self.kind == "uniform":
            drawn = rng.uniform(self.low, self.high)
        elif self.kind == "lognormal":
            median = self.median if self.median > 0 else self.value
            drawn = median * math.exp(self.sigma * rng.gauss(0.0, 1.0))
        else:
            # Draw anyway so that changing kind does not shift the rest of the seeded sequence.
            rng.random()
            drawn = self.value
        return min(max(drawn, 0.0), self.max)


def _fixed(value: float) -> Duration:
    return Duration(kind="fixed", value=value)


class SimConfig(BaseModel):
    """Everything the simulator does is driven by this; all fields have test-friendly defaults."""

    model_config = ConfigDict(extra="forbid")

    api_key: str = "sim-key"
    seed: int = 0
    duration: Duration = Field(default_factory=lambda: _fixed(1.0))
    video_duration: Duration = Field(default_factory=lambda: _fixed(2.0))

    images_per_job: int = Field(default=2, ge=0, le=8)
    # Bounded so that building an image can never become per-request heavy work.
    image_size: int = Field(default=64, ge=1, le=2048)
    video_bytes: int = Field(default=1_000_000, ge=0)

    fail_rate: float = Field(default=0, ge=0, le=1)
    never_finish_rate: float = Field(default=0, ge=0, le=1)
    error_5xx_rate: float = Field(default=0, ge=0, le=1)
    """500 or 503 before acting on the request."""
    gateway_error_rate: float = Field(default=0, ge=0, le=1)
    """502 or 504 after acting on the request (its answer lost on the way back)."""
    rate_429_rate: float = Field(default=0, ge=0, le=1)
    retry_after: float = Field(default=1.0, ge=0)
    latency: float = Field(default=0, ge=0)
    malformed_rate: float = Field(default=0, ge=0, le=1)
    bare_trigger_response: bool = False
    training_duration: float = Field(default=2.0, ge=0)
    file_token: str = "sim-url-token"  # noqa: S105 - a fake token the simulator itself checks
    range_support: bool = True
    file_drip_delay: float = Field(default=0, ge=0)
    file_rate_limit: float = Field(default=0, ge=0)
    """Bytes per second per file transfer (0: as fast as it goes): a realistic link for benchmarks."""

    def merged(self, changes: dict[str, Any]) -> SimConfig:
        """A new validated config with `changes` applied; nested dicts merge instead of replacing."""
        return SimConfig.model_validate(_deep_merge(self.model_dump(), changes))


def _deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        current = out.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            out[key] = _deep_merge(current, value)
        else:
            out[key] = value
    return out
