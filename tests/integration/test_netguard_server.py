"""The SSRF guard against a real HTTP server on 127.0.0.1: the connection-level check refuses what the
URL check never saw, and redirects are re-checked hop by hop."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from genq.errors import DownloadRefused
from genq.netguard import NetPolicy, guarded_session, safe_get

pytestmark = pytest.mark.integration

LOOPBACK_ONLY = ("127.0.0.0/8",)


class Handler(BaseHTTPRequestHandler):
    """``/ok`` answers 200; ``/meta`` redirects to the cloud metadata address; ``/hop/N`` redirects
    (relatively) to ``/hop/N-1`` until ``/hop/0``, which answers 200."""

    hits: list[tuple[str, str]] = []

    def do_GET(self) -> None:
        Handler.hits.append((self.path, self.headers.get("Host", "")))
        if self.path == "/meta":
            self._redirect("http://169.254.169.254/latest/meta-data/")
        elif self.path.startswith("/hop/") and self.path != "/hop/0":
            self._redirect(f"{int(self.path.rsplit('/', 1)[1]) - 1}")
        elif self.path in ("/ok", "/hop/0"):
            body = b"hello"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def clear_hits() -> None:
    Handler.hits = []


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_refused_at_connect_time_without_check_url(port: int, host: str) -> None:
    # guarded_session(...).get skips check_url entirely: only the socket-level check stands here.
    policy = NetPolicy(allow_http=True)
    with pytest.raises(DownloadRefused, match=r"refused connection to .*loopback"):
        guarded_session(policy).get(f"http://{host}:{port}/ok?token=s3cr3t", timeout=5)
    assert Handler.hits == []


def test_allowed_when_private_is_allowed(port: int) -> None:
    policy = NetPolicy(allow_http=True, allow_private=True)
    session = guarded_session(policy)
    response = safe_get(session, f"http://localhost:{port}/ok", policy, timeout=5)
    assert response.status_code == 200 and response.text == "hello"
    # the socket went to the vetted IP, but the request still names the host it was for
    assert Handler.hits == [("/ok", f"localhost:{port}")]


def test_streaming_through_safe_get(port: int) -> None:
    policy = NetPolicy(allow_http=True, allowed_networks=LOOPBACK_ONLY)
    with safe_get(guarded_session(policy), f"http://127.0.0.1:{port}/ok", policy, stream=True) as response:
        assert b"".join(response.iter_content(chunk_size=2)) == b"hello"


def test_redirect_to_metadata_refused(port: int) -> None:
    # the first hop is allowed only through allowed_networks, so the second is judged on its own
    policy = NetPolicy(allow_http=True, allowed_networks=LOOPBACK_ONLY, max_redirects=3)
    with pytest.raises(DownloadRefused, match=r"169\.254\.169\.254.*link-local"):
        safe_get(guarded_session(policy), f"http://127.0.0.1:{port}/meta", policy, timeout=5)
    assert [path for path, _ in Handler.hits] == ["/meta"]


def test_redirect_chain_within_limit_followed(port: int) -> None:
    policy = NetPolicy(allow_http=True, allowed_networks=LOOPBACK_ONLY, max_redirects=3)
    response = safe_get(guarded_session(policy), f"http://127.0.0.1:{port}/hop/3", policy, timeout=5)
    assert response.text == "hello"
    assert [path for path, _ in Handler.hits] == ["/hop/3", "/hop/2", "/hop/1", "/hop/0"]


def test_redirect_chain_longer_than_limit_refused(port: int) -> None:
    policy = NetPolicy(allow_http=True, allowed_networks=LOOPBACK_ONLY, max_redirects=3)
    with pytest.raises(DownloadRefused, match="beyond the limit of 3"):
        safe_get(guarded_session(policy), f"http://127.0.0.1:{port}/hop/5", policy, timeout=5)
    assert len(Handler.hits) == 4


def test_plain_get_on_guarded_session_obeys_the_redirect_cap(port: int) -> None:
    # even a caller who forgets safe_get gets redirects capped and every hop address-checked
    policy = NetPolicy(allow_http=True, allowed_networks=LOOPBACK_ONLY)
    with pytest.raises(requests.TooManyRedirects):
        guarded_session(policy).get(f"http://127.0.0.1:{port}/hop/1", timeout=5)
    policy = NetPolicy(allow_http=True, allowed_networks=LOOPBACK_ONLY, max_redirects=3)
    with pytest.raises(DownloadRefused, match="link-local"):
        guarded_session(policy).get(f"http://127.0.0.1:{port}/meta", timeout=5)


@pytest.fixture(scope="module")
def tls_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path, list[str | None]]]:
    """The same handler over TLS with a self-signed certificate for ``localhost`` (no IP in it)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    server_names: list[str | None] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: server_names.append(name)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], cert, server_names
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_tls_keeps_sni_and_verification_on_the_hostname(tls_port: tuple[int, Path, list[str | None]]) -> None:
    port, cert, server_names = tls_port
    policy = NetPolicy(allow_private=True)
    response = safe_get(guarded_session(policy), f"https://localhost:{port}/ok", policy, verify=str(cert))
    assert response.text == "hello"
    assert server_names[-1] == "localhost"  # SNI names the host although the socket went to the IP
    assert Handler.hits == [("/ok", f"localhost:{port}")]
    # the certificate is really checked against the URL's host: by IP it does not match
    with pytest.raises(requests.exceptions.SSLError):
        safe_get(guarded_session(policy), f"https://127.0.0.1:{port}/ok", policy, verify=str(cert))
    # and without allow_private the connection is refused before any handshake
    with pytest.raises(DownloadRefused, match="loopback"):
        guarded_session(NetPolicy()).get(f"https://localhost:{port}/ok", verify=str(cert), timeout=5)
