"""The upstream API client: one ``requests.Session``, Bearer auth, a timeout on every call, typed errors.

It makes exactly one HTTP request per call and never loops: retry decisions belong to the caller,
which re-enqueues with a countdown instead of sleeping.
"""

from __future__ import annotations

import email.utils
import re
import time
from typing import Any
from urllib.parse import quote

import requests
from pydantic import SecretStr

from genq import wallclock
from genq.errors import (
    GenqError,
    ProtocolError,
    RateLimited,
    Throttled,
    UpstreamRejected,
    UpstreamUnavailable,
)
from genq.limits import UpstreamLimiter
from genq.schemas import JobKind, UpstreamJob, UpstreamModel

TRIGGER_PATHS: dict[JobKind, str] = {
    JobKind.IMAGE: "/images/generation",
    JobKind.UPSCALE: "/images/upscaling",
    JobKind.VIDEO: "/videos/generation",
}

_MAX_DETAIL = 200
GATEWAY_STATUSES = frozenset({502, 504})
_DELTA_SECONDS = re.compile(r"(?=\.?[0-9])[0-9]{0,10}(\.[0-9]{0,6})?")
MAX_RETRY_AFTER = 3600.0
DEFAULT_429_WAIT = 1.0
"""Seconds every worker waits after a 429 that named no Retry-After."""
"""Longest wait a Retry-After header can impose, in seconds."""


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        # Delta-seconds; capped so a hostile or broken header cannot park work for ever.
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(MAX_RETRY_AFTER, max(0.0, when.timestamp() - (time.time() if now is None else now)))


class UpstreamClient:
    """Calls the generation API. Thread-safe as far as ``requests.Session`` is (one per process)."""

    def __init__(
        self,
        base_url: str,
        api_key: SecretStr,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        session: requests.Session | None = None,
        limiter: UpstreamLimiter | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = (connect_timeout, read_timeout)
        self.session = session or wallclock.session()
        self._secret = api_key.get_secret_value()
        self.session.headers["Authorization"] = f"Bearer {self._secret}"
        self.session.headers["Accept"] = "application/json"
        self.limiter = limiter

    def __repr__(self) -> str:
        return f"UpstreamClient({self.base_url!r})"

    def trigger(self, kind: JobKind, body: dict[str, Any], lane: str = "", caller: str = "") -> UpstreamJob:
        """Start a job; the paid call. Returns the upstream job (its ``job_id`` above all). ``lane``
        and ``caller`` (the job id) are for the shared limiter's lane shares and turns."""
        answer = self._request(
            "POST",
            TRIGGER_PATHS[kind],
            "trigger",
            json=body,
            lane=lane,
            caller=caller,
            queue=bool(caller),
        )
        return UpstreamJob.from_payload(answer)

    def get_job(self, upstream_id: str, lane: str = "") -> UpstreamJob:
        """One status check of an upstream job."""
        job = UpstreamJob.from_payload(
            self._request("GET", f"/jobs/{_segment(upstream_id)}", "status", lane=lane)
        )
        if job.job_id != upstream_id:
            raise ProtocolError(f"asked for job {upstream_id!r}, got {job.job_id[:64]!r}")
        return job

    def train_model(self, model_id: str) -> str:
        """Start training; the upstream answers a success string, not a job id."""
        answer = self._request("GET", f"/models/{_segment(model_id)}/train", "models", text_ok=True)
        return answer if isinstance(answer, str) else str(answer)[:_MAX_DETAIL]

    def get_model(self, model_id: str) -> UpstreamModel:
        """One readiness check of a model."""
        return UpstreamModel.from_payload(self._request("GET", f"/models/{_segment(model_id)}", "models"))

    def _request(
        self,
        method: str,
        path: str,
        family: str,
        json: Any = None,
        text_ok: bool = False,
        lane: str = "",
        caller: str = "",
        queue: bool = False,
    ) -> Any:
        what = f"{method} {path}"
        permit = None
        if self.limiter is not None:
            permit, wait, queued = self.limiter.admit(family, lane, caller, queue)
            if permit is None:
                raise Throttled(f"{what}: held back by the shared rate limit", wait, queued)
            self.limiter.sent(permit)
        limit = wallclock.Limit(sum(self.timeout))
        try:
            with limit:
                response = self.session.request(method, self.base_url + path, json=json, timeout=self.timeout)
        except requests.RequestException as exc:
            raise _request_failed(what, exc, limit) from None
        finally:
            if permit is not None and self.limiter is not None:
                self.limiter.release(permit)
        try:
            return _decode(what, response, text_ok)
        except RateLimited as exc:
            if self.limiter is not None:
                self.limiter.block(exc.retry_after if exc.retry_after is not None else DEFAULT_429_WAIT)
            raise
        except GenqError as exc:
            # An upstream may echo the token back in an error body; it must not reach logs or Redis.
            secret = self._secret
            if secret and secret in str(exc):
                exc.args = (str(exc).replace(secret, "[REDACTED]"), *exc.args[1:])
            raise


def _request_failed(what: str, exc: requests.RequestException, limit: wallclock.Limit) -> UpstreamUnavailable:
    """The error for a request that got no answer; ``ambiguous`` when the upstream may have acted."""
    if limit.expired:
        # Cut by the wall-clock limit while the peer dripped its answer: it had the request.
        return UpstreamUnavailable(f"{what}: no complete answer within {limit.seconds:.0f}s", ambiguous=True)
    if isinstance(exc, requests.ConnectTimeout):
        return UpstreamUnavailable(f"{what}: connect timeout")
    if isinstance(exc, requests.ReadTimeout):
        # The request went out; the upstream may have acted on it.
        return UpstreamUnavailable(f"{what}: read timeout", ambiguous=True)
    if isinstance(exc, requests.ConnectionError):
        return UpstreamUnavailable(f"{what}: connection failed", ambiguous=_was_sent(exc))
    return UpstreamUnavailable(f"{what}: {type(exc).__name__}", ambiguous=True)


def _decode(what: str, response: requests.Response, text_ok: bool = False) -> Any:
    status = response.status_code
    if status == 429:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        raise RateLimited(f"{what}: 429 rate limited", retry_after=retry_after)
    if status >= 500:
        raise UpstreamUnavailable(
            f"{what}: {status} {_detail(response)}",
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            # A gateway that answers 502 or 504 had passed the request on: it may have been acted on.
            ambiguous=status in GATEWAY_STATUSES,
        )
    if status == 401:
        raise UpstreamRejected(f"{what}: 401 unauthorized: check GENQ_API_KEY", status)
    if status >= 400:
        raise UpstreamRejected(f"{what}: {status} {_detail(response)}", status)
    try:
        return response.json()
    except ValueError:
        if text_ok:
            return response.text[:_MAX_DETAIL]
        raise ProtocolError(f"{what}: {status} answer is not JSON: {response.text[:_MAX_DETAIL]!r}") from None


def _detail(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:_MAX_DETAIL]
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            if key in body:
                return str(body[key])[:_MAX_DETAIL]
    return str(body)[:_MAX_DETAIL]


def _segment(value: str) -> str:
    return quote(value, safe="")


def _was_sent(exc: requests.ConnectionError) -> bool:
    """A refused or unresolvable connection sent nothing; a reset mid-exchange may have."""
    text = repr(exc)
    return not any(s in text for s in ("NewConnectionError", "NameResolutionError", "Connection refused"))
