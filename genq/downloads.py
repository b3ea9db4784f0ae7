"""Safe streaming downloads of job outputs.

The URL comes from the upstream's job payload, so it is untrusted: the scheme is checked, redirects
are not followed, the size is capped on the decoded bytes, the whole transfer has a wall-clock limit,
and the file appears at its final path only complete (written to a temp file, fsynced, renamed).
The file name is ours (``<index>.<ext>``), never the remote id. The API key is never sent here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests

from genq.errors import DownloadRefused, UpstreamUnavailable

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
    allow_http: bool = False
    connect_timeout: float = 5.0
    read_timeout: float = 30.0  # seconds without a byte before giving up


@dataclass(frozen=True)
class Downloaded:
    path: Path
    bytes: int
    sha256: str
    content_type: str


def redact_url(url: str) -> str:
    """The URL without query or fragment (presigned URLs carry tokens there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def check_url(url: str, rules: DownloadRules) -> None:
    """Refuse schemes other than https (and http when allowed)."""
    scheme = urlsplit(url).scheme.lower()
    allowed = {"https", "http"} if rules.allow_http else {"https"}
    if scheme not in allowed:
        raise DownloadRefused(f"scheme {scheme or '(none)'!r} not allowed for {redact_url(url)}")


def fetch(
    session: requests.Session, url: str, dest_dir: Path, stem: str, rules: DownloadRules, media: str
) -> Downloaded:
    """Stream ``url`` to ``dest_dir/<stem><ext>``; ``media`` is the expected type family (``image``)."""
    check_url(url, rules)
    shown = redact_url(url)
    started = time.monotonic()
    try:
        response = session.get(
            url, stream=True, allow_redirects=False, timeout=(rules.connect_timeout, rules.read_timeout)
        )
    except requests.RequestException as exc:
        raise UpstreamUnavailable(f"download {shown}: {type(exc).__name__}") from None
    with response:
        _check_response(response, shown, media)
        content_type = _content_type(response)
        dest_dir.mkdir(parents=True, exist_ok=True)
        final = dest_dir / f"{stem}{EXTENSIONS[content_type]}"
        tmp = dest_dir / f".{stem}.{uuid.uuid4().hex}.part"
        try:
            size, digest = _stream(response, tmp, rules, started, shown)
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return Downloaded(final, size, digest, content_type)


def _check_response(response: requests.Response, shown: str, media: str) -> None:
    status = response.status_code
    if 300 <= status < 400:
        raise DownloadRefused(f"download {shown}: redirect {status} not followed")
    if status == 429 or status >= 500:
        raise UpstreamUnavailable(f"download {shown}: {status}")
    if status != 200:
        raise DownloadRefused(f"download {shown}: {status}")
    content_type = _content_type(response)
    if content_type not in EXTENSIONS or not content_type.startswith(media + "/"):
        raise DownloadRefused(f"download {shown}: content type {content_type!r} is not an accepted {media}")


def _content_type(response: requests.Response) -> str:
    return response.headers.get("Content-Type", "").split(";")[0].strip().lower()


def _stream(
    response: requests.Response, tmp: Path, rules: DownloadRules, started: float, shown: str
) -> tuple[int, str]:
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > rules.max_bytes:
        raise DownloadRefused(f"download {shown}: {declared} bytes exceeds the {rules.max_bytes} cap")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as out:
            # iter_content decodes Content-Encoding, so the cap counts the bytes that reach the disk.
            for chunk in response.iter_content(chunk_size=rules.chunk_bytes):
                size += len(chunk)
                if size > rules.max_bytes:
                    raise DownloadRefused(f"download {shown}: more than the {rules.max_bytes}-byte cap")
                if time.monotonic() - started > rules.timeout:
                    raise DownloadRefused(f"download {shown}: exceeded the {rules.timeout:.0f}s limit")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except requests.RequestException as exc:
        raise UpstreamUnavailable(f"download {shown}: interrupted ({type(exc).__name__})") from None
    if declared and declared.isdigit() and size != int(declared):
        raise UpstreamUnavailable(f"download {shown}: got {size} of {declared} bytes")
    return size, digest.hexdigest()
