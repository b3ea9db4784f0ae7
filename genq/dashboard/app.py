"""The dashboard's web app (aiohttp): pages, JSON API, files, SVG plots and the live event stream.

Locked down like ``genq flower`` (:mod:`genq.worker.flower`):

- **Credentials.** Basic auth from ``GENQ_DASHBOARD_BASIC_AUTH`` (``user:password``, several
  comma-separated; from the environment or ``.env``, never the command line). Without it the dashboard
  does not start unless ``local_only``: loopback only, no auth, and a request naming any other host is
  refused 403 (DNS rebinding). Every page, asset, API call, file, plot and the event stream answer 401
  without credentials.
- **Actions** (cancel, resubmit) are POSTs that need the session's CSRF token in ``X-CSRF-Token``: the
  token is an HMAC of the session cookie (``SameSite=Strict``, ``HttpOnly``) under a key made at start,
  and a POST whose ``Origin`` names another host is refused too.
- **Nothing secret reaches the page**: output URLs are never read, paths never leave the server, every
  URL in a request, callback or error is cut to scheme, host and path (:mod:`genq.dashboard.queries`). A
  Content-Security-Policy allows only this server's own scripts, styles, images and media.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import redis
from aiohttp import web
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from genq.budgets import BudgetBook
from genq.clock import RedisClock
from genq.dashboard import plots
from genq.dashboard.queries import JOB_ID, JobFilter, Queries, per_minute, xrange_entries
from genq.errors import GenqError
from genq.ledger import JobEvent, Ledger
from genq.schemas import JobKind, JobState
from genq.settings import basic_auth_entries, check_basic_auth

log = logging.getLogger("genq.dashboard")

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
SESSION_COOKIE = "genq_dash_session"
CSRF_HEADER = "X-CSRF-Token"
STATIC = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
REPLAY_MAX = 5_000
"""Most events a reconnecting stream client is sent from before it connected; beyond, it reloads."""
CLIENT_QUEUE = 2_000
"""Batches buffered per stream client before it is told to reload instead."""
PLOT_CACHE_SECONDS = 5.0
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
               ".gif": "image/gif", ".mp4": "video/mp4", ".webm": "video/webm"}  # fmt: skip


class DashboardRefused(GenqError):
    """The dashboard would run without the protection it needs; the message says what to set."""


class DashboardSettings(BaseSettings):
    """``genq dashboard``: read from ``GENQ_DASHBOARD_*`` (and ``.env``), kept apart from
    :class:`genq.settings.Settings` so the dashboard adds no setting any other process reads."""

    model_config = SettingsConfigDict(
        env_prefix="GENQ_DASHBOARD_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    basic_auth: SecretStr = SecretStr("")
    """``user:password``, several comma-separated. Required unless ``--local-only``."""
    address: str = "127.0.0.1"
    """Address to listen on."""
    port: int = Field(8950, ge=0, le=65535)
    """Port to listen on (0: any free port)."""

    @field_validator("basic_auth")
    @classmethod
    def _user_password(cls, value: SecretStr) -> SecretStr:
        return check_basic_auth(value)

    @property
    def credentials(self) -> list[str]:
        return basic_auth_entries(self.basic_auth)


def load_dashboard_settings() -> DashboardSettings:
    from pydantic import ValidationError

    from genq.settings import SettingsError

    try:
        return DashboardSettings()
    except ValidationError as exc:
        lines = [f"  GENQ_DASHBOARD_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()]
        raise SettingsError("invalid dashboard settings:\n" + "\n".join(lines)) from None


# ---------------------------------------------------------------------- the live event hub


def stream_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return 0, 0


def event_json(e: JobEvent) -> dict[str, Any]:
    return {"id": e.stream_id, "job": e.job_id, "kind": e.kind, "from": e.from_state, "to": e.to_state,
            "at": e.at, "parent": e.parent_id}  # fmt: skip


class EventHub:
    """One thread tails the ledger's event stream (``Ledger.read_events``) and hands each batch to
    every connected stream client's queue, on the event loop. A client too slow to keep up is told to
    reload rather than let its queue grow."""

    def __init__(self, client: redis.Redis, block_ms: int = 1000) -> None:
        self.ledger = Ledger(client)
        self.block_ms = block_ms
        self.clients: set[asyncio.Queue[list[dict[str, Any]] | None]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.after = "$"
        self.delivered = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.after = self.ledger.last_event_id()
        self.thread = threading.Thread(target=self._run, name="genq-dashboard-events", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for queue in list(self.clients):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        if self.thread is not None:
            self.thread.join(timeout=self.block_ms / 1000 + 2)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                events = self.ledger.read_events(self.after, block_ms=self.block_ms, count=1000)
            except redis.RedisError as exc:
                log.warning("event stream: %s; again in 1s", type(exc).__name__)
                self.stopping.wait(1.0)
                continue
            if not events:
                continue
            self.after = events[-1].stream_id
            batch = [event_json(e) for e in events]
            assert self.loop is not None
            with contextlib.suppress(RuntimeError):  # the loop closed while shutting down
                self.loop.call_soon_threadsafe(self._publish, batch)

    def _publish(self, batch: list[dict[str, Any]]) -> None:
        self.delivered += len(batch)
        for queue in list(self.clients):
            try:
                queue.put_nowait(batch)
            except asyncio.QueueFull:
                # Too far behind: drop what it has and tell it to reload.
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait([{"resync": True}])

    def subscribe(self) -> asyncio.Queue[list[dict[str, Any]] | None]:
        queue: asyncio.Queue[list[dict[str, Any]] | None] = asyncio.Queue(maxsize=CLIENT_QUEUE)
        self.clients.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[list[dict[str, Any]] | None]) -> None:
        self.clients.discard(queue)


# ---------------------------------------------------------------------- the app


class Dashboard:
    """State shared by the handlers."""

    def __init__(
        self,
        queries: Queries,
        *,
        credentials: list[str],
        local_only: bool,
        hub: EventHub | None,
        actions: Any = None,
        health: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.queries = queries
        self.credentials = [c.encode() for c in credentials]
        self.local_only = local_only
        self.hub = hub
        self.actions = actions  # cancel(job_id) -> bool, resubmit(job_id) -> bool (a Producer)
        self.health = health
        self.csrf_key = secrets.token_bytes(32)
        self._cache: dict[str, tuple[float, Any]] = {}

    def csrf_token(self, session: str) -> str:
        return hmac.new(self.csrf_key, session.encode(), hashlib.sha256).hexdigest()

    def authorized(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            given = base64.b64decode(header[6:].strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        ok = False
        for cred in self.credentials:
            ok |= hmac.compare_digest(given, cred)
        return ok

    async def cached(self, name: str, compute: Callable[[], Any]) -> Any:
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit and now - hit[0] < PLOT_CACHE_SECONDS:
            return hit[1]
        value = await asyncio.to_thread(compute)
        self._cache[name] = (now, value)
        return value


DASH: web.AppKey[Dashboard] = web.AppKey("dashboard", Dashboard)
SESSION: Any = web.RequestKey("session", str) if hasattr(web, "RequestKey") else "genq_session"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def host_name(host: str) -> str:
    """The host of a ``Host`` header, without its port."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    dash = request.app[DASH]
    if dash.local_only and host_name(request.host) not in LOOPBACK_HOSTS:
        return web.Response(status=403, text="403: this dashboard answers to localhost only\n")
    if not dash.local_only and not dash.authorized(request.headers.get("Authorization")):
        return web.Response(
            status=401,
            text="401: credentials required\n",
            headers={"WWW-Authenticate": 'Basic realm="genq dashboard", charset="UTF-8"'},
        )
    session = request.cookies.get(SESSION_COOKIE, "")
    fresh = not re.fullmatch(r"[A-Za-z0-9_-]{32,64}", session)
    if fresh:
        session = secrets.token_urlsafe(32)
    request[SESSION] = session
    if request.method not in ("GET", "HEAD"):
        origin = request.headers.get("Origin")
        token = request.headers.get(CSRF_HEADER, "")
        if (
            fresh
            or not hmac.compare_digest(token, dash.csrf_token(session))
            or (origin is not None and origin != "null" and _origin_host(origin) != request.host.lower())
        ):
            return web.json_response({"error": "CSRF check failed: reload the page"}, status=403)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        _finish(exc, session if fresh else None)
        raise
    _finish(response, session if fresh else None)
    return response


def _finish(response: web.StreamResponse, new_session: str | None) -> None:
    if new_session is not None and not response.prepared:
        response.set_cookie(SESSION_COOKIE, new_session, httponly=True, samesite="Strict", path="/")
    if not response.prepared:
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Cache-Control", "no-store")


def _origin_host(origin: str) -> str:
    return origin.split("://", 1)[-1].rstrip("/").lower()


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda v: json.dumps(v, separators=(",", ":")))


async def index(request: web.Request) -> web.StreamResponse:
    return _static_response("index.html")


async def static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in STATIC or name == "index.html":
        raise web.HTTPNotFound()
    return _static_response(name)


def _static_response(name: str) -> web.Response:
    body = resources.files("genq.dashboard").joinpath("static", name).read_bytes()
    return web.Response(body=body, content_type=STATIC[name], charset="utf-8")


async def session_info(request: web.Request) -> web.StreamResponse:
    dash = request.app[DASH]
    return _json({"csrf": dash.csrf_token(request[SESSION]), "local_only": dash.local_only})


async def counts(request: web.Request) -> web.StreamResponse:
    return _json(await asyncio.to_thread(request.app[DASH].queries.counts))


def _int(request: web.Request, name: str, default: int) -> int:
    try:
        return int(request.query.get(name, default))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer") from None


async def jobs(request: web.Request) -> web.StreamResponse:
    q = request.app[DASH].queries
    if "ids" in request.query:
        rows = await asyncio.to_thread(q.rows, request.query["ids"].split(","))
        return _json({"jobs": rows, "next": None, "scanned": len(rows)})
    job_id = request.query.get("id", "").strip()
    idem = request.query.get("idem", "").strip()
    if job_id or idem:
        rows = await asyncio.to_thread(q.find, job_id=job_id or None, idempotency_key=idem or None)
        return _json({"jobs": rows, "next": None, "scanned": len(rows)})
    states = frozenset(s for s in request.query.getall("state", []) if s in JobState._value2member_map_)
    kinds = frozenset(k for k in request.query.getall("kind", []) if k in JobKind._value2member_map_)
    model = request.query.get("model", "").strip() or None
    filt = JobFilter(states, kinds, model)
    page = await asyncio.to_thread(
        q.jobs_page, offset=_int(request, "offset", 0), limit=_int(request, "limit", 50), filt=filt
    )
    return _json(page)


async def job(request: web.Request) -> web.StreamResponse:
    detail = await asyncio.to_thread(request.app[DASH].queries.job_detail, request.match_info["job_id"])
    if detail is None:
        return _json({"error": "no such job"}, status=404)
    return _json(detail)


async def action(request: web.Request) -> web.StreamResponse:
    dash = request.app[DASH]
    job_id, verb = request.match_info["job_id"], request.match_info["verb"]
    if not JOB_ID.match(job_id) or await asyncio.to_thread(dash.queries.get, job_id) is None:
        return _json({"error": "no such job"}, status=404)
    if dash.actions is None:
        return _json({"error": "actions are not available"}, status=503)
    done = await asyncio.to_thread(getattr(dash.actions, verb), job_id)
    rec = await asyncio.to_thread(dash.queries.get, job_id)
    log.info("dashboard %s of job %s: %s", verb, job_id, "done" if done else "refused")
    return _json({"id": job_id, "done": bool(done), "state": rec.state.value if rec else None})


async def gallery(request: web.Request) -> web.StreamResponse:
    q = request.app[DASH].queries
    page = await asyncio.to_thread(
        q.gallery, offset=_int(request, "offset", 0), limit=_int(request, "limit", 24)
    )
    return _json(page)


async def output_file(request: web.Request) -> web.StreamResponse:
    try:
        index = int(request.match_info["index"])
    except ValueError:
        raise web.HTTPNotFound() from None
    found = await asyncio.to_thread(
        request.app[DASH].queries.output_file, request.match_info["job_id"], index
    )
    if found is None:
        raise web.HTTPNotFound()
    path, out = found
    ctype = (out.content_type or "").split(";")[0].strip().lower()
    if not re.fullmatch(r"(image/(png|jpeg|webp|gif)|video/(mp4|webm|quicktime))", ctype):
        ctype = MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
    headers = {"Content-Type": ctype, "Cache-Control": "private, max-age=3600"}
    if ctype == "application/octet-stream":
        headers["Content-Disposition"] = "attachment"
    return web.FileResponse(path, headers=headers)


async def models(request: web.Request) -> web.StreamResponse:
    return _json({"models": await asyncio.to_thread(request.app[DASH].queries.models)})


async def health(request: web.Request) -> web.StreamResponse:
    dash = request.app[DASH]
    return _json(await dash.cached("health", lambda: _health(dash)))


def _health(dash: Dashboard) -> dict[str, Any]:
    q = dash.queries
    now = q.now()
    swept = q.last_swept()
    out: dict[str, Any] = {
        "now": now,
        "last_swept": swept,
        "sweep_age": None if swept is None else now - swept,
    }
    if dash.health is not None:
        out.update(dash.health())
    return out


async def plot(request: web.Request) -> web.StreamResponse:
    dash = request.app[DASH]
    name = request.match_info["name"]
    if name in ("throughput", "latency"):
        data = await dash.cached("hour", lambda: per_minute(dash.queries.recent_events(), dash.queries.now()))
        if name == "throughput":
            svg = plots.stacked_bars("Jobs ended per minute, last hour", data["ended"], data["start"], 60)
        else:
            series = {
                "p50": [b["p50"] if b else None for b in data["to_result"]],
                "p95": [b["p95"] if b else None for b in data["to_result"]],
            }
            svg = plots.lines(
                "Submitted -> result seen (upstream work + detection), per 5 min", series, data["start"], 60
            )
    elif name in ("errors", "queues", "queue_age", "sweeper"):
        h = await dash.cached("health", lambda: _health(dash))
        if name == "errors":
            errors = {f"{k}": v for k, v in (h.get("upstream_errors") or {}).items()}
            svg = plots.hbars("Upstream errors by class (since counters began)", errors, empty="no errors")
        elif name == "queues":
            depth = {k: v["messages"] for k, v in (h.get("queues") or {}).items()}
            if h.get("unacked") is not None:
                depth["(unacked: running or countdown)"] = h["unacked"]
            svg = plots.hbars("Queue depth (messages)", depth, empty=h.get("broker_error") or "no queues")
        elif name == "queue_age":
            ages = {
                k: v["oldest_age"] for k, v in (h.get("queues") or {}).items() if v["oldest_age"] is not None
            }
            svg = plots.hbars("Oldest message age per queue", ages, unit="s", empty="unknown")
        else:
            age = h.get("sweep_age")
            svg = plots.hbars(
                "Seconds since the sweeper last ran",
                {} if age is None else {"sweeper": round(age, 1)},
                unit="s",
                empty="the sweeper never ran (is beat running?)",
            )
    else:
        raise web.HTTPNotFound()
    return web.Response(text=svg, content_type="image/svg+xml", headers={"Cache-Control": "no-store"})


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: each message is a batch of transitions (JSON list), its ``id`` the last stream
    id in it. A client reconnecting with ``Last-Event-ID`` (or ``?after=``) first gets what it missed."""
    dash = request.app[DASH]
    if dash.hub is None:
        raise web.HTTPServiceUnavailable()
    after = request.headers.get("Last-Event-ID") or request.query.get("after") or ""
    queue = dash.hub.subscribe()
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
    try:
        await response.prepare(request)
        last = (0, 0)
        if after and re.fullmatch(r"\d+-\d+", after):
            missed = await asyncio.to_thread(_replay, dash.queries.redis, after)
            if missed is None:
                await response.write(b'event: jobs\ndata: [{"resync":true}]\n\n')
            elif missed:
                last = stream_key(missed[-1]["id"])
                await _send(response, missed)
        else:
            await response.write(b": connected\n\n")
        while True:
            try:
                batch = await asyncio.wait_for(queue.get(), timeout=15)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if batch is None:
                break
            while not queue.empty():
                more = queue.get_nowait()
                if more is None:
                    break
                batch = batch + more
            fresh = [e for e in batch if "resync" in e or stream_key(e["id"]) > last]
            if fresh:
                if "id" in fresh[-1]:
                    last = stream_key(fresh[-1]["id"])
                await _send(response, fresh)
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        dash.hub.unsubscribe(queue)
    return response


async def _send(response: web.StreamResponse, batch: list[dict[str, Any]]) -> None:
    last_id = next((e["id"] for e in reversed(batch) if "id" in e), None)
    head = f"id: {last_id}\n" if last_id else ""
    await response.write(f"{head}event: jobs\ndata: {json.dumps(batch, separators=(',', ':'))}\n\n".encode())


def _replay(client: redis.Redis, after: str) -> list[dict[str, Any]] | None:
    entries = xrange_entries(client, "(" + after, "+", REPLAY_MAX + 1)
    if len(entries) > REPLAY_MAX:
        return None
    return [event_json(JobEvent.from_stream(i, d)) for i, d in entries]


def build_app(dash: Dashboard) -> web.Application:
    app = web.Application(middlewares=[guard])
    app[DASH] = dash
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/api/session", session_info)
    app.router.add_get("/api/counts", counts)
    app.router.add_get("/api/jobs", jobs)
    app.router.add_get("/api/jobs/{job_id}", job)
    app.router.add_post("/api/jobs/{job_id}/{verb:cancel|resubmit}", action)
    app.router.add_get("/api/gallery", gallery)
    app.router.add_get("/api/models", models)
    app.router.add_get("/api/health", health)
    app.router.add_get("/files/{job_id}/{index}", output_file)
    app.router.add_get("/plots/{name}.svg", plot)
    app.router.add_get("/events", events)

    async def start_hub(app: web.Application) -> None:
        if dash.hub is not None:
            dash.hub.start(asyncio.get_running_loop())

    async def stop_hub(app: web.Application) -> None:
        if dash.hub is not None:
            await asyncio.to_thread(dash.hub.stop)

    app.on_startup.append(start_hub)
    app.on_shutdown.append(stop_hub)
    return app


# ---------------------------------------------------------------------- wiring to settings


def broker_health(settings: Any) -> Callable[[], dict[str, Any]]:
    """Queue depths and ages (``genq metrics``' own reader) and upstream error counters."""
    from genq import exporter, metrics
    from genq.services import redis_client

    probe = exporter.queue_probe(settings)
    client = redis_client(settings)
    book = BudgetBook(client, settings.budgets)
    clock = RedisClock(client)

    def read() -> dict[str, Any]:
        out: dict[str, Any] = {}
        try:
            c = metrics.read(client)
            out["upstream_errors"] = {f"{fam} {cls}": n for (fam, cls), n in c.errors.items()}
            total, usage = book.report(clock())
            out["budgets"] = {
                "total": [t.model_dump() for t in total],
                "producers": [u.model_dump() for u in usage],
            }
        except redis.RedisError as exc:
            out["upstream_errors"] = {}
            out["redis_error"] = type(exc).__name__
        if probe is None:
            return out
        try:
            stats = probe.stats()
            out["queues"] = {
                q: {"messages": s.messages, "oldest_age": s.oldest_age} for q, s in stats.items()
            }
            out["unacked"] = probe.unacked()
        except Exception as exc:  # kombu and redis-py raise unrelated types; the page must still answer
            out["broker_error"] = f"broker unavailable ({type(exc).__name__})"
        return out

    return read


def dashboard_for(settings: Any, *, credentials: list[str], local_only: bool) -> Dashboard:
    from genq.producer import Producer
    from genq.services import redis_client

    client = redis_client(settings)
    download_dir = Path(settings.download.dir)
    return Dashboard(
        Queries(client, download_dir),
        credentials=credentials,
        local_only=local_only,
        hub=EventHub(redis_client(settings)),
        actions=Producer(settings),
        health=broker_health(settings),
    )


def serve(settings: Any, config: DashboardSettings, *, local_only: bool, address: str, port: int) -> None:
    """Run until SIGTERM or SIGINT; :class:`DashboardRefused` if it would be unprotected."""
    credentials = config.credentials
    if local_only:
        if address not in ("127.0.0.1", "::1", "localhost"):
            raise DashboardRefused(f"--local-only listens on loopback only, not {address}")
        credentials = []
    elif not credentials:
        raise DashboardRefused(
            "GENQ_DASHBOARD_BASIC_AUTH is not set: the dashboard needs user:password, or --local-only "
            "for a loopback-only dashboard without authentication"
        )
    dash = dashboard_for(settings, credentials=credentials, local_only=local_only)
    app = build_app(dash)
    log.info(
        "dashboard on http://%s:%d (%s)",
        address,
        port,
        "loopback only, no authentication" if local_only else f"basic auth, {len(credentials)} user(s)",
    )
    web.run_app(app, host=address, port=port, print=None, shutdown_timeout=3, access_log=None)
