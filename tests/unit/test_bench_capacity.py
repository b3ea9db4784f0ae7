"""The capacity benchmark's check of jobs submitted through the producer: every job in flight once,
one POST each. Pure arithmetic; no services."""

from __future__ import annotations

from benchmarks.b3_capacity import submit_faults


def test_every_job_in_flight_once_with_one_post_is_no_fault() -> None:
    records = [("submitted", 1, f"u{i}") for i in range(5)]
    faults = submit_faults(5, records, posts=5, moves=5)
    assert faults["faults"] == 0 and faults["in_flight_once"] == 5
    assert faults["states"] == {"submitted": 5}


def test_a_job_running_after_its_first_poll_is_in_flight() -> None:
    records = [("submitted", 1, "u0"), ("running", 1, "u1")]
    assert submit_faults(2, records, posts=2, moves=2)["faults"] == 0


def test_a_lost_or_stuck_job_is_a_fault() -> None:
    records = [("submitted", 1, "u0"), (None, 0, None), ("submit_unknown", 1, None), ("failed", 1, None)]
    faults = submit_faults(5, records, posts=5)
    # one record missing from the list and one without a record: both lost
    assert faults["lost"] == 2 and faults["not_submitted"] == 2
    assert faults["missing_posts"] == 0 and faults["faults"] == 4


def test_a_second_post_or_a_retry_is_a_fault() -> None:
    records = [("submitted", 2, "u0"), ("submitted", 1, "u1")]
    faults = submit_faults(2, records, posts=3)
    assert faults["retried"] == 1 and faults["extra_posts"] == 1 and faults["faults"] == 2
    assert faults["in_flight_once"] == 1


def test_jobs_sharing_an_upstream_job_or_moved_twice_are_faults() -> None:
    records = [("submitted", 1, "u0"), ("submitted", 1, "u0"), ("submitted", 1, None)]
    faults = submit_faults(3, records, posts=3, moves=4)
    assert faults["shared_upstream_id"] == 1 and faults["no_upstream_id"] == 1
    assert faults["moves_off"] == 1 and faults["faults"] == 3
    assert faults["in_flight_once"] == 1


def test_missing_posts_are_a_fault() -> None:
    faults = submit_faults(2, [("submitted", 1, "u0"), ("submitted", 1, "u1")], posts=1)
    assert faults["missing_posts"] == 1 and faults["faults"] == 1
