"""Security: untrusted output URLs and names, download caps, secrets that must leak nowhere, Redis
with a password and over TLS."""

from __future__ import annotations

import http.server
import random
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import responses

from genq.api import UpstreamClient
from genq.downloads import DownloadRules, fetch
from genq.embedded import EmbeddedRedis
from genq.errors import DownloadRefused
from genq.jobs import JobService, net_policy
from genq.netguard import NetPolicy, guarded_session
from genq.schemas import JobKind, JobState
from genq.services import ledger_for, redis_client
from genq.settings import Settings
from genq.simulator import SimConfig
from genq.workflows import WorkflowService
from tests.helpers import Stack, environment, wait_all

pytestmark = pytest.mark.integration
API = "https://api.test"
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64


# ---------------------------------------------------------------- untrusted output URLs and ids


@pytest.fixture
def service(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[JobService]:
    env = {"GENQ_REDIS_URL": redis_server.url, "GENQ_API_BASE_URL": API, "GENQ_API_KEY": "k",
           "GENQ_DOWNLOAD_DIR": str(tmp_path / "dl")}  # fmt: skip
    with environment(env):
        from genq.settings import load_settings

        settings: Settings = load_settings()
    ledger = ledger_for(redis_client(settings), settings)
    files = guarded_session(net_policy(settings))
    api = UpstreamClient(API, settings.api.key)
    yield JobService(settings, ledger, api, files, time.time, random.Random(1), WorkflowService(ledger))


def _job_with_outputs(service: JobService, outputs: list[dict[str, str]]) -> str:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(f"{API}/images/generation", json={"jobId": "up1"})
        mock.get(f"{API}/jobs/up1", json={"result": {"jobId": "up1", "status": "success", "images": outputs}})
        service.ledger.create("j1", JobKind.IMAGE, {"prompt": "p"}, expected_outputs=len(outputs))
        service.submit("j1")
        service.poll("j1", 1)
    return "j1"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://169.254.169.254/latest/meta-data/", "link"),
        ("https://127.1/x.png", "loopback"),
        ("https://2130706433/x.png", "loopback"),
        ("https://[::ffff:127.0.0.1]/x.png", "loopback"),
        ("https://10.0.0.7/x.png", "private"),
        ("file:///etc/passwd", "scheme"),
        ("http://cdn.example.com/x.png", "scheme"),
        ("https://user@cdn.example.com/x.png", "credentials"),
    ],
)
def test_an_output_url_pointing_inside_fails_the_job_with_the_reason(
    service: JobService, url: str, why: str
) -> None:
    job_id = _job_with_outputs(service, [{"id": "i0", "url": url}])
    assert service.download(job_id, 0, 0) == []
    record = service.ledger.get(job_id)
    assert record is not None and record.state is JobState.FAILED
    assert record.error and "output 0" in record.error
    assert not any(p.is_file() for p in service.settings.download.dir.rglob("*"))


def test_a_name_resolving_to_loopback_is_refused_at_connect(
    service: JobService, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    real = socket.getaddrinfo
    monkeypatch.setattr(
        socket, "getaddrinfo",
        lambda host, *a, **k: real("127.0.0.1", *a, **k) if host == "cdn.evil.test" else real(host, *a, **k),
    )  # fmt: skip
    job_id = _job_with_outputs(service, [{"id": "i0", "url": "https://cdn.evil.test/x.png"}])
    service.download(job_id, 0, 0)
    record = service.ledger.get(job_id)
    assert record is not None and record.state is JobState.FAILED and "loopback" in (record.error or "")


@pytest.mark.parametrize(
    "remote_id", ["../../escape", "/etc/passwd", "%2e%2e%2fx", "a\x00b", "..\\..\\x", "CON"]
)
def test_remote_ids_never_name_files(service: JobService, remote_id: str) -> None:
    job_id = _job_with_outputs(service, [{"id": remote_id, "url": "https://cdn.example.com/x.png"}])
    with responses.RequestsMock() as mock:
        mock.get("https://cdn.example.com/x.png", body=PNG, content_type="image/png")
        service.download(job_id, 0, 0)
    record = service.ledger.get(job_id)
    assert record is not None and record.state is JobState.SUCCEEDED  # the last file finalizes the job
    (out,) = record.outputs
    assert Path(out.path) == service.settings.download.dir / job_id / "00.png"
    assert out.remote_id == remote_id  # kept as data, never as a path
    files = [p for p in service.settings.download.dir.rglob("*") if p.is_file()]
    assert files == [service.settings.download.dir / job_id / "00.png"]


# ---------------------------------------------------------------- hostile file servers


def _gzip_bomb(megabytes: int) -> bytes:
    """``megabytes`` MB of zeros, gzip-compressed a megabyte at a time (never all in memory)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip framing
    block = bytes(1024 * 1024)
    return b"".join(packer.compress(block) for _ in range(megabytes)) + packer.flush()


BOMB = _gzip_bomb(50)


class Hostile(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/bomb"):
            body = BOMB  # 50 MB of zeros in ~50 KB
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path.startswith("/endless"):
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"\1" * 65536
            try:
                while True:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                return
        elif self.path.startswith("/drip"):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(100000):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                return

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hostile() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


LOCAL = NetPolicy(allow_http=True, allow_private=True)


def _peak_kb() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@pytest.mark.parametrize(
    ("path", "media", "words"), [("/bomb", "image", "cap"), ("/endless", "video", "cap")]
)
def test_bombs_and_endless_bodies_stop_at_the_cap_with_bounded_memory(
    hostile: str, tmp_path: Path, path: str, media: str, words: str
) -> None:
    rules = DownloadRules(max_bytes=5 * 1024 * 1024, timeout=30, chunk_bytes=64 * 1024, net=LOCAL)
    before = _peak_kb()
    with pytest.raises(DownloadRefused, match=words):
        fetch(guarded_session(LOCAL), hostile + path, tmp_path, "00", rules, media)
    assert (_peak_kb() - before) < 40 * 1024  # the 50 MB bomb never sits in memory
    assert list(tmp_path.iterdir()) == []


def test_a_slow_drip_is_cut_by_the_wall_clock_limit(hostile: str, tmp_path: Path) -> None:
    rules = DownloadRules(max_bytes=10**6, timeout=1.5, chunk_bytes=1024, net=LOCAL)
    started = time.monotonic()
    with pytest.raises(DownloadRefused, match="limit"):
        fetch(guarded_session(LOCAL), hostile + "/drip", tmp_path, "00", rules, "image")
    assert time.monotonic() - started < 10
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- secrets


CANARY_KEY = "sk-CANARY-7f3e9a"
CANARY_TOKEN = "tok-CANARY-41c2"


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(api_key=CANARY_KEY, file_token=CANARY_TOKEN, images_per_job=1)


def test_canary_key_and_url_token_appear_nowhere(stack: Stack, tmp_path: Path) -> None:
    stack.worker(queues=("submit", "poll", "training"))
    downloader = stack.worker(queues=("download",))
    stack.beat()
    producer = stack.producer()
    ok = [producer.submit_image(f"canary {i}") for i in range(3)]
    failing = producer.submit_image("canary [sim:fail]")
    wait_all(producer, [j.id for j in (*ok, failing)], timeout=30)
    # A job whose file URLs expire before its download: HTTP errors whose messages carry URLs.
    downloader.stop()
    expired = producer.submit_image("canary expired URL")
    deadline = time.monotonic() + 20
    while producer.status(expired.id).state is not JobState.DOWNLOADING and time.monotonic() < deadline:
        time.sleep(0.1)
    stack.sim.configure(file_token="rotated")
    stack.worker(queues=("download",))
    (record,) = wait_all(producer, [expired.id], timeout=30)
    assert record.state is JobState.FAILED and "403" in (record.error or "")
    # A worker with a wrong key, whose 401 must not echo any key either.
    cli = subprocess.run(
        [str(Path(__import__("sys").executable).with_name("genq")), "status", expired.id, "--json"],
        env={**__import__("os").environ, **stack.env}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    time.sleep(1.0)  # let the last log lines reach the files

    haystacks: dict[str, bytes] = {"genq status output": (cli.stdout + cli.stderr).encode()}
    for log in stack.tmp.glob("*.log"):
        haystacks[log.name] = log.read_bytes()
    for log in stack.tmp.glob("*.stderr"):
        haystacks[log.name] = log.read_bytes()
    client = redis.Redis.from_url(stack.env["GENQ_REDIS_URL"])
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"string":
            value = client.get(key) or b""
        elif kind == b"hash":
            value = repr(client.hgetall(key)).encode()
        elif kind == b"list":
            value = repr(client.lrange(key, 0, -1)).encode()
        elif kind == b"set":
            value = repr(client.smembers(key)).encode()
        elif kind == b"zset":
            value = repr(client.zrange(key, 0, -1, withscores=True)).encode()
        elif kind == b"stream":
            value = repr(client.xrange(key)).encode()
        else:
            value = b""
        haystacks[f"redis {key!r}"] = key + value
    assert len(haystacks) > 10
    leaks = [
        where
        for where, text in haystacks.items()
        if CANARY_KEY.encode() in text or CANARY_TOKEN.encode() in text
    ]
    assert leaks == []
    assert sum(b"genq.download" in text for text in haystacks.values()) >= 1  # the logs were really read


# ---------------------------------------------------------------- Redis with a password, and over TLS


def test_redis_with_a_password(simulator: object, tmp_path: Path) -> None:
    with EmbeddedRedis(data_dir=tmp_path / "r", password="s3cret-pass") as server:
        assert server.url.startswith("redis://:s3cret-pass@")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).set("x", 1)
        stack = Stack(server, simulator, tmp_path, _env(server.url, simulator, tmp_path))  # type: ignore[arg-type]
        try:
            stack.worker()
            record = stack.producer().submit_image("behind a password").wait(timeout=30)
            assert record.state is JobState.SUCCEEDED
        finally:
            stack.close()


def _env(url: str, sim: object, tmp_path: Path) -> dict[str, str]:
    from tests.helpers import FAST_POLL

    return {
        "GENQ_REDIS_URL": url,
        "GENQ_API_BASE_URL": sim.url,  # type: ignore[attr-defined]
        "GENQ_API_KEY": sim.api_key,  # type: ignore[attr-defined]
        "GENQ_DOWNLOAD_DIR": str(tmp_path / "downloads"),
        "GENQ_DOWNLOAD_ALLOW_HTTP": "true",
        "GENQ_DOWNLOAD_ALLOW_PRIVATE": "true",
        "GENQ_POLL_IMAGE": FAST_POLL,
    }
