"""``genq flower``: Flower on the genqueue app, run in this process so that it can be locked down.

- **Authentication.** Basic auth from ``GENQ_FLOWER_BASIC_AUTH`` (from the environment, never the
  command line, where ``ps`` would show it). Without it Flower does not start unless ``local_only``:
  loopback only, no auth, and requests naming any other host are refused (a web page could otherwise
  reach it through DNS rebinding).
- **``/metrics``.** Flower serves it without authentication even with auth on; here it takes the same
  credentials as every page (Prometheus scrapes it with ``basic_auth``).
- **Task arguments** read ``image job=<id> gen=<n>`` (kind first: Flower cuts long cells short): the
  kind is read from the ledger once per job
  (here, at display time, so publishing a task costs nothing more). A by-name intake request shows its
  request id and kind, never its payload.
"""

from __future__ import annotations

import ast
import logging
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

import tornado.web

from genq.celeryconf import MODEL_TASKS, Task
from genq.errors import GenqError
from genq.services import ledger_for, redis_client
from genq.settings import Settings

log = logging.getLogger("genq.flower")

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
_NOT_LOOPBACK = r"^(?!(?:127\.0\.0\.1|localhost|::1|\[::1\])$).*$"
TASK_COLUMNS = "name,uuid,state,args,received,started,runtime,worker"
"""The Tasks page's columns: Flower's defaults plus ``args`` (job id and kind) and ``started``."""
_PARAMS: dict[str, tuple[str, ...]] = {
    Task.SUBMIT: ("gen",),
    Task.POLL: ("gen",),
    Task.DOWNLOAD: ("index", "attempt"),
    Task.TRAIN: ("gen",),
    Task.POLL_MODEL: ("gen",),
}
"""Names of a task's arguments after its subject (job or model id)."""


class FlowerRefused(GenqError):
    """Flower would run without the protection it needs; the message says what to set."""


def describe(task: str, argsrepr: str, kind_of: Callable[[str], str | None]) -> str | None:
    """A genqueue task's arguments as Flower should show them, or None to leave them as they are.

    >>> describe("genq.poll", "('3f2c', 4)", lambda job: "image")
    'image job=3f2c gen=4'
    """
    if not task.startswith("genq."):
        return None
    try:
        args = ast.literal_eval(argsrepr) if argsrepr else ()
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        # Never show what cannot be read as plain ids: a truncated intake payload, say.
        return "(not shown)" if task == Task.INTAKE else None
    if not isinstance(args, (list, tuple)):
        return None
    if task == Task.INTAKE:
        from genq.intake import job_id_for

        request = args[0] if args and isinstance(args[0], dict) else {}
        request_id = args[1] if len(args) > 1 and isinstance(args[1], str) else None
        job = f" job={job_id_for(request_id)}" if request_id else ""
        return f"{request.get('kind', '?')} request_id={request_id}{job}"
    if not args:
        return ""
    subject = str(args[0])
    head = f"model={subject}" if task in MODEL_TASKS else f"{kind_of(subject) or '?'} job={subject}"
    names = _PARAMS.get(task, ())
    rest = [f"{names[i]}={v}" if i < len(names) else repr(v) for i, v in enumerate(args[1:])]
    return " ".join([head, *rest])


def kind_lookup(settings: Settings, cap: int = 10_000) -> Callable[[str], str | None]:
    """``job id -> kind`` from the ledger, remembered (a job's kind never changes)."""
    ledger = ledger_for(redis_client(settings), settings)
    known: dict[str, str] = {}

    def kind_of(job_id: str) -> str | None:
        if job_id not in known:
            try:
                record = ledger.get(job_id)
            except Exception:  # a display detail: Redis trouble must not break the page
                return None
            if record is None:
                return None
            if len(known) >= cap:
                known.clear()
            known[job_id] = record.kind.value
        return known[job_id]

    return kind_of


def _task_formatter(kind_of: Callable[[str], str | None]) -> Callable[[Any], Any]:
    # Flower's format_task option must be a plain function (it checks the type).
    def format_task(task: Any) -> Any:
        shown = describe(str(task.name or ""), str(task.args or ""), kind_of)
        if shown is not None:
            task.args = shown
        return task

    return format_task


def serve(settings: Settings, *, local_only: bool, address: str, port: int) -> None:
    """Run Flower until SIGTERM or SIGINT; :class:`FlowerRefused` if it would be unprotected."""
    credentials = settings.flower.credentials
    if local_only:
        if address not in LOOPBACK:
            raise FlowerRefused(f"--local-only listens on loopback only, not {address}")
        credentials = []
    elif not credentials:
        raise FlowerRefused(
            "GENQ_FLOWER_BASIC_AUTH is not set: Flower needs user:password, or --local-only for a "
            "loopback-only Flower without authentication"
        )
    # Flower adds CORS headers for any origin when this is set and auth is off.
    if os.environ.pop("FLOWER_UNAUTHENTICATED_API", None) is not None:
        log.warning("ignoring FLOWER_UNAUTHENTICATED_API: genq flower never serves an open API")

    from flower.app import Flower
    from flower.command import extract_settings, setup_logging
    from flower.options import default_options as options
    from flower.urls import settings as app_settings
    from flower.views.monitor import Metrics

    from genq.worker.celery_app import app as celery_app

    options.address = address
    options.port = port
    options.basic_auth = credentials
    options.format_task = _task_formatter(kind_lookup(settings))
    options.tasks_columns = TASK_COLUMNS
    options.purge_offline_workers = 600  # autoscaled pools come and go; forget them after 10 minutes
    extract_settings()
    setup_logging()

    class AuthenticatedMetrics(Metrics):  # type: ignore[misc]
        @tornado.web.authenticated
        async def get(self) -> None:
            await super().get()

    flower = Flower(capp=celery_app, options=options, **app_settings)
    # add_handlers rules are consulted before the ones Flower was built with.
    if local_only:
        flower.add_handlers(_NOT_LOOPBACK, [(r".*", _ForeignHost)])
    flower.add_handlers(r".*", [(r"/metrics", AuthenticatedMetrics)])
    bound = flower.start_http_server()
    log.info(
        "Flower on http://%s:%d (%s)",
        address,
        bound,
        "loopback only, no authentication" if local_only else f"basic auth, {len(credentials)} user(s)",
    )

    def _stop(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    try:
        flower.start()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        flower.stop()


class _ForeignHost(tornado.web.RequestHandler):
    """Any request naming a host other than loopback, on a local-only Flower."""

    def prepare(self) -> None:
        raise tornado.web.HTTPError(403)
