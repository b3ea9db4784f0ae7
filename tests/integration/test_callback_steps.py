"""CallbackService.deliver step by step against a real Redis with a fake clock: a task by name (a fake
``send``) and a signed webhook (``responses``), retries with backoff, ``callback_failed``, and the one
delivery id every attempt carries."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import pytest
import responses

from genq.actions import Notify
from genq.callbacks import public_record
from genq.errors import GenqError
from genq.schemas import JobState
from tests.integration.steps import (  # noqa: F401  (fixtures)
    GRACE,
    SECRET,
    START,
    Steps,
    shared_redis_fixture,
    steps_fixture,
    upstream_fixture,
)

pytestmark = pytest.mark.integration
TASK = {"task": "myapp.on_done", "queue": "myapp"}
HOOK = "https://receiver.test/hooks/genq"


def verify(secret: bytes, headers: dict[str, str], body: bytes, tolerance: int = 300) -> bool:
    """The receiver's verifier, as docs/guide.md gives it (verbatim)."""
    fields = dict(part.split("=", 1) for part in headers["Genq-Signature"].split(","))
    if abs(time.time() - int(fields["t"])) > tolerance:
        return False  # too old: a replay
    expected = hmac.new(secret, fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"])


class Sent:
    """A fake ``send``: records each task sent by name, or raises ``fail`` for the next ones."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Any], str]] = []
        self.fail: list[BaseException] = []

    def __call__(self, task: str, args: list[Any], queue: str) -> None:
        if self.fail:
            raise self.fail.pop(0)
        self.calls.append((task, args, queue))


def _ended(s: Steps, callback: dict[str, Any], job_id: str = "j1") -> str:
    s.image(job_id, callback=callback)
    moved = s.ledger.transition(job_id, [JobState.PENDING], JobState.FAILED, error="upstream said no")
    assert moved.ok
    return job_id


def test_a_task_callback_is_sent_once_with_the_public_record(steps: Steps) -> None:
    _ended(steps, TASK)
    send = Sent()
    assert steps.job("j1").callback_state == "pending"
    assert steps.callback_due("j1") == START + GRACE

    assert steps.callbacks.deliver("j1", send) == []

    ((task, (payload,), queue),) = send.calls
    job = steps.job("j1")
    assert (task, queue) == ("myapp.on_done", "myapp")
    assert payload == public_record(job)
    assert payload["state"] == "failed" and payload["reason"] == "upstream said no"
    assert payload["delivery_id"] == job.callback_id and job.callback_id
    assert (job.callback_state, job.callback_attempts, job.callback_error) == ("delivered", 1, None)
    assert steps.callback_due("j1") is None

    assert steps.callbacks.deliver("j1", send) == []  # a duplicate message: delivered already
    assert len(send.calls) == 1


def test_nothing_is_sent_for_a_job_that_has_not_ended(steps: Steps) -> None:
    steps.image("j1", callback=TASK)
    steps.redis.zadd("genq:callbacks:due", {"j1": START})  # a stray due entry
    send = Sent()

    assert steps.callbacks.deliver("j1", send) == []

    assert send.calls == []
    job = steps.job("j1")
    assert job.callback_state is None and job.callback_attempts == 0
    assert steps.callback_due("j1") is None
    assert steps.callbacks.deliver("nope", send) == [] and send.calls == []


def test_nothing_is_sent_for_a_job_without_a_callback(steps: Steps) -> None:
    steps.image("j1")
    steps.ledger.transition("j1", [JobState.PENDING], JobState.FAILED, error="x")
    send = Sent()

    assert steps.callbacks.deliver("j1", send) == []

    assert send.calls == [] and steps.job("j1").callback_state is None


def test_failed_attempts_back_off_then_end_callback_failed(steps: Steps) -> None:
    _ended(steps, TASK)
    send = Sent()
    send.fail = [GenqError("broker down"), OSError("connection reset"), GenqError("broker down again")]
    delays = []

    for attempt in (1, 2):
        (again,) = steps.callbacks.deliver("j1", send)
        assert isinstance(again, Notify) and again.job_id == "j1"
        delays.append(again.delay)
        job = steps.job("j1")
        assert (job.callback_state, job.callback_attempts) == ("pending", attempt)
        # Re-driven by the sweeper a grace after the countdown, should the message be lost.
        assert steps.callback_due("j1") == pytest.approx(START + again.delay + GRACE)
    assert 1.6 <= delays[0] <= 2.4 and 3.2 <= delays[1] <= 4.8
    assert steps.job("j1").callback_error == "OSError"  # not a genqueue error: only its type

    assert steps.callbacks.deliver("j1", send) == []

    job = steps.job("j1")
    assert job.callback_state == "failed" and job.callback_attempts == 3
    assert job.callback_error == "gave up after 3 attempts: broker down again"
    assert job.state is JobState.FAILED and job.error == "upstream said no"  # the job keeps its ending
    assert steps.callback_due("j1") is None
    assert steps.callbacks.deliver("j1", send) == [] and send.calls == []  # no fourth attempt


def test_a_retry_longer_than_a_countdown_is_held_for_the_sweeper(steps: Steps) -> None:
    steps.with_settings(callbacks={"backoff": 100.0})
    _ended(steps, TASK)
    send = Sent()
    send.fail = [GenqError("down")]

    assert steps.callbacks.deliver("j1", send) == []  # held: no countdown message

    due = steps.callback_due("j1")
    assert due is not None and START + 80 <= due <= START + 120  # no grace added
    steps.clock.now = due
    assert steps.sweeper.sweep()[0] == [Notify("j1")]
    assert steps.callbacks.deliver("j1", send) == []
    assert steps.job("j1").callback_state == "delivered" and len(send.calls) == 1


def test_a_webhook_is_signed_so_the_documented_verifier_accepts_it(
    steps: Steps, upstream: responses.RequestsMock
) -> None:
    steps.clock.now = time.time()  # the verifier checks the timestamp against the real time
    _ended(steps, {"url": HOOK})
    hook = upstream.post(HOOK, status=204)

    assert steps.callbacks.deliver("j1", lambda *a: pytest.fail("not a task callback")) == []

    assert hook.call_count == 1
    request = upstream.calls[0].request
    body = request.body if isinstance(request.body, bytes) else str(request.body).encode()
    headers = dict(request.headers)
    job = steps.job("j1")
    assert verify(SECRET.encode(), headers, body)
    assert not verify(b"another secret", headers, body)
    assert not verify(SECRET.encode(), headers, body.replace(b"failed", b"succeeded"))
    assert headers["Genq-Delivery"] == job.callback_id
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == public_record(job)
    assert job.callback_state == "delivered"


def test_every_webhook_attempt_carries_the_same_delivery_id(
    steps: Steps, upstream: responses.RequestsMock
) -> None:
    steps.clock.now = time.time()
    _ended(steps, {"url": HOOK})
    upstream.post(HOOK, status=503)
    upstream.post(HOOK, status=500)
    upstream.post(HOOK, status=200)

    (first,) = steps.callbacks.deliver("j1", lambda *a: None)
    assert steps.job("j1").callback_error == "receiver https://receiver.test/hooks/genq answered 503"
    (second,) = steps.callbacks.deliver("j1", lambda *a: None)
    assert steps.callbacks.deliver("j1", lambda *a: None) == []

    assert isinstance(first, Notify) and isinstance(second, Notify)
    deliveries = [call.request.headers["Genq-Delivery"] for call in upstream.calls]
    job = steps.job("j1")
    assert deliveries == [job.callback_id] * 3
    assert (job.callback_state, job.callback_attempts) == ("delivered", 3)


def test_a_webhook_without_a_secret_is_never_sent_unsigned(
    steps: Steps, upstream: responses.RequestsMock
) -> None:
    from pydantic import SecretStr

    steps.with_settings(callbacks={"secret": SecretStr("")})
    _ended(steps, {"url": HOOK})
    hook = upstream.post(HOOK, status=200)

    (again,) = steps.callbacks.deliver("j1", lambda *a: None)

    assert isinstance(again, Notify) and hook.call_count == 0
    assert "GENQ_CALLBACKS_SECRET is not set" in (steps.job("j1").callback_error or "")


def test_a_webhook_to_a_private_address_is_refused_at_delivery(
    steps: Steps, upstream: responses.RequestsMock
) -> None:
    _ended(steps, {"url": "http://127.0.0.1:9/hook"})

    (again,) = steps.callbacks.deliver("j1", lambda *a: None)

    assert isinstance(again, Notify) and len(upstream.calls) == 0
    assert "refused" in (steps.job("j1").callback_error or "")
