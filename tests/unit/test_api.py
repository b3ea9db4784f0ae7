"""``genq.api.UpstreamClient`` against ``responses``: one request per call, typed errors, no key leaks."""

from __future__ import annotations

import email.utils
import json
import pickle
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
import responses
from pydantic import SecretStr
from responses import matchers

from genq.api import MAX_RETRY_AFTER, UpstreamClient, parse_retry_after
from genq.errors import (
    GenqError,
    PermanentError,
    ProtocolError,
    RateLimited,
    TransientError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from genq.schemas import JobKind, UpstreamStatus

KEY = "sk-CANARY-123"
BASE = "https://api.example.test/v1"
JOB_URL = BASE + "/jobs/job-1"
TRIGGER_URL = BASE + "/images/generation"


@pytest.fixture
def client() -> UpstreamClient:
    # The trailing slash must be dropped, or every path would get a double slash.
    return UpstreamClient(BASE + "/", SecretStr(KEY), connect_timeout=1.5, read_timeout=4.0)


@pytest.fixture
def mock() -> Any:
    with responses.RequestsMock(assert_all_requests_are_fired=True) as rsps:
        yield rsps


def _raise(call: Any) -> GenqError:
    with pytest.raises(GenqError) as info:
        call()
    return info.value


# ------------------------------------------------------------------ trigger


@pytest.mark.parametrize(
    "answer",
    [
        {"result": {"jobId": "job-42", "status": "created"}},
        {"jobId": "job-42"},
    ],
    ids=["wrapped", "bare"],
)
def test_trigger_accepts_both_answer_shapes(
    client: UpstreamClient, mock: Any, answer: dict[str, Any]
) -> None:
    body = {"prompt": "a red fox", "num_images": 2}
    mock.post(
        TRIGGER_URL,
        json=answer,
        match=[
            matchers.json_params_matcher(body),
            matchers.header_matcher({"Authorization": f"Bearer {KEY}"}),
        ],
    )

    job = client.trigger(JobKind.IMAGE, body)

    assert job.job_id == "job-42"
    assert job.status is UpstreamStatus.CREATED
    assert len(mock.calls) == 1
    request = mock.calls[0].request
    assert request.method == "POST"
    assert request.url == TRIGGER_URL
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert json.loads(request.body) == body


def test_every_call_carries_the_configured_timeout(client: UpstreamClient, mock: Any) -> None:
    mock.get(JOB_URL, json={"result": {"jobId": "job-1", "status": "queued"}})
    client.get_job("job-1")
    assert mock.calls[0].request.req_kwargs["timeout"] == (1.5, 4.0)


@pytest.mark.parametrize(
    ("kind", "path"),
    [(JobKind.UPSCALE, "/images/upscaling"), (JobKind.VIDEO, "/videos/generation")],
)
def test_trigger_paths_per_kind(client: UpstreamClient, mock: Any, kind: JobKind, path: str) -> None:
    mock.post(BASE + path, json={"jobId": "j"})
    assert client.trigger(kind, {"x": 1}).job_id == "j"


def test_trigger_answer_without_job_id_is_a_protocol_error(client: UpstreamClient, mock: Any) -> None:
    mock.post(TRIGGER_URL, json={"result": {"status": "created"}})
    with pytest.raises(ProtocolError, match="jobId"):
        client.trigger(JobKind.IMAGE, {"prompt": "p"})


# ------------------------------------------------------------------ get_job


def test_get_job_lowercases_status_and_parses_outputs(client: UpstreamClient, mock: Any) -> None:
    mock.get(
        JOB_URL,
        json={
            "result": {
                "jobId": "job-1",
                "status": "SUCCESS",
                "images": [
                    {"id": "img-a", "url": "https://cdn.test/a.png?sig=1"},
                    {"id": "img-b", "url": "https://cdn.test/b.png?sig=2", "extra": "ignored"},
                ],
                "videos": [{"id": "vid-a", "url": "https://cdn.test/a.mp4"}],
                "modelId": "m-1",
                "createdAt": "2024-01-01T00:00:00Z",
            }
        },
    )

    job = client.get_job("job-1")

    assert job.status is UpstreamStatus.SUCCESS
    assert not job.status.working
    assert [(o.id, o.url) for o in job.images] == [
        ("img-a", "https://cdn.test/a.png?sig=1"),
        ("img-b", "https://cdn.test/b.png?sig=2"),
    ]
    assert [o.id for o in job.videos] == ["vid-a"]
    assert [o.id for o in job.outputs] == ["img-a", "img-b", "vid-a"]
    assert job.model_id == "m-1"
    assert job.created_at == "2024-01-01T00:00:00Z"
    assert mock.calls[0].request.method == "GET"
    assert mock.calls[0].request.headers["Authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Running", UpstreamStatus.RUNNING),
        (" queued ", UpstreamStatus.QUEUED),
        ("FAILED", UpstreamStatus.FAILED),
        ("created", UpstreamStatus.CREATED),
    ],
)
def test_get_job_status_compared_lower_cased(
    client: UpstreamClient, mock: Any, raw: str, expected: UpstreamStatus
) -> None:
    mock.get(JOB_URL, json={"result": {"jobId": "job-1", "status": raw}})
    assert client.get_job("job-1").status is expected


def test_get_job_null_outputs_are_empty(client: UpstreamClient, mock: Any) -> None:
    mock.get(JOB_URL, json={"result": {"jobId": "job-1", "status": "failed", "images": None, "videos": None}})
    job = client.get_job("job-1")
    assert job.images == []
    assert job.videos == []
    assert job.outputs == []


def test_get_job_failed_carries_the_reason(client: UpstreamClient, mock: Any) -> None:
    mock.get(JOB_URL, json={"result": {"jobId": "job-1", "status": "failed", "error": "NSFW filter"}})
    job = client.get_job("job-1")
    assert job.status is UpstreamStatus.FAILED
    assert job.error == "NSFW filter"


def test_get_job_quotes_the_id_into_one_path_segment(client: UpstreamClient, mock: Any) -> None:
    mock.get(BASE + "/jobs/a%2F..%2Fb%3Fx", json={"result": {"jobId": "a/../b?x", "status": "queued"}})
    assert client.get_job("a/../b?x").job_id == "a/../b?x"
    assert mock.calls[0].request.url == BASE + "/jobs/a%2F..%2Fb%3Fx"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"json": {"result": {"jobId": "job-1", "status": "exploded"}}}, "exploded"),
        ({"json": {"result": {"jobId": "job-1", "status": "succeeded"}}}, "unknown upstream status"),
        ({"body": "{not json", "content_type": "application/json"}, "not JSON"),
        ({"body": "<html>oops</html>", "content_type": "text/html"}, "not JSON"),
        ({"json": [1, 2, 3]}, "JSON object"),
        ({"json": "job-1"}, "JSON object"),
        ({"json": {"result": None}}, "JSON object"),
        ({"json": {"result": {"jobId": "job-1", "images": [{"id": "x"}]}}}, "images"),
        ({"json": {"result": {"jobId": "job-2", "status": "success"}}}, "job-2"),
        ({"json": {"result": {"jobId": 1, "status": "success"}}}, "jobId"),
    ],
    ids=[
        "unknown-status",
        "near-miss-status",
        "malformed-json",
        "html",
        "array",
        "string",
        "null-result",
        "output-without-url",
        "job-id-mismatch",
        "job-id-not-a-string",
    ],
)
def test_get_job_protocol_errors(
    client: UpstreamClient, mock: Any, kwargs: dict[str, Any], match: str
) -> None:
    mock.get(JOB_URL, **kwargs)
    with pytest.raises(ProtocolError, match=match) as info:
        client.get_job("job-1")
    # Not permanent: the request reached the upstream (a trigger may be paid for); callers decide.
    assert not isinstance(info.value, PermanentError | TransientError)
    assert KEY not in str(info.value)


# ------------------------------------------------------------------ HTTP errors


@pytest.mark.parametrize(("status", "ambiguous"), [(500, False), (502, True), (503, False), (504, True)])
def test_5xx_is_unavailable_and_gateway_errors_are_ambiguous(
    client: UpstreamClient, mock: Any, status: int, ambiguous: bool
) -> None:
    """A 502/504 comes from a gateway that had passed the request on: the upstream may have acted."""
    mock.get(JOB_URL, status=status, body="upstream down")
    exc = _raise(lambda: client.get_job("job-1"))
    assert type(exc) is UpstreamUnavailable
    assert isinstance(exc, TransientError)
    assert exc.ambiguous is ambiguous
    assert exc.retry_after is None
    assert str(status) in str(exc)
    assert "upstream down" in str(exc)


def test_503_honours_retry_after(client: UpstreamClient, mock: Any) -> None:
    mock.get(JOB_URL, status=503, json={"message": "maintenance"}, headers={"Retry-After": "12"})
    exc = _raise(lambda: client.get_job("job-1"))
    assert isinstance(exc, UpstreamUnavailable)
    assert exc.retry_after == 12.0
    assert "maintenance" in str(exc)


def test_429_with_seconds(client: UpstreamClient, mock: Any) -> None:
    mock.post(TRIGGER_URL, status=429, headers={"Retry-After": "7"})
    exc = _raise(lambda: client.trigger(JobKind.IMAGE, {"prompt": "p"}))
    assert type(exc) is RateLimited
    assert isinstance(exc, TransientError)
    assert exc.retry_after == 7.0


def test_429_without_retry_after(client: UpstreamClient, mock: Any) -> None:
    mock.get(JOB_URL, status=429)
    exc = _raise(lambda: client.get_job("job-1"))
    assert isinstance(exc, RateLimited)
    assert exc.retry_after is None


def test_429_with_http_date(client: UpstreamClient, mock: Any) -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    mock.get(JOB_URL, status=429, headers={"Retry-After": email.utils.format_datetime(when, usegmt=True)})
    exc = _raise(lambda: client.get_job("job-1"))
    assert isinstance(exc, RateLimited)
    assert exc.retry_after == pytest.approx(30, abs=2)


def test_401_names_the_key_variable(client: UpstreamClient, mock: Any) -> None:
    mock.get(JOB_URL, status=401, json={"error": "invalid token"})
    exc = _raise(lambda: client.get_job("job-1"))
    assert type(exc) is UpstreamRejected
    assert isinstance(exc, PermanentError)
    assert exc.status == 401
    assert "GENQ_API_KEY" in str(exc)


@pytest.mark.parametrize("status", [403, 404, 409, 422])
def test_other_4xx_are_permanent_rejections(client: UpstreamClient, mock: Any, status: int) -> None:
    mock.get(JOB_URL, status=status, json={"detail": "nope"})
    exc = _raise(lambda: client.get_job("job-1"))
    assert type(exc) is UpstreamRejected
    assert isinstance(exc, PermanentError)
    assert not isinstance(exc, TransientError)
    assert exc.status == status
    assert "nope" in str(exc)


def test_400_carries_the_upstream_error(client: UpstreamClient, mock: Any) -> None:
    mock.post(TRIGGER_URL, status=400, json={"error": "bad prompt"})
    exc = _raise(lambda: client.trigger(JobKind.IMAGE, {"prompt": ""}))
    assert isinstance(exc, UpstreamRejected)
    assert exc.status == 400
    assert "bad prompt" in str(exc)
    assert "POST /images/generation" in str(exc)


def test_error_detail_is_truncated(client: UpstreamClient, mock: Any) -> None:
    mock.post(TRIGGER_URL, status=400, json={"error": "x" * 5000})
    exc = _raise(lambda: client.trigger(JobKind.IMAGE, {"prompt": "p"}))
    assert "x" * 200 in str(exc)
    assert "x" * 201 not in str(exc)


# ------------------------------------------------------------------ transport errors


@pytest.mark.parametrize(
    ("error", "ambiguous"),
    [
        (requests.ConnectionError("HTTPConnectionPool: [Errno 111] Connection refused"), False),
        (requests.ConnectionError("NewConnectionError('Failed to establish a new connection')"), False),
        (requests.ConnectionError("NameResolutionError: Failed to resolve 'api.example.test'"), False),
        (
            requests.ConnectionError("('Connection aborted.', ConnectionResetError(104, 'reset by peer'))"),
            True,
        ),
        (requests.ReadTimeout("read timed out"), True),
        (requests.ConnectTimeout("connect timed out"), False),
        (requests.exceptions.ChunkedEncodingError("broken chunk"), True),
    ],
    ids=["refused", "new-connection", "dns", "reset", "read-timeout", "connect-timeout", "chunked"],
)
def test_transport_errors_are_unavailable(
    client: UpstreamClient, mock: Any, error: Exception, ambiguous: bool
) -> None:
    mock.post(TRIGGER_URL, body=error)
    exc = _raise(lambda: client.trigger(JobKind.IMAGE, {"prompt": "p"}))
    assert type(exc) is UpstreamUnavailable
    assert exc.ambiguous is ambiguous
    assert exc.__cause__ is None
    assert exc.__suppress_context__ is True
    assert "POST /images/generation" in str(exc)


# ------------------------------------------------------------------ secrets


def _register_every_error(mock: Any) -> list[str]:
    """Every error case above on its own job id; returns the ids."""
    cases: list[dict[str, Any]] = [
        {"status": 500, "body": "boom"},
        {"status": 502, "json": {"error": "bad gateway"}},
        {"status": 503, "headers": {"Retry-After": "3"}},
        {"status": 429, "headers": {"Retry-After": "7"}},
        {"status": 401, "json": {"error": "invalid token"}},
        {"status": 403, "json": {"message": "forbidden"}},
        {"status": 404, "json": {"detail": "no such job"}},
        {"status": 400, "json": {"error": "bad prompt"}},
        {"body": "{broken", "content_type": "application/json"},
        {"json": [1]},
        {"json": {"result": {"jobId": "other", "status": "queued"}}},
        {"json": {"result": {"jobId": "x", "status": "weird"}}},
        {"body": requests.ConnectionError("Connection refused")},
        {"body": requests.ConnectionError("Connection reset by peer")},
        {"body": requests.ReadTimeout("read timed out")},
        {"body": requests.ConnectTimeout("connect timed out")},
    ]
    ids = []
    for n, kwargs in enumerate(cases):
        job_id = f"case-{n}"
        mock.get(f"{BASE}/jobs/{job_id}", **kwargs)
        ids.append(job_id)
    return ids


def test_api_key_never_in_messages_or_repr(client: UpstreamClient, mock: Any) -> None:
    seen: list[type[GenqError]] = []
    for job_id in _register_every_error(mock):
        exc = _raise(lambda job_id=job_id: client.get_job(job_id))
        seen.append(type(exc))
        for text in (str(exc), repr(exc), repr(exc.args), str(pickle.loads(pickle.dumps(exc)))):
            assert KEY not in text, (job_id, text)
            assert "CANARY" not in text, (job_id, text)
    assert set(seen) == {UpstreamUnavailable, RateLimited, UpstreamRejected, ProtocolError}
    assert KEY not in repr(client)
    assert repr(client) == f"UpstreamClient({BASE!r})"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"status": 403, "json": {"error": f"token 'Bearer {KEY}' lacks the images scope"}},
        {"status": 500, "body": f"debug: headers={{'Authorization': 'Bearer {KEY}'}}"},
        {"status": 200, "body": f"<html>echo {KEY}</html>"},
    ],
    ids=["403-json", "500-text", "200-not-json"],
)
def test_api_key_echoed_by_upstream_is_redacted(client: UpstreamClient, mock: Any, kwargs: Any) -> None:
    mock.post(TRIGGER_URL, **kwargs)
    exc = _raise(lambda: client.trigger(JobKind.IMAGE, {"prompt": "p"}))
    assert KEY not in str(exc)
    assert KEY not in repr(exc)
    assert KEY not in str(pickle.loads(pickle.dumps(exc)))
    assert "[REDACTED]" in str(exc)


# ------------------------------------------------------------------ pickling (Celery ships errors)


def test_raised_errors_survive_pickle(client: UpstreamClient, mock: Any) -> None:
    mock.get(BASE + "/jobs/a", status=429, headers={"Retry-After": "7"})
    mock.get(BASE + "/jobs/b", body=requests.ReadTimeout("slow"))
    mock.get(BASE + "/jobs/c", status=404)
    mock.get(BASE + "/jobs/d", status=503, headers={"Retry-After": "9"})

    rate = _raise(lambda: client.get_job("a"))
    timeout = _raise(lambda: client.get_job("b"))
    missing = _raise(lambda: client.get_job("c"))
    down = _raise(lambda: client.get_job("d"))

    for exc in (rate, timeout, missing, down):
        copy = pickle.loads(pickle.dumps(exc))
        assert type(copy) is type(exc)
        assert str(copy) == str(exc)
    assert pickle.loads(pickle.dumps(rate)).retry_after == 7.0
    assert pickle.loads(pickle.dumps(timeout)).ambiguous is True
    assert pickle.loads(pickle.dumps(missing)).status == 404
    down_copy = pickle.loads(pickle.dumps(down))
    assert (down_copy.retry_after, down_copy.ambiguous) == (9.0, False)


@pytest.mark.parametrize(
    ("exc", "attrs"),
    [
        (RateLimited("slow down", retry_after=2.5), {"retry_after": 2.5}),
        (TransientError("later", retry_after=None), {"retry_after": None}),
        (
            UpstreamUnavailable("reset", retry_after=4.0, ambiguous=True),
            {"retry_after": 4.0, "ambiguous": True},
        ),
        (UpstreamUnavailable("refused"), {"retry_after": None, "ambiguous": False}),
        (UpstreamRejected("gone", 410), {"status": 410}),
        (ProtocolError("garbage"), {}),
    ],
)
def test_constructed_errors_survive_pickle(exc: GenqError, attrs: dict[str, Any]) -> None:
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc)
    assert str(copy) == str(exc)
    for name, value in attrs.items():
        assert getattr(copy, name) == value


# ------------------------------------------------------------------ parse_retry_after

NOW = datetime(2030, 5, 17, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("2.5", 2.5),
        ("7.", 7.0),
        (".5", 0.5),
        # Not delta-seconds (RFC 9110: 1*DIGIT): treated as absent, which error_delay reads as 0.
        ("-3", None),
        ("-0.5", None),
        (email.utils.format_datetime(NOW + timedelta(seconds=30), usegmt=True), 30.0),
        (email.utils.format_datetime(NOW + timedelta(minutes=2)), 120.0),
        (email.utils.format_datetime(NOW - timedelta(seconds=30), usegmt=True), 0.0),
        ("soon", None),
        ("Wed, 99 Foo 2030 99:99:99 GMT", None),
        ("", None),
        ("   ", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW.timestamp()) == expected


def test_parse_retry_after_http_date_uses_the_clock() -> None:
    header = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=45), usegmt=True)
    assert parse_retry_after(header) == pytest.approx(45, abs=2)


@pytest.mark.parametrize("value", ["inf", "1e400", "Infinity", "nan", "1_0", "+5", "0x10", "7 s"])
def test_parse_retry_after_refuses_what_is_not_delta_seconds(value: str) -> None:
    assert parse_retry_after(value, now=NOW.timestamp()) is None


@pytest.mark.parametrize(
    "value",
    [
        "999999",
        "86400.5",
        email.utils.format_datetime(NOW + timedelta(days=2), usegmt=True),
    ],
)
def test_parse_retry_after_is_capped(value: str) -> None:
    assert parse_retry_after(value, now=NOW.timestamp()) == MAX_RETRY_AFTER == 3600.0


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_with_superscript_digit(client: UpstreamClient, mock: Any, status: int) -> None:
    mock.get(JOB_URL, status=status, headers={"Retry-After": "\xb2"})
    exc = _raise(lambda: client.get_job("job-1"))
    assert isinstance(exc, TransientError)
    assert exc.retry_after is None
