"""The one error hierarchy of genqueue.

::

    GenqError
    ├── InvalidRequest          bad producer input; nothing was written or sent
    ├── TransientError          try again later (``retry_after`` seconds, when known)
    │   ├── UpstreamUnavailable     5xx, connection reset, timeout
    │   ├── RateLimited             429 with its Retry-After
    │   └── Throttled               our own shared rate limit said wait; nothing was sent
    ├── PermanentError          retrying cannot help
    │   ├── UpstreamRejected        401, 403, 404, other 4xx
    │   └── DownloadRefused         an output that may not or cannot be fetched
    ├── ProtocolError           a 2xx answer outside the contract (malformed JSON, unknown status):
    │                           the upstream got the request, so a trigger may have been acted on;
    │                           a status check tries again a bounded number of times
    ├── EnqueueError            (producer side) the ledger could not record the job; nothing was sent
    ├── JobFailed               (producer side) the job ended failed, timed out or cancelled
    └── WaitTimeout             (producer side) the job did not finish within the wait

Messages never carry the API key or an output URL's query string.
"""

from __future__ import annotations


class GenqError(Exception):
    """Base of every error genqueue raises on purpose."""


class InvalidRequest(GenqError, ValueError):
    """A producer request failed validation; the message lists each problem."""


class TransientError(GenqError):
    """A failure that may succeed if tried again later."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[type[TransientError], tuple[str, float | None]]:
        return (type(self), (str(self), self.retry_after))


class UpstreamUnavailable(TransientError):
    """The upstream answered 5xx, reset the connection or timed out.

    ``ambiguous`` is true when the request may have reached the upstream and been acted on (a read
    timeout, a reset after sending): for a paid trigger that means it must not be blindly repeated.
    """

    def __init__(self, message: str, retry_after: float | None = None, ambiguous: bool = False) -> None:
        super().__init__(message, retry_after)
        self.ambiguous = ambiguous

    def __reduce__(self) -> tuple[type[UpstreamUnavailable], tuple[str, float | None, bool]]:  # type: ignore[override]
        return (type(self), (str(self), self.retry_after, self.ambiguous))


class RateLimited(TransientError):
    """The upstream answered 429; wait ``retry_after`` seconds."""


class Throttled(TransientError):
    """genqueue's shared rate limit or concurrency cap refused the call before anything was sent.

    ``queued``: a submit that waits in the admission queue for its turn (sent by the admission tick),
    rather than coming back after ``retry_after`` to try again."""

    def __init__(self, message: str, retry_after: float | None = None, queued: bool = False) -> None:
        super().__init__(message, retry_after)
        self.queued = queued

    def __reduce__(self) -> tuple[type[Throttled], tuple[str, float | None, bool]]:  # type: ignore[override]
        return (type(self), (str(self), self.retry_after, self.queued))


class PermanentError(GenqError):
    """A failure that retrying cannot fix."""


class UpstreamRejected(PermanentError):
    """The upstream refused the request (4xx other than 429)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self) -> tuple[type[UpstreamRejected], tuple[str, int]]:
        return (type(self), (str(self), self.status))


class ProtocolError(GenqError):
    """The upstream answered 2xx with something outside the contract. Neither transient nor
    permanent: the request reached the upstream (a trigger may be paid for), and a status check
    may read fine next time, so callers decide (see the tree above)."""


class DownloadRefused(PermanentError):
    """An output URL or its content broke a download rule (scheme, size, type)."""


class EnqueueError(GenqError):
    """(Producer side) the job could not be recorded (the ledger is unreachable; nothing was sent), or
    not yet on ``GENQ_REDIS_DURABLE_REPLICAS`` replicas: submit again with the same idempotency key."""


class JobFailed(GenqError):
    """Raised by ``wait`` when the job ended in a state other than succeeded."""

    def __init__(self, job_id: str, state: str, reason: str | None) -> None:
        super().__init__(f"job {job_id} ended {state}: {reason or 'no reason recorded'}")
        self.job_id, self.state, self.reason = job_id, state, reason

    def __reduce__(self) -> tuple[type[JobFailed], tuple[str, str, str | None]]:
        return (type(self), (self.job_id, self.state, self.reason))


class WaitTimeout(GenqError, TimeoutError):
    """Raised by ``wait`` when the job is still in flight after the timeout."""
