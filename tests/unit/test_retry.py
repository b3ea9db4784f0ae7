"""The one retry rule every upstream step follows (genq.retry.after)."""

from __future__ import annotations

import random

import pytest

from genq.errors import ProtocolError, RateLimited, Throttled, UpstreamRejected, UpstreamUnavailable
from genq.retry import Again, GiveUp, after

RULE = {"limit": 4, "backoff": 2.0, "cap": 30.0}


def test_throttled_waits_its_wait_and_does_not_count() -> None:
    assert after(Throttled("held back", retry_after=7.5), 2, **RULE) == Again(7.5, 2, counted=False)


@pytest.mark.parametrize("exc", [UpstreamUnavailable("503"), ProtocolError("garbage"), RateLimited("429")])
def test_transient_and_protocol_errors_back_off_and_count_until_the_limit(exc: Exception) -> None:
    rng = random.Random(1)
    delays = []
    for errors in range(3):
        verdict = after(exc, errors, rng=rng, **RULE)  # type: ignore[arg-type]
        assert isinstance(verdict, Again) and verdict.counted and verdict.errors == errors + 1
        delays.append(verdict.delay)
    assert delays[0] < delays[1] < delays[2] <= RULE["cap"] * 1.2
    assert after(exc, 3, **RULE) == GiveUp(f"failed 4 times in a row: {exc}")  # type: ignore[arg-type]


def test_retry_after_is_a_floor() -> None:
    verdict = after(RateLimited("429", retry_after=45.0), 0, **RULE)
    assert isinstance(verdict, Again) and verdict.delay == 45.0


def test_permanent_errors_give_up_at_once() -> None:
    assert after(UpstreamRejected("GET /jobs/x: 404", 404), 0, **RULE) == GiveUp("refused: GET /jobs/x: 404")
