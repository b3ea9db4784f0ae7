"""Read-only ledger queries for the dashboard, all through :mod:`genq.keys`: nothing here writes.

Every answer is built for the page, so it is also where secrets are kept out: output URLs live in a hash
of their own (:func:`genq.keys.job_urls`) that nothing here reads; a record's paths never leave the
server (files are named by job id and output index); and every URL a request, callback or error carries
is cut to scheme, host and path (:func:`genq.netguard.redact_url`), so a presigned token cannot reach it.

Scale: the job list pages ``genq:jobs`` (a sorted set by creation time) newest first with one
``ZREVRANGE`` and one pipelined ``HGETALL`` of that page only. A filter by state, kind or model reads
three fields of at most :data:`SCAN_BUDGET` ids per request, for at most :data:`SCAN_SECONDS` (pipelined
``HMGET``, 500 at a time), and hands back a cursor to go on from, so no request reads the whole ledger.
"""

from __future__ import annotations

import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis

from genq import keys
from genq.ledger import JobEvent, as_text, state_counts
from genq.netguard import redact_url
from genq.schemas import JobRecord, JobState, ModelRecord, OutputFile

T = TypeVar("T")

PAGE_MAX = 200
SCAN_BUDGET = 10_000
"""Most job ids one filtered listing request reads (three fields each) before answering with a cursor."""
SCAN_SECONDS = 0.05
"""And at most this long: a filtered request answers with a cursor once it has read for this long, so it
stays well under 200 ms however rare its matches and however loaded the machine."""
SCAN_CHUNK = 500
EVENTS_SCAN_CAP = 100_000
"""Most stream entries one job's timeline or the last hour's plots read (the stream's own cap)."""
JOB_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_URL = re.compile(r"(?i)\b(?:https?|wss?|ftp)://[^\s'\"<>]+")
TRAINING_EXPECTED = (20 * 60.0, 25 * 60.0)
"""How long an upstream training usually takes, in seconds (the API's documented 20-25 minutes)."""


def redact(value: Any) -> Any:
    """``value`` with every URL in every string cut to scheme, host and path (no query, fragment or
    credentials, where presigned tokens live)."""
    if isinstance(value, str):
        return _URL.sub(lambda m: redact_url(m.group(0)), value)
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    return value


def _decode(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {as_text(k): as_text(v) for k, v in raw.items()}


def xrange_entries(
    client: redis.Redis, start: str = "-", end: str = "+", count: int | None = None
) -> list[tuple[str, dict[str, str]]]:
    """Stream entries ``start..end`` of the event stream as ``(id, fields)`` text."""
    raw: Any = client.xrange(keys.EVENTS, min=start, max=end, count=count)
    return [(as_text(i), _decode(d or {})) for i, d in raw or []]


def record_from(raw: Mapping[Any, Any]) -> JobRecord | None:
    if not raw:
        return None
    try:
        return JobRecord.from_hash(_decode(raw))
    except ValueError:
        return None  # a half-written or foreign hash: skipped, never a 500


def summary(rec: JobRecord) -> dict[str, Any]:
    """One row of the job table."""
    request = rec.request
    prompt = request.get("prompt") or (request.get("generate") or {}).get("prompt") or ""
    return {
        "id": rec.id,
        "kind": rec.kind.value,
        "state": rec.state.value,
        "producer": rec.producer,
        "lane": rec.lane.value,
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
        "finished_at": rec.finished_at,
        "upstream_status": rec.upstream_status,
        "polls": rec.polls,
        "model_id": rec.model_id,
        "parent_id": rec.parent_id,
        "outputs": len(rec.outputs),
        "expected_outputs": rec.expected_outputs,
        "prompt": redact(str(prompt))[:200],
        "error": redact(rec.error)[:300] if rec.error else None,
    }


def output_view(out: OutputFile) -> dict[str, Any]:
    """An output as the page sees it: no path (the file is reached as job id + index)."""
    return {
        "index": out.index,
        "remote_id": out.remote_id,
        "bytes": out.bytes,
        "sha256": out.sha256,
        "content_type": out.content_type,
        "media": media_of(out),
    }


def media_of(out: OutputFile) -> str:
    ctype = (out.content_type or "").lower()
    suffix = Path(out.path).suffix.lower()
    if ctype.startswith("video/") or suffix in (".mp4", ".webm", ".mov"):
        return "video"
    if ctype.startswith("image/") or suffix in (".png", ".jpg", ".jpeg", ".webp", ".gif"):
        return "image"
    return "file"


@dataclass(frozen=True)
class JobFilter:
    states: frozenset[str] = frozenset()
    kinds: frozenset[str] = frozenset()
    model: str | None = None

    @property
    def empty(self) -> bool:
        return not (self.states or self.kinds or self.model)

    def match(self, state: str, kind: str, model: str) -> bool:
        return (
            (not self.states or state in self.states)
            and (not self.kinds or kind in self.kinds)
            and (self.model is None or model == self.model)
        )


class Queries:
    """The dashboard's reads. Synchronous (redis-py); the web app runs them in threads."""

    def __init__(self, client: redis.Redis, download_dir: Path) -> None:
        self.redis = client
        self.download_dir = download_dir

    # ------------------------------------------------------------------ jobs

    def counts(self) -> dict[str, Any]:
        """Jobs per state (over kinds), per kind, and per ``kind:state`` (``Ledger.counts``), and the
        newest stream id: events after it are what the live view adds."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.COUNTS)
        pipe.xrevrange(keys.EVENTS, count=1)
        pipe.zcard(keys.JOBS)
        raw, last, listed = pipe.execute()
        pairs = state_counts(raw)
        states: Counter[str] = Counter()
        kinds: Counter[str] = Counter()
        for pair, n in pairs.items():
            kind, _, state = pair.partition(":")
            states[state] += n
            kinds[kind] += n
        return {
            "states": dict(states),
            "kinds": dict(kinds),
            "pairs": pairs,
            "listed": int(listed),
            "last_event": as_text(last[0][0]) if last else "0-0",
        }

    def jobs_page(self, *, offset: int = 0, limit: int = 50, filt: JobFilter | None = None) -> dict[str, Any]:
        """A page of jobs, newest first. Unfiltered: ids ``offset..offset+limit`` of the index. Filtered:
        scans from ``offset`` (a cursor into the index) until ``limit`` match or :data:`SCAN_BUDGET`
        ids were read; ``next`` is where to go on from (None at the end of the index)."""
        limit = max(1, min(limit, PAGE_MAX))
        offset = max(0, offset)
        filt = filt or JobFilter()
        if filt.empty:
            ids = [as_text(i) for i in self.redis.zrevrange(keys.JOBS, offset, offset + limit - 1)]
            rows = self._summaries(ids)
            end = len(ids) < limit
            return {"jobs": rows, "next": None if end else offset + limit, "scanned": len(ids)}

        def matching(ids: list[str]) -> list[tuple[int, str]]:
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hmget(keys.job(job_id), "state", "kind", "model_id")
            return [
                (i, job_id)
                for i, (job_id, (state, kind, model)) in enumerate(zip(ids, pipe.execute(), strict=True))
                if state is not None and filt.match(as_text(state), as_text(kind), as_text(model))
            ]

        found, cursor, scanned = self._scan(offset, limit, matching)
        return {"jobs": self._summaries(found), "next": cursor, "scanned": scanned}

    def _summaries(self, ids: list[str]) -> list[dict[str, Any]]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(keys.job(job_id))
        rows = []
        for raw in pipe.execute():
            rec = record_from(raw)
            if rec is not None:
                rows.append(summary(rec))
        return rows

    def find(self, *, job_id: str | None = None, idempotency_key: str | None = None) -> list[dict[str, Any]]:
        """The one job with this id, or named by this producer idempotency key (``genq:idem:<key>``)."""
        if idempotency_key:
            found = self.redis.get(keys.idempotency(idempotency_key))
            job_id = as_text(found) if found is not None else None
        if not job_id or not JOB_ID.match(job_id):
            return []
        return self._summaries([job_id])

    def rows(self, ids: Iterable[str]) -> list[dict[str, Any]]:
        """Rows of the given jobs (at most :data:`PAGE_MAX`), for the live table to refresh the ones
        the stream said moved."""
        return self._summaries([j for j in ids if JOB_ID.match(j)][:PAGE_MAX])

    def get(self, job_id: str) -> JobRecord | None:
        if not JOB_ID.match(job_id):
            return None
        return record_from(self.redis.hgetall(keys.job(job_id)))

    def job_detail(self, job_id: str) -> dict[str, Any] | None:
        """Everything the job page shows: the record (redacted, no paths), its timeline, its steps."""
        rec = self.get(job_id)
        if rec is None:
            return None
        events, complete = self.job_events(rec)
        steps = self._summaries(rec.children) if rec.children else []
        callback = None
        if rec.callback:
            target = rec.callback.get("url")
            callback = {
                "target": redact_url(str(target))
                if target
                else f"task {rec.callback.get('task')} on {rec.callback.get('queue')}",
                "state": rec.callback_state,
                "attempts": rec.callback_attempts,
                "error": redact(rec.callback_error),
            }
        return {
            "job": {
                **summary(rec),
                "error": redact(rec.error),
                "request": redact(rec.request),
                "upstream_id": rec.upstream_id,
                "submit_attempts": rec.submit_attempts,
                "errors_in_row": rec.errors_in_row,
                "next_poll_at": rec.next_poll_at,
                "deadline_at": rec.deadline_at,
                "remote_ids": rec.remote_ids,
                "children": rec.children,
                "outputs": [output_view(o) for o in rec.outputs],
                "callback": callback,
            },
            "timeline": timeline(rec, events),
            "events_complete": complete,
            "steps": steps,
        }

    def job_events(self, rec: JobRecord) -> tuple[list[JobEvent], bool]:
        """The job's (and its workflow steps') transitions from the stream, read from its creation to its
        end. False when the stream no longer reaches back that far (it keeps ~100,000 entries) or the
        read hit :data:`EVENTS_SCAN_CAP`."""
        start_ms = int(rec.created_at * 1000) - 1000
        end = "+" if rec.finished_at is None else f"{int(rec.finished_at * 1000) + 2000}"
        first = xrange_entries(self.redis, count=1)
        complete = bool(first) and int(first[0][0].split("-")[0]) <= start_ms
        wanted = {rec.id, *rec.children}
        out: list[JobEvent] = []
        after = f"{max(start_ms, 0)}-0"
        read = 0
        while read < EVENTS_SCAN_CAP:
            chunk = xrange_entries(self.redis, after, end, 2000)
            if not chunk:
                break
            for entry_id, fields in chunk:
                if fields.get("job") in wanted or fields.get("parent") == rec.id:
                    out.append(JobEvent.from_stream(entry_id, fields))
            read += len(chunk)
            after = "(" + chunk[-1][0]
            if len(chunk) < 2000:
                break
        else:
            return out, False
        # Its own creation found, or the stream reaches back before it: nothing older was trimmed.
        complete = complete or any(e.job_id == rec.id and e.from_state == "" for e in out)
        return out, complete

    # ------------------------------------------------------------------ files

    def output_file(self, job_id: str, index: int) -> tuple[Path, OutputFile] | None:
        """The downloaded file of output ``index`` of ``job_id``, resolved from the ledger record and
        only if it lies inside the download directory; None otherwise."""
        if not JOB_ID.match(job_id) or not 0 <= index < 10_000:
            return None
        raw = self.redis.hget(keys.job(job_id), f"out:{index:04d}")
        if raw is None:
            return None
        try:
            out = OutputFile.model_validate_json(as_text(raw))
        except ValueError:
            return None
        root = self.download_dir.resolve()
        try:
            path = Path(out.path)
            path = (path if path.is_absolute() else Path.cwd() / path).resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not path.is_relative_to(root) or path == root or not path.is_file():
            return None
        return path, out

    def gallery(self, *, offset: int = 0, limit: int = 24) -> dict[str, Any]:
        """Finished jobs with outputs, newest first: a page of at most ``limit`` jobs, scanning at most
        :data:`SCAN_BUDGET` ids (``next``: where to go on from)."""
        limit = max(1, min(limit, 100))

        def finished(ids: list[str]) -> list[tuple[int, dict[str, Any]]]:
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hget(keys.job(job_id), "state")
            done = [j for j, state in zip(ids, pipe.execute(), strict=True) if as_text(state) == "succeeded"]
            records = {r.id: r for r in self._records(done)}
            return [
                (
                    position,
                    {
                        "id": rec.id,
                        "kind": rec.kind.value,
                        "finished_at": rec.finished_at,
                        "prompt": summary(rec)["prompt"],
                        "outputs": [output_view(o) for o in rec.outputs],
                    },
                )
                for position, rec in ((i, records.get(j)) for i, j in enumerate(ids))
                if rec is not None and rec.outputs
            ]

        items, cursor, _ = self._scan(offset, limit, finished)
        return {"items": items, "next": cursor}

    def _scan(
        self, offset: int, limit: int, pick: Callable[[list[str]], list[tuple[int, T]]]
    ) -> tuple[list[T], int | None, int]:
        """Walk the job index newest first from ``offset``, :data:`SCAN_CHUNK` ids at a time, keeping
        what ``pick`` takes from each chunk (position in the chunk, item), until ``limit`` items,
        :data:`SCAN_BUDGET` ids or :data:`SCAN_SECONDS`. Returns the items, where to go on from (None
        at the end of the index) and how many ids were read."""
        found: list[T] = []
        cursor = max(0, offset)
        scanned = 0
        deadline = time.monotonic() + SCAN_SECONDS
        while len(found) < limit and scanned < SCAN_BUDGET and (not scanned or time.monotonic() < deadline):
            ids = [as_text(i) for i in self.redis.zrevrange(keys.JOBS, cursor, cursor + SCAN_CHUNK - 1)]
            if not ids:
                return found, None, scanned
            scanned += len(ids)
            for position, item in pick(ids):
                found.append(item)
                if len(found) >= limit:
                    return found, cursor + position + 1, scanned
            cursor += len(ids)
            if len(ids) < SCAN_CHUNK:
                return found, None, scanned
        return found, cursor, scanned

    def _records(self, ids: list[str]) -> list[JobRecord]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(keys.job(job_id))
        return [r for r in (record_from(raw) for raw in pipe.execute()) if r is not None]

    # ------------------------------------------------------------------ models

    def models(self, limit: int = 200) -> list[dict[str, Any]]:
        ids = [as_text(i) for i in self.redis.zrevrange(keys.MODELS, 0, limit - 1)]
        pipe = self.redis.pipeline(transaction=False)
        for model_id in ids:
            pipe.hgetall(keys.model(model_id))
            pipe.lrange(keys.model_history(model_id), -100, -1)
            pipe.srandmember(keys.model_parked(model_id), 50)
            pipe.scard(keys.model_parked(model_id))
        answers = pipe.execute()
        now = self.now()
        out = []
        for i, _model_id in enumerate(ids):
            raw, hist, parked_ids, parked = answers[4 * i : 4 * i + 4]
            if not raw:
                continue
            try:
                rec = ModelRecord.from_hash(_decode(raw), [as_text(h) for h in hist], int(parked))
            except ValueError:
                continue
            out.append(model_view(rec, sorted(as_text(p) for p in parked_ids), now))
        return out

    # ------------------------------------------------------------------ health

    def now(self) -> float:
        sec, usec = self.redis.time()
        return float(sec) + float(usec) / 1e6

    def last_swept(self) -> float | None:
        value = self.redis.get(keys.SWEEP_LAST)
        return None if value is None else float(as_text(value))

    def recent_events(self, seconds: float = 3600.0) -> list[tuple[float, dict[str, str]]]:
        """Stream entries of the last ``seconds`` as ``(at, fields)``, at most :data:`EVENTS_SCAN_CAP`."""
        start = int((self.now() - seconds) * 1000)
        out: list[tuple[float, dict[str, str]]] = []
        after = f"{start}-0"
        while len(out) < EVENTS_SCAN_CAP:
            chunk = xrange_entries(self.redis, after, "+", 5000)
            for entry_id, fields in chunk:
                out.append((float(fields.get("at") or int(entry_id.split("-")[0]) / 1000), fields))
            if len(chunk) < 5000:
                break
            after = "(" + chunk[-1][0]
        return out


def model_view(rec: ModelRecord, parked_ids: list[str], now: float) -> dict[str, Any]:
    begun = rec.started_at or rec.requested_at
    ended = rec.ready_at if rec.ready_at else (None if rec.state.in_progress else rec.updated_at)
    elapsed = None if begun is None else max(0.0, (ended or now) - begun)
    return {
        "id": rec.id,
        "state": rec.state.value,
        "requested_at": rec.requested_at,
        "started_at": rec.started_at,
        "ready_at": rec.ready_at,
        "deadline_at": rec.deadline_at,
        "checks": rec.checks,
        "upstream_status": rec.upstream_status,
        "error": redact(rec.error),
        "parked": rec.parked,
        "parked_ids": parked_ids,
        "training_seconds": elapsed,
        "expected_seconds": list(TRAINING_EXPECTED),
        "history": [redact(h) for h in rec.history],
    }


_STEP_NAMES = {
    "pending": "accepted (pending)",
    "parked": "parked on its model",
    "submitting": "submitting (paid POST)",
    "submitted": "submitted upstream",
    "running": "upstream running",
    "downloading": "upstream done; downloading",
    "succeeded": "finalized: succeeded",
    "failed": "failed",
    "timed_out": "timed out",
    "cancelled": "cancelled",
    "submit_unknown": "submit unknown",
    "rejected": "rejected by a budget",
}


def timeline(rec: JobRecord, events: Iterable[JobEvent]) -> list[dict[str, Any]]:
    """The job's life as steps with times and the gap since the step before. From the stream: every
    state change (its own, and its workflow steps'). From the record: creation, polls and the last
    upstream status, the outputs downloaded, the end, and callback attempts (the ledger keeps counts and
    the last result of these, not each one)."""
    steps: list[dict[str, Any]] = []
    own = [e for e in events if e.job_id == rec.id]
    if not own or own[0].from_state != "":
        steps.append({"at": rec.created_at, "step": "created", "detail": f"{rec.kind.value} job recorded"})
    for e in events:
        if e.job_id != rec.id:
            steps.append(
                {
                    "at": e.at,
                    "step": f"step {e.job_id[:8]}: {e.to_state}",
                    "detail": f"{e.kind} {e.from_state or 'new'} -> {e.to_state}",
                    "job": e.job_id,
                }
            )
            continue
        detail = f"{e.from_state} -> {e.to_state}" if e.from_state else f"created as {e.to_state}"
        if e.to_state == "submitted" and rec.upstream_id:
            detail += f" (upstream job {rec.upstream_id})"
        if e.to_state in ("failed", "timed_out", "cancelled", "submit_unknown", "rejected") and rec.error:
            detail += f": {redact(rec.error)}"
        steps.append({"at": e.at, "step": _STEP_NAMES.get(e.to_state, e.to_state), "detail": detail})
    if rec.polls:
        last = f"last upstream status {rec.upstream_status}" if rec.upstream_status else "no status yet"
        nxt = "" if rec.terminal or not rec.next_poll_at else "; next check due"
        steps.append(
            {
                "at": rec.next_poll_at if (nxt and rec.next_poll_at) else None,
                "step": f"polls: {rec.polls}",
                "detail": f"{rec.polls} status checks, {last}{nxt}",
            }
        )
    if rec.expected_outputs and rec.kind.value != "workflow":
        size = sum(o.bytes for o in rec.outputs)
        steps.append(
            {
                "at": None,
                "step": f"downloads: {len(rec.outputs)}/{rec.expected_outputs}",
                "detail": f"{size} bytes, sha256 checked" if rec.outputs else "none yet",
            }
        )
    if rec.callback:
        steps.append(
            {
                "at": None,
                "step": f"callback: {rec.callback_state or 'waiting for the end'}",
                "detail": f"{rec.callback_attempts} attempt(s)"
                + (f"; last error: {redact(rec.callback_error)}" if rec.callback_error else ""),
            }
        )
    timed = sorted((s for s in steps if s["at"] is not None), key=lambda s: s["at"])
    untimed = [s for s in steps if s["at"] is None]
    prev = None
    for s in timed:
        s["since_prev"] = None if prev is None else max(0.0, s["at"] - prev)
        s["since_created"] = max(0.0, s["at"] - rec.created_at)
        prev = s["at"]
    return timed + untimed


# ---------------------------------------------------------------------- plots' data


def per_minute(events: list[tuple[float, dict[str, str]]], now: float, minutes: int = 60) -> dict[str, Any]:
    """From the last hour's stream: jobs finished per minute by ending state, and the time from
    submission to the upstream result being seen (``submitted`` -> ``downloading``: the upstream's own
    work plus genqueue's detection lag), p50 and p95 per 5 minutes."""
    start = now - minutes * 60
    ended: dict[str, list[int]] = defaultdict(lambda: [0] * minutes)
    submitted_at: dict[str, float] = {}
    seen: list[list[float]] = [[] for _ in range(minutes // 5)]
    terminal = {s.value for s in JobState if s.terminal}
    for at, f in events:
        minute = int((at - start) // 60)
        to = f.get("to", "")
        if to == "submitted":
            submitted_at.setdefault(f.get("job", ""), at)
        elif to == "downloading":
            began = submitted_at.pop(f.get("job", ""), None)
            if began is not None and 0 <= minute < minutes:
                seen[minute // 5].append(at - began)
        if to in terminal and 0 <= minute < minutes:
            ended[to][minute] += 1
    return {
        "start": start,
        "ended": dict(ended),
        "to_result": [_quantiles(v) for v in seen],
    }


def _quantiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    values = sorted(values)

    def q(p: float) -> float:
        return values[min(len(values) - 1, int(p * len(values)))]

    return {"p50": q(0.5), "p95": q(0.95), "n": float(len(values))}
