"""Deterministic output bytes: the same (job id, index, size) always yields the same file.

Tests compare downloads against `/_sim/jobs/{id}` by sha256, so generation must be pure. Everything is
cached or sliced from cached blocks so that serving a file costs no more than copying bytes.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import random
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from functools import lru_cache

from aiohttp import web

from genq.simulator.common import error_response, state_of
from genq.simulator.state import Job, SimState

CHUNK_SIZE = 64 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TILE = 8
_FILE_NAME = re.compile(r"^(\d{1,4})\.(png|mp4)$")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


@lru_cache(maxsize=2048)
def png_bytes(job_id: str, index: int, size: int) -> bytes:
    """A valid RGB PNG: a two-colour checkerboard whose colours come from sha256(job id, index)."""
    digest = hashlib.sha256(f"{job_id}:{index}".encode()).digest()
    colour_a, colour_b = digest[0:3], digest[3:6]
    # Rows are built from whole-byte repetitions, which keeps even a 2048 px image cheap.
    tiles = size // _TILE + 1
    row_a = ((colour_a * _TILE + colour_b * _TILE) * tiles)[: size * 3]
    row_b = ((colour_b * _TILE + colour_a * _TILE) * tiles)[: size * 3]
    raw = b"".join(b"\x00" + (row_a if (y // _TILE) % 2 == 0 else row_b) for y in range(size))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    comment = f"Comment\x00genqueue simulator {job_id} {index}".encode("latin-1")
    return b"".join(
        [
            PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"tEXt", comment),
            _png_chunk(b"IDAT", zlib.compress(raw, 6)),
            _png_chunk(b"IEND", b""),
        ]
    )


def video_header(total: int) -> bytes:
    """An ISO-BMFF `ftyp` box followed by an `mdat` box header covering the rest of the file."""
    ftyp = struct.pack(">I", 28) + b"ftyp" + b"isom" + struct.pack(">I", 512) + b"isomiso2mp41"
    mdat_size = total - len(ftyp)
    # Size 0 means "extends to end of file", the legal encoding when 32 bits are not enough.
    size_field = mdat_size if 8 <= mdat_size <= 0xFFFFFFFF else 0
    return (ftyp + struct.pack(">I", size_field) + b"mdat")[:total]


@lru_cache(maxsize=64)
def _video_block(job_id: str) -> bytes:
    """Two copies of a per-job pseudo-random block, so any window of up to one block is one slice."""
    seed = int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big")
    block = random.Random(seed).randbytes(CHUNK_SIZE)
    return block + block


def video_chunks(
    job_id: str, total: int, start: int = 0, end: int | None = None, chunk: int = CHUNK_SIZE
) -> Iterator[memoryview]:
    """Bytes [start, end) of the video, in pieces of at most `chunk` bytes; nothing is materialised."""
    stop = total if end is None else min(end, total)
    chunk = min(chunk, CHUNK_SIZE)
    header = video_header(total)
    doubled = memoryview(_video_block(job_id))
    pos = start
    while pos < stop:
        if pos < len(header):
            piece = memoryview(header)[pos : min(stop, len(header))]
        else:
            offset = (pos - len(header)) % CHUNK_SIZE
            piece = doubled[offset : offset + min(chunk, stop - pos)]
        yield piece
        pos += len(piece)


@lru_cache(maxsize=256)
def video_sha256(job_id: str, total: int) -> str:
    digest = hashlib.sha256()
    for piece in video_chunks(job_id, total):
        digest.update(piece)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------- serving files


class RangeNotSatisfiable(Exception):
    """Answered as 416 with `Content-Range: bytes */<total>`."""


def parse_range(header: str | None, total: int) -> tuple[int, int] | None:
    """(start, end_exclusive) for one byte range; None means "send everything" (absent, odd or multi)."""
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0:
                raise RangeNotSatisfiable
            return max(total - suffix, 0), total
        start = int(first)
        end = total if last == "" else min(int(last) + 1, total)
    except ValueError:
        return None
    if start >= total or end <= start:
        raise RangeNotSatisfiable
    return start, end


def _slices(data: bytes, start: int, end: int) -> Iterator[memoryview]:
    view = memoryview(data)
    for pos in range(start, end, CHUNK_SIZE):
        yield view[pos : min(pos + CHUNK_SIZE, end)]


def _servable(state: SimState, request: web.Request) -> tuple[Job, int] | web.Response:
    if not hmac.compare_digest(request.query.get("token", "").encode(), state.config.file_token.encode()):
        return error_response(403, "forbidden: bad or expired token")
    job = state.jobs.get(request.match_info["job_id"])
    match = _FILE_NAME.match(request.match_info["name"])
    if job is None or match is None:
        return error_response(404, "file not found")
    index, ext = int(match.group(1)), match.group(2)
    if job.status(time.monotonic()) != "success" or ext != job.output_ext or index >= job.output_count:
        return error_response(404, "file not found")
    return job, index


async def get_file(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    state.stats.requests["GET /files"] += 1
    job_id = request.match_info["job_id"]
    if job_id in state.jobs:
        state.stats.job(job_id).files += 1
    response = await _serve_file(request, state)
    state.stats.responses[str(response.status)] += 1
    return response


async def _serve_file(request: web.Request, state: SimState) -> web.StreamResponse:
    found = _servable(state, request)
    if isinstance(found, web.Response):
        return found
    job, index = found
    cfg = state.config
    chunks: Callable[[int, int], Iterator[memoryview]]
    if job.kind == "video":
        total, content_type = job.video_bytes, "video/mp4"
        chunks = functools.partial(video_chunks, job.job_id, total)
    else:
        data = png_bytes(job.job_id, index, job.image_size)
        total, content_type = len(data), "image/png"
        chunks = functools.partial(_slices, data)

    headers = {"Accept-Ranges": "bytes" if cfg.range_support else "none"}
    start, end, status = 0, total, 200
    if cfg.range_support:
        try:
            wanted = parse_range(request.headers.get("Range"), total)
        except RangeNotSatisfiable:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{total}", **headers})
        if wanted is not None:
            (start, end), status = wanted, 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{total}"

    response = web.StreamResponse(status=status, headers=headers)
    response.content_type = content_type
    response.content_length = end - start
    await response.prepare(request)
    if request.method != "HEAD":
        began, sent = time.monotonic(), 0
        for n, piece in enumerate(chunks(start, end)):
            if n and cfg.file_drip_delay > 0:
                await asyncio.sleep(cfg.file_drip_delay)
            if cfg.file_rate_limit > 0:
                # Paced against the transfer's start, not per chunk, so timer slack does not add up.
                ahead = sent / cfg.file_rate_limit - (time.monotonic() - began)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            await response.write(piece)
            sent += len(piece)
    await response.write_eof()
    return response


def add_file_routes(app: web.Application) -> None:
    app.router.add_get("/files/{job_id}/{name}", get_file)
