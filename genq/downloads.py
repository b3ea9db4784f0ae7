"""Safe streaming downloads of job outputs.

The URL comes from the upstream's job payload, so it is untrusted: scheme, host and the address
actually connected to are checked by :mod:`genq.netguard` (on every redirect hop too), the size is
capped on the decoded bytes, the whole transfer has a wall-clock limit, and the file appears at its
final path only complete (written to a temp file, fsynced, renamed). The file name is ours
(``<index>.<ext>``), never the remote id. The API key is never sent here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import requests

from genq import netguard, wallclock
from genq.errors import DownloadRefused, UpstreamUnavailable
from genq.netguard import NetPolicy, redact_url

__all__ = ["Busy", "DownloadRules", "Downloaded", "check_url", "fetch", "redact_url"]

EXTENSIONS: dict[str, str] = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "video/mp4": ".mp4",
    "video/webm": ".webm",
    "video/quicktime": ".mov",
}


@dataclass(frozen=True)
class DownloadRules:
    """Limits for one file."""

    max_bytes: int
    timeout: float  # wall-clock seconds for the whole file
    chunk_bytes: int = 256 * 1024
    writeback_bytes: int = 4 * 1024 * 1024  # handed to the disk at a time while streaming (0: at the end)
    net: NetPolicy = field(default_factory=NetPolicy)  # scheme, hosts, addresses, redirects allowed
    connect_timeout: float = 5.0
    read_timeout: float = 30.0  # seconds without a byte before giving up


@dataclass(frozen=True)
class Downloaded:
    path: Path
    bytes: int
    sha256: str
    content_type: str


def check_url(url: str, rules: DownloadRules) -> None:
    """Refuse what may not be fetched, from the URL text alone (see :func:`genq.netguard.check_url`)."""
    netguard.check_url(url, rules.net)


class Busy(Exception):
    """Another delivery of the same download holds the file; this one should do nothing."""


def fetch(
    session: requests.Session,
    url: str,
    dest_dir: Path,
    stem: str,
    rules: DownloadRules,
    media: str,
    on_locked: Callable[[], None] | None = None,
) -> Downloaded:
    """Stream ``url`` to ``dest_dir/<stem><ext>``; ``media`` is the expected type family (``image``).

    Bytes go to ``.<stem>.part`` first. A transient failure leaves that file in place, and the next
    attempt asks only for the rest with a Range request (starting over if the server ignores it).
    A refusal deletes it. Only a complete, fsynced file is renamed to its final name.
    """
    check_url(url, rules)
    shown = redact_url(url)
    dest_dir.mkdir(parents=True, exist_ok=True)
    part = dest_dir / f".{stem}.part"
    with open(part, "a+b") as out:
        try:
            fcntl.flock(out.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(shown) from None
        if on_locked is not None:
            on_locked()  # this delivery is the one trying (it may refuse: too many tries)
        try:
            size, digest, content_type = _fetch_into(session, url, out, rules, media, shown)
        except DownloadRefused:
            part.unlink(missing_ok=True)
            raise
        final = dest_dir / f"{stem}{EXTENSIONS[content_type]}"
        os.replace(part, final)
    return Downloaded(final, size, digest, content_type)


def _fetch_into(
    session: requests.Session, url: str, out: BinaryIO, rules: DownloadRules, media: str, shown: str
) -> tuple[int, str, str]:
    started = time.monotonic()
    have = out.seek(0, os.SEEK_END)
    # Ranges over compressed encodings are ill-defined, so a resumed request asks for identity.
    headers = {"Range": f"bytes={have}-", "Accept-Encoding": "identity"} if have else {}
    # A server dripping a byte at a time never trips the per-read timeout, and a read waits for a
    # whole chunk: only cutting the connection from outside bounds the wall-clock time. The process's
    # one watchdog thread does it (a timer thread per file would cost more than the file's bookkeeping).
    with wallclock.Limit(rules.timeout) as limit:
        try:
            response = netguard.safe_get(
                session,
                url,
                rules.net,
                stream=True,
                headers=headers,
                timeout=(rules.connect_timeout, rules.read_timeout),
            )
        except requests.RequestException as exc:
            if limit.expired:
                raise DownloadRefused(f"download {shown}: exceeded the {rules.timeout:.0f}s limit") from None
            raise UpstreamUnavailable(f"download {shown}: {type(exc).__name__}") from None
        return _read(response, out, have, rules, media, shown, started)


def _read(
    response: requests.Response,
    out: BinaryIO,
    have: int,
    rules: DownloadRules,
    media: str,
    shown: str,
    started: float,
) -> tuple[int, str, str]:
    with response:
        resumed = bool(have) and response.status_code == 206 and _range_start(response) == have
        if not resumed:
            out.seek(0)
            out.truncate()
            have = 0
            if response.status_code == 206:
                # A range we did not ask for: drop what we had, so the next try starts from zero.
                raise UpstreamUnavailable(f"download {shown}: unexpected partial content; starting over")
        _check_response(response, shown, media, partial_ok=resumed)
        digest = hashlib.sha256()
        if have:
            out.seek(0)
            for block in iter(lambda: out.read(1024 * 1024), b""):
                digest.update(block)
        size = _stream(response, out, have, digest, rules, started, shown)
    return size, digest.hexdigest(), _content_type(response)


def _check_response(response: requests.Response, shown: str, media: str, partial_ok: bool = False) -> None:
    status = response.status_code
    if 300 <= status < 400:
        raise DownloadRefused(f"download {shown}: redirect {status} not followed")
    if status == 429 or status >= 500:
        raise UpstreamUnavailable(f"download {shown}: {status}")
    if status != 200 and not (partial_ok and status == 206):
        raise DownloadRefused(f"download {shown}: {status}")
    content_type = _content_type(response)
    if content_type not in EXTENSIONS or not content_type.startswith(media + "/"):
        raise DownloadRefused(f"download {shown}: content type {content_type!r} is not an accepted {media}")


def _content_type(response: requests.Response) -> str:
    return response.headers.get("Content-Type", "").split(";")[0].strip().lower()


def _range_start(response: requests.Response) -> int | None:
    """The first byte of a 206 answer, from ``Content-Range: bytes START-END/TOTAL``."""
    value = response.headers.get("Content-Range", "")
    if not value.startswith("bytes ") or "-" not in value:
        return None
    start = value[6:].split("-", 1)[0].strip()
    return int(start) if start.isdigit() else None


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux; Python has no binding), or None where there is none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        call = libc.sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    return call


_sync_file_range = _load_sync_file_range()
_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4


class _Writeback:
    """Hands written bytes to the disk while the download streams, window by window.

    Left to the kernel, a file's pages stay dirty until the final fsync (background writeback starts
    only past ``dirty_background_ratio``, gigabytes on a large host), so the disk idles while the
    network works and then the thread waits for the whole file. Starting each window's writeback as
    soon as it is written, and waiting for the one before it, keeps the disk busy during the transfer,
    at most two windows dirty per download, and the fsync short. The fsync still decides durability;
    this only moves the work earlier. Where ``sync_file_range`` is missing, nothing happens here.
    """

    def __init__(self, out: BinaryIO, start: int, window: int) -> None:
        self.fd = out.fileno()
        self.out = out
        self.window = window if _sync_file_range is not None and window > 0 else 0
        self.started = start  # bytes before this offset have had their writeback started
        self.waited = start  # and before this one it has finished

    def written(self, size: int) -> None:
        if not self.window or size - self.started < self.window:
            return
        self.out.flush()  # no-op for chunks larger than the buffer, which is what a download writes
        self._call(self.started, size - self.started, _SFR_WRITE)
        if self.window and self.started > self.waited:
            flags = _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER
            self._call(self.waited, self.started - self.waited, flags)
            self.waited = self.started
        self.started = size

    def _call(self, offset: int, length: int, flags: int) -> None:
        assert _sync_file_range is not None
        if _sync_file_range(self.fd, offset, length, flags) != 0:
            # Unsupported here, or an I/O error: the fsync at the end reports a real one.
            self.window = 0


def _stream(
    response: requests.Response,
    out: BinaryIO,
    have: int,
    digest: Any,
    rules: DownloadRules,
    started: float,
    shown: str,
) -> int:
    declared = response.headers.get("Content-Length")
    expected = have + int(declared) if declared and declared.isdigit() else None
    if expected is not None and expected > rules.max_bytes:
        raise DownloadRefused(f"download {shown}: {expected} bytes exceeds the {rules.max_bytes}-byte cap")
    size = have
    writeback = _Writeback(out, have, rules.writeback_bytes)
    limit = f"download {shown}: exceeded the {rules.timeout:.0f}s limit"
    try:
        # iter_content decodes Content-Encoding, so the cap counts the bytes that reach the disk.
        for chunk in response.iter_content(chunk_size=rules.chunk_bytes):
            size += len(chunk)
            if size > rules.max_bytes:
                raise DownloadRefused(f"download {shown}: more than the {rules.max_bytes}-byte cap")
            if time.monotonic() - started > rules.timeout:
                raise DownloadRefused(limit)
            digest.update(chunk)
            out.write(chunk)
            writeback.written(size)
    except (requests.RequestException, OSError, ValueError) as exc:
        out.flush()
        if time.monotonic() - started >= rules.timeout:
            raise DownloadRefused(limit) from None
        raise UpstreamUnavailable(
            f"download {shown}: interrupted after {size} bytes ({type(exc).__name__})"
        ) from None
    out.flush()
    os.fsync(out.fileno())
    if expected is not None and size != expected and "Content-Encoding" not in response.headers:
        raise UpstreamUnavailable(f"download {shown}: got {size} of {expected} bytes")
    return size
