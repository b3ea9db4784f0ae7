"""``genq.downloads``: streamed, capped, typed, atomic, resumable downloads of untrusted output URLs."""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from responses import matchers

from genq import downloads
from genq.downloads import Busy, DownloadRules, check_url, fetch, redact_url
from genq.errors import DownloadRefused, GenqError, UpstreamUnavailable
from genq.netguard import NetPolicy

TOKEN = "TOKEN-SECRET-9"
PLAIN = "https://cdn.example.test/out/img-1.png"
URL = f"{PLAIN}?X-Amz-Signature={TOKEN}&X-Amz-Expires=60#frag-{TOKEN}"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40  # 10248 bytes
RULES = DownloadRules(max_bytes=1_000_000, timeout=30.0, chunk_bytes=4096)


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


@pytest.fixture
def mock() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "downloads" / "job-1"


def _files(root: Path) -> list[str]:
    """Every file under ``root`` (hidden ``.part`` files included), relative names."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _final(root: Path) -> list[str]:
    """The visible files under ``root``: what a reader of the download directory would take as done."""
    return [name for name in _files(root) if not Path(name).name.startswith(".")]


def _png(mock: responses.RequestsMock, body: bytes = PNG, **headers: str) -> None:
    mock.get(PLAIN, body=body, headers={"Content-Type": "image/png", **headers})


def _refused(call: Any) -> GenqError:
    with pytest.raises(GenqError) as info:
        call()
    assert TOKEN not in str(info.value)
    assert TOKEN not in repr(info.value)
    return info.value


# ------------------------------------------------------------------ success


def test_png_lands_at_stem_with_size_and_hash(
    session: requests.Session, mock: responses.RequestsMock, dest: Path
) -> None:
    _png(mock, **{"Content-Length": str(len(PNG))})

    got = fetch(session, URL, dest, "03", RULES, "image")

    assert got.path == dest / "03.png"
    assert got.bytes == len(PNG) == 10248
    assert got.sha256 == hashlib.sha256(PNG).hexdigest()
    assert got.content_type == "image/png"
    assert (dest / "03.png").read_bytes() == PNG
    assert _files(dest) == ["03.png"]  # no .part left behind
    # The request went to the full (signed) URL, streamed, with both timeouts, fresh (no Range).
    call = mock.calls[0]
    assert call.request.url.startswith(PLAIN + "?X-Amz-Signature=" + TOKEN)
    assert call.request.req_kwargs["stream"] is True
    assert call.request.req_kwargs["timeout"] == (RULES.connect_timeout, RULES.read_timeout)
    assert "Authorization" not in call.request.headers
    assert "Range" not in call.request.headers


def test_without_content_length_and_small_chunks(
    session: requests.Session, mock: responses.RequestsMock, dest: Path
) -> None:
    _png(mock)
    rules = DownloadRules(max_bytes=len(PNG), timeout=30.0, chunk_bytes=100)  # exactly at the cap
    got = fetch(session, URL, dest, "00", rules, "image")
    assert got.bytes == len(PNG)
    assert got.sha256 == hashlib.sha256(PNG).hexdigest()
    assert _files(dest) == ["00.png"]


@pytest.mark.parametrize(
    ("content_type", "media", "ext"),
    [
        ("image/jpeg", "image", ".jpg"),
        ("IMAGE/WEBP; charset=binary", "image", ".webp"),
        ("image/gif", "image", ".gif"),
        ("video/mp4", "video", ".mp4"),
        ("video/webm", "video", ".webm"),
    ],
)
def test_extension_follows_content_type(
    session: requests.Session,
    mock: responses.RequestsMock,
    dest: Path,
    content_type: str,
    media: str,
    ext: str,
) -> None:
    mock.get(PLAIN, body=b"data", headers={"Content-Type": content_type})
    got = fetch(session, URL, dest, "07", RULES, media)
    assert got.path == dest / f"07{ext}"
    assert got.content_type == content_type.split(";")[0].lower()
    assert _files(dest) == [f"07{ext}"]


def test_second_fetch_replaces_the_file(
    session: requests.Session, mock: responses.RequestsMock, dest: Path
) -> None:
    _png(mock, body=b"first")
    fetch(session, URL, dest, "00", RULES, "image")
    mock.replace(responses.GET, PLAIN, body=b"second!", headers={"Content-Type": "image/png"})
    got = fetch(session, URL, dest, "00", RULES, "image")
    assert got.bytes == 7
    assert (dest / "00.png").read_bytes() == b"second!"
    assert _files(dest) == ["00.png"]


def test_gzip_encoded_body_with_content_length(
    session: requests.Session, mock: responses.RequestsMock, dest: Path
) -> None:
    # Content-Length counts the encoded bytes; the file holds the decoded ones.
    packed = gzip.compress(PNG)
    _png(mock, body=packed, **{"Content-Encoding": "gzip", "Content-Length": str(len(packed))})
    got = fetch(session, URL, dest, "00", RULES, "image")
    assert got.bytes == len(PNG)
    assert got.sha256 == hashlib.sha256(PNG).hexdigest()
    assert (dest / "00.png").read_bytes() == PNG


# ------------------------------------------------------------------ resuming a partial file


def _partial(dest: Path, data: bytes, stem: str = "00") -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    part = dest / f".{stem}.part"
    part.write_bytes(data)
    return part


def test_resume_asks_for_the_rest_and_hashes_the_whole(
    session: requests.Session, mock: responses.RequestsMock, dest: Path
) -> None:
    _partial(dest, PNG[:1000])
    mock.get(
        PLAIN,
        status=206,
        body=PNG[1000:],
        headers={
            "Content-Type": "image/png",
            "Content-Range": f"bytes 1000-{len(PNG) - 1}/{len(PNG)}",
            "Content-Length": str(len(PNG) - 1000),
        },
        match=[matchers.header_matcher({"Range": "bytes=1000-", "Accept-Encoding": "identity"})],
    )
    got = fetch(session, URL, dest, "00", RULES, "image")
    assert got.bytes == len(PNG)
    assert got.sha256 == hashlib.sha256(PNG).hexdigest()
    assert (dest / "00.png").read_bytes() == PNG
    assert _files(dest) == ["00.png"]


def test_resume_ignored_by_the_server_starts_over(
    session: requests.Session, mock: responses.RequestsMock, dest: Path
) -> None:
    _partial(dest, b"stale bytes from another attempt")
    _png(mock)  # a plain 200 with the whole body
    got = fetch(session, URL, dest, "00", RULES, "image")
    assert mock.calls[0].request.headers["Range"] == "bytes=32-"
    assert (dest / "00.png").read_bytes() == PNG
    assert got.sha256 == hashlib.sha256(PNG).hexdigest()
    assert _files(dest) == ["00.png"]


def test_resume_counts_the_cap_over_the_whole_file(
    session: requests.Session, mock: responses.RequestsMock, dest: Path
) -> None:
    _partial(dest, PNG[:4000])
    mock.get(
        PLAIN,
        status=206,
        body=PNG[4000:],
        headers={
            "Content-Type": "image/png",
            "Content-Range": f"bytes 4000-{len(PNG) - 1}/{len(PNG)}",
            "Content-Length": str(len(PNG) - 4000),
        },
    )
    rules = DownloadRules(max_bytes=8000, timeout=30.0)
    exc = _refused(lambda: fetch(session, URL, dest, "00", rules, "image"))
    assert isinstance(exc, DownloadRefused)
    assert f"{len(PNG)} bytes exceeds the 8000-byte cap" in str(exc)
    assert _files(dest) == []  # a refusal deletes the partial file


def test_unsolicited_partial_content_is_transient(
    session: requests.Session, mock: responses.RequestsMock, dest: Path
) -> None:
    mock.get(PLAIN, status=206, body=PNG[:10], headers={"Content-Type": "image/png"})
    exc = _refused(lambda: fetch(session, URL, dest, "00", RULES, "image"))
    assert type(exc) is UpstreamUnavailable
    assert "partial content" in str(exc)
    assert _final(dest) == []


@pytest.mark.parametrize("content_range", [f"bytes 0-{len(PNG) - 1}/{len(PNG)}", "bytes */10248", ""])
def test_partial_content_from_the_wrong_offset_is_never_appended(
    session: requests.Session, mock: responses.RequestsMock, dest: Path, content_range: str
) -> None:
    _partial(dest, PNG[:100])
    mock.get(
        PLAIN, status=206, body=PNG, headers={"Content-Type": "image/png", "Content-Range": content_range}
    )
    exc = _refused(lambda: fetch(session, URL, dest, "00", RULES, "image"))
    assert type(exc) is UpstreamUnavailable
    assert "unexpected partial content" in str(exc)
    assert _final(dest) == []  # no file stitched from two different offsets


def test_mismatched_partial_content_really_starts_over(
    session: requests.Session, mock: responses.RequestsMock, dest: Path
) -> None:
    part = _partial(dest, PNG[:100])
    mock.get(
        PLAIN,
        status=206,
        body=PNG,
        headers={"Content-Type": "image/png", "Content-Range": f"bytes 0-{len(PNG) - 1}/{len(PNG)}"},
    )
    with pytest.raises(UpstreamUnavailable, match="starting over"):
        fetch(session, URL, dest, "00", RULES, "image")
    # Starting over means the next attempt asks for the whole file: nothing kept to resume from.
    assert not part.exists() or part.stat().st_size == 0


def test_busy_when_another_delivery_holds_the_file(
    session: requests.Session, mock: responses.RequestsMock, dest: Path
) -> None:
    part = _partial(dest, b"")
    _png(mock)
    with open(part, "a+b") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(Busy) as info:
            fetch(session, URL, dest, "00", RULES, "image")
    assert TOKEN not in str(info.value)
    assert len(mock.calls) == 0
    assert _final(dest) == []


# ------------------------------------------------------------------ content refused


@pytest.mark.parametrize(
    ("content_type", "media"),
    [
        ("text/html", "image"),
        ("text/html; charset=utf-8", "image"),
        ("application/octet-stream", "image"),
        ("image/svg+xml", "image"),
        ("", "image"),
        ("video/mp4", "image"),
        ("image/png", "video"),
    ],
)
def test_wrong_content_type_is_refused_and_leaves_nothing(
    session: requests.Session, mock: responses.RequestsMock, dest: Path, content_type: str, media: str
) -> None:
    mock.get(PLAIN, body=b"<html>login</html>", headers={"Content-Type": content_type})
    exc = _refused(lambda: fetch(session, URL, dest, "00", RULES, media))
    assert isinstance(exc, DownloadRefused)
    assert "content type" in str(exc)
    assert _files(dest) == []  # no final file, no .part
    assert _files(dest.parent) == []


def test_declared_size_over_the_cap_is_refused(
    session: requests.Session, mock: responses.RequestsMock, dest: Path
) -> None:
    _png(mock, **{"Content-Length": str(len(PNG))})
    rules = DownloadRules(max_bytes=1000, timeout=30.0)
    exc = _refused(lambda: fetch(session, URL, dest, "00", rules, "image"))
    assert isinstance(exc, DownloadRefused)
    assert "10248 bytes exceeds the 1000-byte cap" in str(exc)
    assert _files(dest) == []


@pytest.mark.parametrize("chunk_bytes", [4096, 256 * 1024])
def test_streamed_size_over_the_cap_is_refused(
    session: requests.Session, mock: responses.RequestsMock, dest: Path, chunk_bytes: int
) -> None:
    _png(mock)  # no Content-Length: only counting the bytes can catch it
    rules = DownloadRules(max_bytes=5000, timeout=30.0, chunk_bytes=chunk_bytes)
    exc = _refused(lambda: fetch(session, URL, dest, "00", rules, "image"))
    assert isinstance(exc, DownloadRefused)
    assert "more than the 5000-byte cap" in str(exc)
    assert _files(dest) == []  # the partly written .part is gone too


def test_understated_content_length_is_caught_by_counting(
    session: requests.Session, mock: responses.RequestsMock, dest: Path
) -> None:
    # A lying Content-Length under the cap does not let a bigger body through.
    _png(mock, **{"Content-Length": "10"})
    rules = DownloadRules(max_bytes=5000, timeout=30.0, chunk_bytes=4096)
    exc = _refused(lambda: fetch(session, URL, dest, "00", rules, "image"))
    assert isinstance(exc, DownloadRefused)
    assert "more than the 5000-byte cap" in str(exc)
    assert _files(dest) == []


def test_short_body_is_transient_and_keeps_the_part(
    session: requests.Session, mock: responses.RequestsMock, dest: Path
) -> None:
    _png(mock, body=PNG[:100], **{"Content-Length": str(len(PNG))})
    exc = _refused(lambda: fetch(session, URL, dest, "00", RULES, "image"))
    assert isinstance(exc, UpstreamUnavailable)
    # urllib3 notices the missing bytes itself (IncompleteRead); fetch's own count is the backstop.
    assert "interrupted after" in str(exc) or f"got 100 of {len(PNG)}" in str(exc)
    assert _final(dest) == []  # nothing that looks complete
    assert _files(dest) == [".00.part"]  # kept for a resumed attempt


def test_wall_clock_limit(session: requests.Session, mock: responses.RequestsMock, dest: Path) -> None:
    _png(mock)
    rules = DownloadRules(max_bytes=1_000_000, timeout=1e-9, chunk_bytes=4096)
    exc = _refused(lambda: fetch(session, URL, dest, "00", rules, "image"))
    assert isinstance(exc, DownloadRefused)
    assert "limit" in str(exc)
    assert _files(dest) == []


# ------------------------------------------------------------------ HTTP answers


def test_redirect_is_not_followed(
    session: requests.Session, mock: responses.RequestsMock, dest: Path
) -> None:
    mock.get(PLAIN, status=302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
    mock.get("http://169.254.169.254/latest/meta-data/", body=b"secret", content_type="image/png")
    exc = _refused(lambda: fetch(session, URL, dest, "00", RULES, "image"))
    assert isinstance(exc, DownloadRefused)
    assert "redirect 302 beyond the limit of 0" in str(exc)
    assert len(mock.calls) == 1
    assert _files(dest) == []


@pytest.mark.parametrize("status", [301, 303, 307, 308])
def test_other_redirects_refused(
    session: requests.Session, mock: responses.RequestsMock, dest: Path, status: int
) -> None:
    mock.get(PLAIN, status=status, headers={"Location": "https://elsewhere.test/x.png"})
    assert isinstance(_refused(lambda: fetch(session, URL, dest, "00", RULES, "image")), DownloadRefused)
    assert len(mock.calls) == 1
    assert _files(dest) == []


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
def test_server_errors_are_transient(
    session: requests.Session, mock: responses.RequestsMock, dest: Path, status: int
) -> None:
    mock.get(PLAIN, status=status, body=b"try later")
    exc = _refused(lambda: fetch(session, URL, dest, "00", RULES, "image"))
    assert type(exc) is UpstreamUnavailable
    assert str(status) in str(exc)
    assert _final(dest) == []


@pytest.mark.parametrize("status", [404, 403, 410, 400, 204])
def test_other_statuses_are_refused(
    session: requests.Session, mock: responses.RequestsMock, dest: Path, status: int
) -> None:
    mock.get(PLAIN, status=status, body=b"", headers={"Content-Type": "image/png"})
    exc = _refused(lambda: fetch(session, URL, dest, "00", RULES, "image"))
    assert type(exc) is DownloadRefused
    assert f": {status}" in str(exc)
    assert _files(dest) == []


@pytest.mark.parametrize(
    "error",
    [
        requests.ConnectionError("Connection refused"),
        requests.ReadTimeout("slow"),
        requests.ConnectTimeout("x"),
    ],
)
def test_transport_errors_are_transient(
    session: requests.Session, mock: responses.RequestsMock, dest: Path, error: Exception
) -> None:
    mock.get(PLAIN, body=error)
    exc = _refused(lambda: fetch(session, URL, dest, "00", RULES, "image"))
    assert type(exc) is UpstreamUnavailable
    assert type(error).__name__ in str(exc)
    assert _final(dest) == []


# ------------------------------------------------------------------ URL rules


@pytest.mark.parametrize(
    "url",
    [
        f"ftp://cdn.example.test/a.png?token={TOKEN}",
        f"file:///etc/passwd?token={TOKEN}",
        f"gopher://cdn.example.test/a?token={TOKEN}",
        "data:image/png;base64,iVBORw0KGgo=",
        f"//cdn.example.test/a.png?token={TOKEN}",
        f"cdn.example.test/a.png?token={TOKEN}",
    ],
)
def test_schemes_refused_without_a_request(
    session: requests.Session, mock: responses.RequestsMock, dest: Path, url: str
) -> None:
    for allow_http in (False, True):
        rules = DownloadRules(max_bytes=1000, timeout=5.0, net=NetPolicy(allow_http=allow_http))
        exc = _refused(lambda rules=rules: fetch(session, url, dest, "00", rules, "image"))
        assert isinstance(exc, DownloadRefused)
        assert "not allowed" in str(exc)
    assert len(mock.calls) == 0
    assert _files(dest) == []


def test_http_refused_unless_allowed(
    session: requests.Session, mock: responses.RequestsMock, dest: Path
) -> None:
    plain_http = "http://127.0.0.1:8900/files/a.png"
    mock.get(plain_http, body=PNG, headers={"Content-Type": "image/png"})
    strict = DownloadRules(max_bytes=1_000_000, timeout=5.0)
    exc = _refused(lambda: fetch(session, f"{plain_http}?token={TOKEN}", dest, "00", strict, "image"))
    assert isinstance(exc, DownloadRefused)
    assert "'http'" in str(exc)
    assert len(mock.calls) == 0

    lenient = DownloadRules(
        max_bytes=1_000_000, timeout=5.0, net=NetPolicy(allow_http=True, allow_private=True)
    )
    got = fetch(session, f"{plain_http}?token={TOKEN}", dest, "00", lenient, "image")
    assert got.path == dest / "00.png"
    assert got.sha256 == hashlib.sha256(PNG).hexdigest()


def test_check_url_is_case_insensitive_on_scheme() -> None:
    check_url("HTTPS://cdn.example.test/a.png", RULES)  # no exception
    with pytest.raises(DownloadRefused):
        check_url("HTTP://cdn.example.test/a.png", RULES)


@pytest.mark.parametrize(
    "url",
    [
        f"https://cdn.example.test:abc/a.png?t={TOKEN}",
        f"https://cdn.example.test:99999/a?t={TOKEN}",
        f"https://[::1/a.png?t={TOKEN}",
    ],
)
def test_malformed_url_is_refused_not_a_crash(
    session: requests.Session, mock: responses.RequestsMock, dest: Path, url: str
) -> None:
    exc = _refused(lambda: fetch(session, url, dest, "00", RULES, "image"))
    assert type(exc) is DownloadRefused
    assert "malformed URL" in str(exc)
    assert len(mock.calls) == 0
    assert _files(dest) == []


# ------------------------------------------------------------------ redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (URL, PLAIN),
        ("https://cdn.example.test/a.png", "https://cdn.example.test/a.png"),
        ("https://cdn.example.test:8443/a/b.mp4?sig=1", "https://cdn.example.test:8443/a/b.mp4"),
        ("https://user:pa55@cdn.example.test/a.png?x=1", "https://cdn.example.test/a.png"),
        ("https://cdn.example.test/A.png#only-fragment", "https://cdn.example.test/A.png"),
        ("http://127.0.0.1:8900/files/1?token=abc", "http://127.0.0.1:8900/files/1"),
        ("https://[::1]:8443/a?t=1", "https://[::1]:8443/a"),
        ("https://[::1/a?t=1", "(unparseable URL)"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_no_message_carries_the_token(
    session: requests.Session, mock: responses.RequestsMock, dest: Path
) -> None:
    cases: list[dict[str, Any]] = [
        {"status": 302, "headers": {"Location": f"https://x.test/?t={TOKEN}"}},
        {"status": 404},
        {"status": 503},
        {"body": b"<html/>", "headers": {"Content-Type": "text/html"}},
        {"body": PNG, "headers": {"Content-Type": "image/png", "Content-Length": str(len(PNG))}},
        {"body": PNG, "headers": {"Content-Type": "image/png"}},
        {"body": requests.ConnectionError(f"failed for {URL}")},
    ]
    rules = DownloadRules(max_bytes=100, timeout=30.0)
    messages = []
    for kwargs in cases:
        mock.upsert(responses.GET, PLAIN, **kwargs)
        exc = _refused(lambda: fetch(session, URL, dest, "00", rules, "image"))
        messages.append(str(exc))
        assert PLAIN in str(exc)  # the redacted URL is there, for the operator
    assert len(messages) == len(cases)
    assert all(TOKEN not in m and "X-Amz-Signature" not in m for m in messages)
    assert _final(dest) == []


# ------------------------------------------------------------------ writeback while streaming


def test_a_download_larger_than_the_writeback_window_lands_whole(
    session: requests.Session, mock: responses.RequestsMock, dest: Path
) -> None:
    body = PNG * 50  # 512,400 bytes: many windows of 64 KiB, and a tail shorter than one
    _png(mock, body=body)
    rules = DownloadRules(max_bytes=1_000_000, timeout=30.0, chunk_bytes=4096, writeback_bytes=64 * 1024)
    got = fetch(session, URL, dest, "00", rules, "image")
    assert got.path.read_bytes() == body
    assert got.sha256 == hashlib.sha256(body).hexdigest()


@pytest.mark.skipif(downloads._sync_file_range is None, reason="no sync_file_range on this platform")
def test_writeback_hands_each_window_to_the_disk_and_waits_for_the_one_before(tmp_path: Path) -> None:
    with open(tmp_path / "f", "a+b") as out:
        writeback = downloads._Writeback(out, 0, 1000)
        size = 0
        for _ in range(8):
            size += out.write(b"x" * 300)
            writeback.written(size)
        # Started for bytes 0-1200 once a window was written, then 1200-2400, waiting for 0-1200.
        assert (writeback.started, writeback.waited, writeback.window) == (2400, 1200, 1000)


def test_writeback_that_the_file_refuses_turns_itself_off(tmp_path: Path) -> None:
    # A pipe has no range to sync (ESPIPE): the download goes on, and the fsync decides durability.
    read_end, write_end = os.pipe()
    with open(read_end, "rb") as reader, open(write_end, "wb", buffering=0) as out:
        writeback = downloads._Writeback(out, 0, 10)  # type: ignore[arg-type]
        out.write(b"y" * 20)
        writeback.written(20)
        assert writeback.window == 0
        assert reader.read(20) == b"y" * 20
