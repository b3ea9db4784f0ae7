"""``genq.metrics`` without Redis: buckets, families and error classes, the metered transport and limiter,
queue ages from broker messages, and how Flower shows a task's arguments."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
from pydantic import SecretStr
from requests.adapters import BaseAdapter

from genq import metrics
from genq.api import UpstreamClient
from genq.errors import GenqError
from genq.exporter import message_age
from genq.intake import job_id_for
from genq.limits import Limits, UpstreamLimiter


class FakeRecorder(metrics.Recorder):
    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def upstream(self, family: str, seconds: float, error: str | None = None) -> None:
        self.seen.append(("upstream", family, error))

    def throttled(self, family: str, wait: float) -> None:
        self.seen.append(("throttled", family, wait))

    def upstream_closed(self, seconds: float) -> None:
        self.seen.append(("closed", seconds))


class Canned(BaseAdapter):
    """Answers every request with ``status``, or raises ``error``; remembers what it was sent."""

    def __init__(self, status: int = 200, error: Exception | None = None) -> None:
        super().__init__()
        self.status, self.error, self.sent = status, error, []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        self.sent.append((request.method, request.url, kwargs.get("timeout")))
        if self.error is not None:
            raise self.error
        response = requests.Response()
        response.status_code, response._content, response.url = self.status, b'{"result": {}}', request.url
        return response

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("seconds", "label"),
    [(0.0, "0.005"), (0.005, "0.005"), (0.0051, "0.01"), (1.0, "1.0"), (30.0, "30.0"), (31, "+Inf")],
)
def test_bucket(seconds: float, label: str) -> None:
    assert metrics.bucket(seconds) == label


@pytest.mark.parametrize(
    ("method", "path", "family"),
    [
        ("POST", "/images/generation", "trigger"),
        ("POST", "/videos/generation", "trigger"),
        ("GET", "/jobs/abc", "status"),
        ("GET", "/models/m1/train", "models"),
        ("GET", "/models/m1", "models"),
        ("GET", "/elsewhere", "other"),
    ],
)
def test_family_of(method: str, path: str, family: str) -> None:
    assert metrics.family_of(method, path) == family


def test_error_classes() -> None:
    assert [metrics.status_class(s) for s in (200, 204, 301, 404, 401, 429, 500, 503)] == [
        None, None, None, "http_4xx", "http_4xx", "http_429", "http_5xx", "http_5xx",
    ]  # fmt: skip
    assert metrics.exception_class(requests.ConnectTimeout()) == "connect_timeout"
    assert metrics.exception_class(requests.ReadTimeout()) == "read_timeout"
    assert metrics.exception_class(requests.ConnectionError()) == "connection"
    assert metrics.exception_class(requests.TooManyRedirects()) == "other"


def _client(base: str, inner: BaseAdapter) -> UpstreamClient:
    client = UpstreamClient(base, SecretStr("sk-test"))
    client.session.mount(base + "/", inner)
    return client


def test_instrumented_client_records_each_request_and_still_sends_it_unchanged() -> None:
    inner = Canned(200)
    client = _client("https://api.example.test/v1", inner)
    recorder = FakeRecorder()

    assert metrics.instrument(client, recorder) is True
    assert metrics.instrument(client, recorder) is False  # once per client, however often it is called
    # The canned answer fits neither call: the client's own checks still run after the transport.
    with pytest.raises(GenqError):
        client.get_model("m1")
    with pytest.raises(GenqError):
        client.get_job("j1")

    assert recorder.seen == [("upstream", "models", None), ("upstream", "status", None)]
    assert [m for m, _, _ in inner.sent] == ["GET", "GET"]
    assert inner.sent[0][1] == "https://api.example.test/v1/models/m1"
    assert inner.sent[0][2] == client.timeout  # timeouts pass through


@pytest.mark.parametrize(
    ("inner", "error_class"),
    [
        (Canned(503), "http_5xx"),
        (Canned(429), "http_429"),
        (Canned(error=requests.ConnectTimeout()), "connect_timeout"),
        (Canned(error=requests.ConnectionError("Connection refused")), "connection"),
    ],
)
def test_failed_requests_are_recorded_with_their_class(inner: Canned, error_class: str) -> None:
    client = _client("https://api.example.test", inner)
    recorder = FakeRecorder()
    metrics.instrument(client, recorder)
    with pytest.raises(GenqError):
        client.get_job("j1")
    assert recorder.seen == [("upstream", "status", error_class)]


class ScriptsOnly:
    """Enough of a Redis client for the limiter: its acquire script refuses for 0.25 s, block says ok."""

    def register_script(self, script: str) -> Any:
        refused = "family window" in script
        return lambda keys, args: (0, "0.25") if refused else 1


def test_metered_limiter_counts_waits_and_closures() -> None:
    recorder = FakeRecorder()
    inner = UpstreamLimiter(ScriptsOnly(), Limits(total_rate=1))  # type: ignore[arg-type]
    limiter = metrics.MeteredLimiter(inner, recorder)
    assert limiter.acquire("status") == (None, 0.25)
    limiter.block(3.0)
    assert recorder.seen == [("throttled", "status", 0.25), ("closed", 3.0)]


def _message(headers: dict[str, Any]) -> bytes:
    return json.dumps(
        {"body": "W10=", "headers": {"task": "genq.poll", **headers}, "properties": {}}
    ).encode()


def test_message_age() -> None:
    assert message_age(_message({metrics.SENT_AT_HEADER: 100.0}), now=130.0) == 30.0
    # A countdown message waits only from its ETA; one not yet due has waited for nothing.
    assert (
        message_age(_message({metrics.SENT_AT_HEADER: 100.0, "eta": "1970-01-01T00:01:50+00:00"}), 130.0)
        == 20.0
    )
    assert (
        message_age(_message({metrics.SENT_AT_HEADER: 100.0, "eta": "1970-01-01T00:05:00+00:00"}), 130.0)
        == 0.0
    )
    assert message_age(_message({}), now=130.0) is None  # another client's message: no stamp
    assert message_age(b"not json", now=130.0) is None


def test_flower_shows_ids_and_kind_never_a_payload() -> None:
    from genq.worker.flower import describe

    def kind_of(job: str) -> str | None:
        return {"j1": "video"}.get(job)

    assert describe("genq.poll", "('j1', 4)", kind_of) == "video job=j1 gen=4"
    assert describe("genq.download", "['j1', 0, 1]", kind_of) == "video job=j1 index=0 attempt=1"
    assert describe("genq.submit", "('gone',)", kind_of) == "? job=gone"
    assert describe("genq.poll_model", "('style', 2)", kind_of) == "model=style gen=2"
    assert describe("genq.sweep", "()", kind_of) == ""
    intake = "({'kind': 'image', 'prompt': 'SECRET PROMPT'}, 'order-1')"
    shown = describe("genq.intake", intake, kind_of)
    assert shown == f"image request_id=order-1 job={job_id_for('order-1')}"
    assert describe("genq.intake", "({'kind': 'image', 'prompt': 'SECRET PRO...", kind_of) == "(not shown)"
    assert describe("other.task", "('x',)", kind_of) is None


class _Pipe:
    def __init__(self, sent: list[dict[str, float]]) -> None:
        self.sent = sent
        self.fields: dict[str, float] = {}

    def hincrby(self, _key: str, name: str, amount: int) -> None:
        self.fields[name] = self.fields.get(name, 0) + amount

    def hincrbyfloat(self, _key: str, name: str, value: float) -> None:
        self.fields[name] = self.fields.get(name, 0.0) + value

    def execute(self) -> None:
        self.sent.append(self.fields)


class _Client:
    def __init__(self) -> None:
        self.sent: list[dict[str, float]] = []

    def pipeline(self, transaction: bool = True) -> _Pipe:
        return _Pipe(self.sent)


def test_a_summing_recorder_writes_many_observations_in_one_round_trip() -> None:
    client = _Client()
    recorder = metrics.Recorder(client, flush_interval=3600)  # type: ignore[arg-type]
    recorder.upstream("status", 0.003)
    recorder.upstream("status", 0.004, "http_5xx")
    recorder.download(10)
    recorder.download(5)
    assert client.sent == []  # nothing written before the timer or a flush
    recorder.flush()
    assert client.sent == [
        {
            "latency:status:0.005": 2,
            "latency_count:status": 2,
            "error:status:http_5xx": 1,
            "downloads": 2,
            "download_bytes": 15,
            "latency_sum:status": pytest.approx(0.007),
        }
    ]
    recorder.flush()
    assert len(client.sent) == 1  # nothing new, nothing sent


def test_an_immediate_recorder_writes_each_observation() -> None:
    client = _Client()
    recorder = metrics.Recorder(client)  # type: ignore[arg-type]
    recorder.download(1)
    recorder.download(2)
    assert client.sent == [{"downloads": 1, "download_bytes": 1}, {"downloads": 1, "download_bytes": 2}]
