"""Service-level behaviour of each pipeline step against a real Redis, the upstream mocked with
``responses`` so each edge case is exact: duplicate deliveries, stale polls, deadlines, retries."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import responses

from genq.actions import Download, PollLater, SubmitLater
from genq.api import UpstreamClient
from genq.embedded import EmbeddedRedis
from genq.jobs import JobService
from genq.ledger import Ledger
from genq.schemas import JobKind, JobState
from genq.services import redis_client
from genq.settings import Settings, load_settings
from genq.workflows import WorkflowService
from tests.conftest import environment

pytestmark = pytest.mark.integration
API = "https://api.test"
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def settings(redis_server: EmbeddedRedis, tmp_path: Path) -> Settings:
    env = {
        "GENQ_REDIS_URL": redis_server.url,
        "GENQ_API_BASE_URL": API,
        "GENQ_API_KEY": "k",
        "GENQ_DOWNLOAD_DIR": str(tmp_path / "dl"),
        "GENQ_POLL_IMAGE": json.dumps(
            {"first_delay": 2, "interval": 2, "max_interval": 4, "deadline": 30, "jitter": 0}
        ),
        "GENQ_POLL_MAX_ERRORS": "3",
    }
    with environment(env):
        return load_settings()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(settings: Settings, clock: Clock) -> Iterator[JobService]:
    ledger = Ledger(redis_client(settings), clock=clock)
    api = UpstreamClient(API, settings.api.key)
    yield JobService(
        settings, ledger, api, requests.Session(), clock, random.Random(1), WorkflowService(ledger)
    )


@pytest.fixture
def upstream() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def _job(service: JobService, job_id: str = "j1", outputs: int = 1) -> str:
    service.ledger.create(job_id, JobKind.IMAGE, {"prompt": "p"}, expected_outputs=outputs)
    return job_id


def _status(upstream: responses.RequestsMock, status: str, **extra: object) -> None:
    upstream.get(f"{API}/jobs/up1", json={"result": {"jobId": "up1", "status": status, **extra}})


def _state(service: JobService, job_id: str = "j1") -> JobState:
    record = service.ledger.get(job_id)
    assert record is not None
    return record.state


def test_submit_then_duplicate_submit_makes_one_post(
    service: JobService, upstream: responses.RequestsMock
) -> None:
    post = upstream.post(f"{API}/images/generation", json={"result": {"jobId": "up1", "status": "created"}})
    _job(service)

    assert service.submit("j1") == [PollLater("j1", 1, 2.0)]
    assert service.submit("j1") == []

    assert post.call_count == 1
    record = service.ledger.get("j1")
    assert record is not None and record.state is JobState.SUBMITTED and record.upstream_id == "up1"


def test_redelivered_submit_after_a_crash_mid_post_ends_submit_unknown(
    service: JobService, upstream: responses.RequestsMock, clock: Clock
) -> None:
    post = upstream.post(f"{API}/images/generation", json={"jobId": "up1"})
    _job(service)
    service.ledger.transition("j1", [JobState.PENDING], JobState.SUBMITTING)  # the crashed worker's step

    assert service.submit("j1") == []  # too soon: the first attempt may still be running
    assert _state(service) is JobState.SUBMITTING
    clock.now += 120
    assert service.submit("j1") == []

    assert post.call_count == 0
    record = service.ledger.get("j1")
    assert record is not None and record.state is JobState.SUBMIT_UNKNOWN
    assert "never paid twice" in (record.error or "")


def test_submit_429_goes_back_to_pending_and_honours_retry_after(
    service: JobService, upstream: responses.RequestsMock
) -> None:
    upstream.post(f"{API}/images/generation", status=429, headers={"Retry-After": "9"})
    _job(service)

    (action,) = service.submit("j1")

    assert isinstance(action, SubmitLater) and action.delay >= 9
    assert _state(service) is JobState.PENDING


def test_submit_read_timeout_is_not_retried(service: JobService, upstream: responses.RequestsMock) -> None:
    upstream.post(f"{API}/images/generation", body=requests.ReadTimeout("slow"))
    _job(service)

    assert service.submit("j1") == []
    assert _state(service) is JobState.SUBMIT_UNKNOWN


def _submitted(service: JobService, upstream: responses.RequestsMock, outputs: int = 1) -> None:
    upstream.post(f"{API}/images/generation", json={"jobId": "up1"})
    _job(service, outputs=outputs)
    service.submit("j1")


def test_poll_reschedules_and_a_stale_poll_does_nothing(
    service: JobService, upstream: responses.RequestsMock
) -> None:
    _submitted(service, upstream)
    _status(upstream, "RUNNING")

    assert service.poll("j1", 1) == [PollLater("j1", 2, 2.0)]
    assert service.poll("j1", 1) == []  # duplicate of the first poll
    assert service.poll("j1", 2) == [PollLater("j1", 3, 2.5)]

    record = service.ledger.get("j1")
    assert record is not None
    assert (record.state, record.polls, record.upstream_status) == (JobState.RUNNING, 2, "running")


def test_poll_success_leads_to_downloads_and_finalize(
    service: JobService, upstream: responses.RequestsMock
) -> None:
    _submitted(service, upstream, outputs=2)
    images = [{"id": f"i{i}", "url": f"https://files.test/{i}.png?token=secret"} for i in range(2)]
    _status(upstream, "success", images=images)
    for i in range(2):
        upstream.get(f"https://files.test/{i}.png", body=PNG, content_type="image/png")

    assert service.poll("j1", 1) == [Download("j1", 0), Download("j1", 1)]
    assert service.download("j1", 0, 0) == []
    assert _state(service) is JobState.DOWNLOADING
    assert service.download("j1", 1, 0) == []  # the last one finalizes the job in the same task
    assert _state(service) is JobState.SUCCEEDED
    assert service.download("j1", 1, 0) == []  # duplicate delivery: no second download
    assert service.finalize("j1") == []  # a finalize the sweeper sent changes nothing

    record = service.ledger.get("j1")
    assert record is not None and record.state is JobState.SUCCEEDED
    assert [o.remote_id for o in record.outputs] == ["i0", "i1"]
    assert service.ledger.get_url("j1", 0) is None  # URLs with tokens are dropped once done
    assert len(upstream.calls) == 2 + 2  # POST, GET status, 2 files


def test_poll_failed_records_the_upstream_reason(
    service: JobService, upstream: responses.RequestsMock
) -> None:
    _submitted(service, upstream)
    _status(upstream, "failed", error="nsfw filter")

    assert service.poll("j1", 1) == []
    record = service.ledger.get("j1")
    assert record is not None and record.state is JobState.FAILED
    assert record.error == "upstream job failed: nsfw filter"


def test_transient_poll_errors_back_off_then_fail_after_the_limit(
    service: JobService, upstream: responses.RequestsMock
) -> None:
    _submitted(service, upstream)
    upstream.get(f"{API}/jobs/up1", status=503)

    delays = []
    gen = 1
    for _ in range(2):
        (action,) = service.poll("j1", gen)
        assert isinstance(action, PollLater)
        delays.append(action.delay)
        gen = action.gen
    assert service.poll("j1", gen) == []

    assert delays[1] > delays[0]
    record = service.ledger.get("j1")
    assert record is not None and record.state is JobState.FAILED
    assert "3 times in a row" in (record.error or "") and "503" in (record.error or "")


def test_unknown_status_is_a_protocol_error_with_bounded_retries(
    service: JobService, upstream: responses.RequestsMock
) -> None:
    _submitted(service, upstream)
    _status(upstream, "exploded")
    gen = 1
    for _ in range(2):
        (action,) = service.poll("j1", gen)
        assert isinstance(action, PollLater)
        gen = action.gen
    service.poll("j1", gen)
    record = service.ledger.get("j1")
    assert record is not None and record.state is JobState.FAILED
    assert "unknown upstream status" in (record.error or "")


def test_deadline_times_the_job_out_and_stops_polling(
    service: JobService, upstream: responses.RequestsMock, clock: Clock
) -> None:
    _submitted(service, upstream)
    get = upstream.get(f"{API}/jobs/up1", json={"result": {"jobId": "up1", "status": "running"}})
    clock.now += 31

    assert service.poll("j1", 1) == []
    assert get.call_count == 0
    record = service.ledger.get("j1")
    assert record is not None and record.state is JobState.TIMED_OUT
    assert "30s" in (record.error or "")


def test_a_poll_is_never_scheduled_past_the_deadline(
    service: JobService, upstream: responses.RequestsMock, clock: Clock
) -> None:
    _submitted(service, upstream)
    _status(upstream, "running")
    clock.now += 29

    (action,) = service.poll("j1", 1)

    assert isinstance(action, PollLater) and action.delay == pytest.approx(1.0)


def test_refused_download_fails_the_job_and_leaves_no_file(
    service: JobService, upstream: responses.RequestsMock, settings: Settings
) -> None:
    _submitted(service, upstream)
    _status(upstream, "success", images=[{"id": "i0", "url": "https://files.test/0.png"}])
    upstream.get("https://files.test/0.png", body=b"<html>", content_type="text/html")
    service.poll("j1", 1)

    assert service.download("j1", 0, 0) == []

    record = service.ledger.get("j1")
    assert record is not None and record.state is JobState.FAILED and "content type" in (record.error or "")
    assert [p for p in settings.download.dir.rglob("*") if p.is_file()] == []


def test_resubmit_is_the_deliberate_way_out_of_submit_unknown(
    service: JobService, upstream: responses.RequestsMock
) -> None:
    from genq.control import resubmit

    post = upstream.post(f"{API}/images/generation", body=requests.ReadTimeout("slow"))
    _job(service)
    service.submit("j1")
    assert _state(service) is JobState.SUBMIT_UNKNOWN
    gen = resubmit(service.ledger, "j1")
    assert gen == 1
    assert resubmit(service.ledger, "j1") is None  # only from submit_unknown
    upstream.replace(responses.POST, f"{API}/images/generation", json={"jobId": "up2"})

    assert service.submit("j1", 0) == []  # a message of the chain before the resubmit: stale
    assert service.submit("j1", gen) == [PollLater("j1", gen + 1, 2.0)]
    record = service.ledger.get("j1")
    assert record is not None and record.state is JobState.SUBMITTED and record.upstream_id == "up2"
    assert record.finished_at is None and record.error is None
    assert post.call_count == 1


def test_at_least_once_setting_retries_an_interrupted_submit(
    settings: Settings, service: JobService, upstream: responses.RequestsMock, clock: Clock
) -> None:
    service.settings = settings.model_copy(
        update={"api": settings.api.model_copy(update={"submit_at_least_once": True})}
    )
    _job(service)
    service.ledger.transition("j1", [JobState.PENDING], JobState.SUBMITTING)  # a crashed worker's step
    clock.now += 120

    assert service.submit("j1") == [SubmitLater("j1", 0.0, 1)]
    assert _state(service) is JobState.PENDING
