"""A download cut off midway resumes with a Range request on the next attempt, from a real local
HTTP server; a server that ignores Range gets a clean restart. Never a partial file at the final path."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from genq.downloads import DownloadRules, fetch
from genq.errors import UpstreamUnavailable
from genq.netguard import NetPolicy

pytestmark = pytest.mark.integration
BODY = bytes(range(256)) * 4096  # 1 MiB


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    honour_range = True
    cut_first = True
    ranges: list[str | None] = []

    def do_GET(self) -> None:
        header = self.headers.get("Range")
        type(self).ranges.append(header)
        start = int(header[6:].split("-")[0]) if header and self.honour_range else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(len(BODY) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
        self.end_headers()
        if type(self).cut_first:
            type(self).cut_first = False
            self.wfile.write(BODY[start : start + len(BODY) // 3])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection drops a third of the way in
            return
        self.wfile.write(BODY[start:])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    Handler.ranges = []
    Handler.cut_first = True
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v.mp4?token=t"
    httpd.shutdown()


RULES = DownloadRules(
    max_bytes=10 * 1024 * 1024,
    timeout=30,
    chunk_bytes=64 * 1024,
    net=NetPolicy(allow_http=True, allow_private=True),
)


@pytest.mark.parametrize("honour_range", [True, False])
def test_interrupted_download_resumes_or_restarts(server: str, tmp_path: Path, honour_range: bool) -> None:
    Handler.honour_range = honour_range
    session = requests.Session()

    with pytest.raises(UpstreamUnavailable):
        fetch(session, server, tmp_path, "00", RULES, "video")
    part = tmp_path / ".00.part"
    assert 0 < part.stat().st_size < len(BODY)
    assert not (tmp_path / "00.mp4").exists()

    got = fetch(session, server, tmp_path, "00", RULES, "video")

    assert got.path == tmp_path / "00.mp4" and got.bytes == len(BODY)
    assert got.sha256 == hashlib.sha256(BODY).hexdigest()
    assert got.path.read_bytes() == BODY
    assert not part.exists()
    assert (
        Handler.ranges[0] is None and Handler.ranges[1] is not None and Handler.ranges[1].startswith("bytes=")
    )
