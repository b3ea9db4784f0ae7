"""Completion callbacks: when a job ends, tell the producer, by a Celery task sent by name or by a
signed HTTP POST. Delivery is at least once: recorded pending in the same atomic step that ends the
job, retried with backoff, re-driven by the sweeper after a crash, and carrying one delivery id on
every attempt so the receiver can deduplicate.

Webhook signature (documented in the README, with a receiver snippet)::

    Genq-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>
    Genq-Delivery: <delivery id>
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from genq import netguard, wallclock
from genq.actions import Action, Notify
from genq.errors import DownloadRefused, GenqError, InvalidRequest
from genq.ledger import Ledger
from genq.netguard import NetPolicy
from genq.polling import error_delay
from genq.schemas import JobRecord, TaskCallback, WebhookCallback
from genq.settings import Settings

log = logging.getLogger(__name__)

SendByName = Callable[[str, list[Any], str], None]
"""Sends a Celery task by name with these arguments to this queue (given by the task layer)."""


def public_record(record: JobRecord) -> dict[str, Any]:
    """What a producer is told about its finished job: no URLs, no internals."""
    return {
        "id": record.id,
        "kind": record.kind.value,
        "state": record.state.value,
        "reason": record.error,
        "upstream_id": record.upstream_id,
        "outputs": [o.model_dump(exclude={"remote_id"}) for o in record.outputs],
        "steps": record.children,
        "created_at": record.created_at,
        "finished_at": record.finished_at,
        "delivery_id": record.callback_id,
    }


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Genq-Signature`` header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def callback_policy(settings: Settings) -> NetPolicy:
    # No redirects: a receiver answers, it does not send us elsewhere.
    return netguard.policy_from(settings.callbacks, max_redirects=0)


def check_callback(callback: TaskCallback | WebhookCallback | None, settings: Settings) -> None:
    """Refuse at submit time a webhook URL the SSRF guard would refuse at delivery time."""
    if isinstance(callback, WebhookCallback):
        try:
            netguard.check_url(callback.url, callback_policy(settings))
        except DownloadRefused as exc:
            raise InvalidRequest(f"invalid request: callback.url: {exc}") from None


@dataclass
class CallbackService:
    settings: Settings
    ledger: Ledger
    session: requests.Session  # guarded by callback_policy
    clock: Callable[[], float]
    rng: random.Random

    def deliver(self, job_id: str, send: SendByName) -> list[Action]:
        rec = self.ledger.get(job_id)
        if rec is None or rec.callback_state != "pending" or not rec.callback or not rec.terminal:
            # Delivered already, a duplicate message, or the job was brought back (resubmitted) and
            # will arm its callback again when it really ends.
            self.ledger.drop_callback_due(job_id)
            return []
        attempts = rec.callback_attempts + 1
        try:
            if "task" in rec.callback:
                target = TaskCallback.model_validate(rec.callback)
                send(target.task, [public_record(rec)], target.queue)
            else:
                self._post(WebhookCallback.model_validate(rec.callback).url, rec)
        except (GenqError, requests.RequestException, OSError, ValueError) as exc:
            return self._failed(rec, attempts, exc)
        self.ledger.callback_attempted(
            job_id, state="delivered", attempts=attempts, error=None, retry_at=None
        )
        log.info("job %s: callback delivered (attempt %d)", job_id, attempts)
        return []

    def _post(self, url: str, rec: JobRecord) -> None:
        secret = self.settings.callbacks.secret.get_secret_value()
        if not secret:
            raise GenqError("GENQ_CALLBACKS_SECRET is not set: webhooks are signed, so none can be sent")
        body = json.dumps(public_record(rec), separators=(",", ":")).encode()
        now = int(self.clock())
        headers = {
            "Content-Type": "application/json",
            "Genq-Signature": sign(secret, now, body),
            "Genq-Delivery": rec.callback_id or "",
            "User-Agent": "genqueue-callbacks",
        }
        timeout = self.settings.callbacks.timeout
        netguard.check_url(url, callback_policy(self.settings))
        # The timeout bounds the whole attempt: a receiver dripping its answer is cut off.
        limit = wallclock.Limit(timeout)
        try:
            with limit:
                response = self.session.post(
                    url, data=body, headers=headers, timeout=(timeout, timeout), allow_redirects=False
                )
                response.close()
        except requests.RequestException:
            if limit.expired:
                raise GenqError(
                    f"receiver {netguard.redact_url(url)} gave no full answer within {timeout:g}s"
                ) from None
            raise
        if not 200 <= response.status_code < 300:
            raise GenqError(f"receiver {netguard.redact_url(url)} answered {response.status_code}")

    def _failed(self, rec: JobRecord, attempts: int, exc: BaseException) -> list[Action]:
        reason = str(exc) if isinstance(exc, GenqError) else f"{type(exc).__name__}"
        limit = self.settings.callbacks.max_attempts
        if attempts >= limit:
            error = f"gave up after {attempts} attempts: {reason}"
            self.ledger.callback_attempted(
                rec.id, state="failed", attempts=attempts, error=error, retry_at=None
            )
            log.warning("job %s: callback_failed after %d attempts: %s", rec.id, attempts, reason)
            return []
        delay = error_delay(self.settings.callbacks.backoff, attempts, None, 300.0, self.rng)
        held = self.settings.poll.held(delay)
        now = self.clock()
        retry_at = now + delay + (0.0 if held else self.settings.worker.sweep_grace)
        self.ledger.callback_attempted(
            rec.id, state="pending", attempts=attempts, error=reason, retry_at=retry_at
        )
        log.info("job %s: callback attempt %d failed (%s); again in %.1fs", rec.id, attempts, reason, delay)
        return [] if held else [Notify(rec.id, delay)]
