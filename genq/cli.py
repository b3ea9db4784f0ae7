"""``genq``: the command line for producers and operators."""

from __future__ import annotations

import functools
import json
import sys
import time
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from genq import netguard
from genq.errors import GenqError, JobFailed
from genq.settings import SettingsError

if TYPE_CHECKING:
    from genq.producer import Producer


def _fail(message: str) -> None:
    click.echo(f"genq: {message}", err=True)
    sys.exit(2)


class _Group(click.Group):
    """Turns genqueue's own errors into one readable line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (GenqError, SettingsError) as exc:
            _fail(str(exc))


@click.group(cls=_Group)
@click.version_option(package_name="genqueue")
def main() -> None:
    """genqueue: reliable work on an asynchronous AI generation API."""


@main.command()
@click.option("--jobs", default=20, show_default=True, help="Image jobs to submit.")
@click.option("--images", default=2, show_default=True, help="Images per job.")
@click.option("--concurrency", default=4, show_default=True, help="Worker processes.")
@click.option("--json", "as_json", is_flag=True, help="Print the full records as JSON (progress on stderr).")
def demo(jobs: int, images: int, concurrency: int, as_json: bool) -> None:
    """Run a batch end to end on embedded defaults (private Redis, simulator, worker pool)."""
    from genq.demo import run_demo

    sys.exit(run_demo(jobs=jobs, images=images, concurrency=concurrency, as_json=as_json))


@main.group()
def submit() -> None:
    """Submit a job."""


def _submit_options(fn: Any) -> Any:
    """The options every submit command shares; the callback ones arrive as one ``callback`` argument."""

    @functools.wraps(fn)
    def command(
        *args: Any,
        callback_task: str | None,
        callback_queue: str | None,
        callback_url: str | None,
        **kwargs: Any,
    ) -> Any:
        return fn(*args, callback=_callback(callback_task, callback_queue, callback_url), **kwargs)

    for option in reversed(
        [
            click.option("--idempotency-key", help="Resubmitting with the same key returns the first job."),
            click.option("--wait", "wait_for", is_flag=True, help="Wait for the job to finish."),
            click.option(
                "--timeout", type=float, default=None, help="Seconds to wait at most (with --wait)."
            ),
            click.option("--json", "as_json", is_flag=True, help="Print JSON."),
            click.option("--callback-task", help="When the job ends, send this Celery task by name..."),
            click.option("--callback-queue", help="...to this queue, with the job's record."),
            click.option("--callback-url", help="Or POST the record, signed, to this URL."),
            click.option("--producer", help="The producer app it counts against (default: 'default')."),
            click.option(
                "--lane",
                type=click.Choice(["interactive", "batch"]),
                help="Its lane (default: the producer's).",
            ),
            click.option(
                "--on-budget",
                type=click.Choice(["reject", "wait"]),
                help="Past a spend budget: end rejected, or wait for the next window.",
            ),
        ]
    ):
        command = option(command)
    return command


def _callback(task: str | None, queue: str | None, url: str | None) -> dict[str, str] | None:
    if url and (task or queue):
        _fail("give either --callback-url or --callback-task with --callback-queue, not both")
    if url:
        return {"url": url}
    if task or queue:
        if not (task and queue):
            _fail("--callback-task and --callback-queue go together")
        return {"task": str(task), "queue": str(queue)}
    return None


def _submit(
    request: dict[str, Any], idempotency_key: str | None, wait_for: bool, timeout: float | None, as_json: bool
) -> None:
    producer = _producer()
    handle = producer.submit({k: v for k, v in request.items() if v is not None}, idempotency_key)
    if not wait_for:
        click.echo(json.dumps({"id": handle.id, "created": handle.created}) if as_json else handle.id)
        return
    try:
        record = producer.wait(handle.id, timeout=timeout)
    except JobFailed:
        record = producer.status(handle.id)
        _print_record(record, as_json)
        sys.exit(1)
    _print_record(record, as_json)


@submit.command("image")
@click.option("--prompt", required=True)
@click.option("--num-images", type=int, default=1, show_default=True)
@click.option("--width", type=int, default=1024, show_default=True)
@click.option("--height", type=int, default=1024, show_default=True)
@click.option("--seed", type=int)
@click.option("--negative-prompt")
@click.option("--model-id", help="A trained model; waits (parked) while it is still training.")
@_submit_options
def submit_image(
    idempotency_key: str | None, wait_for: bool, timeout: float | None, as_json: bool, **options: Any
) -> None:
    """Generate images."""
    _submit({"kind": "image", **options}, idempotency_key, wait_for, timeout, as_json)


@submit.command("upscale")
@click.option("--image-id", help="An upstream image id.")
@click.option("--image-url", help="Or an http(s) URL of the image.")
@click.option("--source-job", help="Or an earlier genqueue job whose output to upscale.")
@click.option("--index", type=int, default=0, show_default=True, help="Which output of --source-job.")
@click.option("--factor", type=click.Choice(["2", "4"]), default="2", show_default=True)
@_submit_options
def submit_upscale(
    image_id: str | None,
    image_url: str | None,
    source_job: str | None,
    index: int,
    factor: str,
    callback: dict[str, str] | None,
    idempotency_key: str | None,
    wait_for: bool,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Upscale an image."""
    if source_job:
        image_id = _producer()._output_id(source_job, index)
    request = {"kind": "upscale", "image_id": image_id, "image_url": image_url, "factor": int(factor),
               "callback": callback}  # fmt: skip
    _submit(request, idempotency_key, wait_for, timeout, as_json)


@submit.command("video")
@click.option("--prompt")
@click.option("--image-id", help="A source image (upstream id).")
@click.option("--image-url", help="Or a source image URL.")
@click.option("--duration", type=float, default=5.0, show_default=True, help="Seconds of video.")
@click.option("--seed", type=int)
@click.option("--model-id")
@_submit_options
def submit_video(
    idempotency_key: str | None, wait_for: bool, timeout: float | None, as_json: bool, **options: Any
) -> None:
    """Generate a video from a prompt and/or an image."""
    _submit({"kind": "video", **options}, idempotency_key, wait_for, timeout, as_json)


@submit.command("workflow")
@click.option("--prompt", required=True)
@click.option("--num-images", type=int, default=1, show_default=True)
@click.option("--upscale-factor", type=click.Choice(["2", "4"]), default="2", show_default=True)
@_submit_options
def submit_workflow(
    prompt: str,
    num_images: int,
    upscale_factor: str,
    callback: dict[str, str] | None,
    idempotency_key: str | None,
    wait_for: bool,
    timeout: float | None,
    as_json: bool,
    **routing: str | None,
) -> None:
    """Generate images, then upscale every one (one id to follow)."""
    request = {"kind": "workflow", "generate": {"prompt": prompt, "num_images": num_images},
               "upscale_factor": int(upscale_factor), "callback": callback, **routing}  # fmt: skip
    _submit(request, idempotency_key, wait_for, timeout, as_json)


@main.command()
@click.argument("model_id")
@click.option("--force", is_flag=True, help="Train again even if the model is ready.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def train(model_id: str, force: bool, as_json: bool) -> None:
    """Start training a model (once, however often it is asked)."""
    _print_model(_producer().train_model(model_id, force=force), as_json)


@main.command()
@click.argument("model_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(model_id: str | None, as_json: bool) -> None:
    """List models, or show one with its history."""
    producer = _producer()
    if model_id:
        _print_model(producer.model_status(model_id), as_json)
        return
    records = producer.list_models()
    if as_json:
        click.echo(json.dumps([m.model_dump(mode="json", exclude={"history"}) for m in records], indent=2))
        return
    table = Table("model", "state", "checks", "parked", "error")
    for m in records:
        table.add_row(m.id, m.state.value, str(m.checks), str(m.parked), m.error or "")
    Console().print(table)


@main.command()
@click.option("--state", multiple=True, help="Only jobs in this state (repeatable).")
@click.option("--kind", multiple=True, help="Only jobs of this kind (repeatable).")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def jobs(state: tuple[str, ...], kind: tuple[str, ...], limit: int, as_json: bool) -> None:
    """List recent jobs, newest first."""
    records = _producer().list_jobs(state=state or None, kind=kind or None, limit=limit)
    if as_json:
        click.echo(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
        return
    table = Table("job", "kind", "state", "upstream", "files", "error")
    for r in records:
        table.add_row(
            r.id, r.kind.value, r.state.value, r.upstream_id or "", str(len(r.outputs)), r.error or ""
        )
    Console().print(table)


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cancel(job_id: str, as_json: bool) -> None:
    """Cancel a job (a workflow with all its steps); no upstream call is made for it afterwards."""
    producer = _producer()
    changed = producer.cancel(job_id)
    record = producer.status(job_id)
    if as_json:
        click.echo(json.dumps({"id": job_id, "cancelled": changed, "state": record.state.value}))
    else:
        click.echo(f"{job_id} {'cancelled' if changed else 'already ' + record.state.value}")


@main.command()
@click.argument("job_id")
def resubmit(job_id: str) -> None:
    """Submit again a job that ended submit_unknown (check upstream first: this may pay twice)."""
    producer = _producer()
    if producer.resubmit(job_id):
        click.echo(f"{job_id} pending again")
    else:
        _fail(f"job {job_id} is {producer.status(job_id).state.value}, not submit_unknown")


@main.command()
@click.argument("job_ids", nargs=-1)
@click.option("--timeout", type=float, default=None, help="Stop after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per state change.")
def watch(job_ids: tuple[str, ...], timeout: float | None, as_json: bool) -> None:
    """Follow state changes live: of the given jobs (until they end), or of every job."""
    from genq.watch import watch_jobs

    watch_jobs(_producer(), list(job_ids) or None, timeout=timeout, as_json=as_json)


@main.command()
@click.option("--producer", "producer_id", help="Only this producer (and the total).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def budgets(producer_id: str | None, as_json: bool) -> None:
    """Spend against each budget cap (this hour, today), and jobs in flight against each quota."""
    from genq.budgets import BudgetBook

    producer = _producer()
    book = BudgetBook(producer.redis, producer.settings.budgets)
    now = producer.ledger.clock()
    total, usage = book.report(now)
    if producer_id:
        usage = [book.usage(producer_id, now)]
    if as_json:
        payload = {"total": [t.model_dump() for t in total], "producers": [u.model_dump() for u in usage]}
        click.echo(json.dumps(payload, indent=2))
        return
    table = Table("producer", "lane", "in flight", "window", "triggers", "cost", "left", "resets")
    rows = [("total", "", "", total)] + [
        (u.producer, u.lane, _of(u.in_flight, u.max_in_flight), u.windows) for u in usage
    ]
    for name, lane, flight, windows in rows:
        for i, w in enumerate(windows):
            left = [f"{w.triggers_left} triggers"] if w.triggers_left is not None else []
            left += [f"{w.cost_left:g} cost"] if w.cost_left is not None else []
            table.add_row(
                name if i == 0 else "",
                lane if i == 0 else "",
                flight if i == 0 else "",
                w.period,
                _of(w.triggers, w.triggers_cap),
                _of(w.cost, w.cost_cap),
                ", ".join(left) or "no cap",
                time.strftime("%H:%M", time.localtime(w.window_end)),
            )
    Console().print(table)


def _of(used: float, cap: float | None) -> str:
    return f"{used:g}" if cap is None else f"{used:g} / {cap:g}"


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(job_id: str, as_json: bool) -> None:
    """Show a job's record."""
    _print_record(_producer().status(job_id), as_json)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8900, show_default=True)
@click.option("--config-json", default=None, help="Simulator settings as JSON (see simulator/config.py).")
def simulator(host: str, port: int, config_json: str | None) -> None:
    """Run the upstream API simulator (for development without an API key)."""
    from genq.simulator.__main__ import main as simulator_main

    argv = ["--host", host, "--port", str(port)] + (["--config-json", config_json] if config_json else [])
    sys.exit(simulator_main(argv))


@main.command()
@click.option("--local-only", is_flag=True, help="No authentication; listens on 127.0.0.1 only.")
@click.option("--address", default=None, help="Listen address [GENQ_FLOWER_ADDRESS, 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Listen port [GENQ_FLOWER_PORT, 5555].")
def flower(local_only: bool, address: str | None, port: int | None) -> None:
    """Run Flower on the genqueue app: basic auth from GENQ_FLOWER_BASIC_AUTH (required unless
    --local-only), /metrics behind the same auth, task arguments shown as job id and kind."""
    from genq import logs
    from genq.settings import get_settings

    settings = get_settings()  # before importing workers, which would exit on bad settings
    logs.setup(settings.log.format)
    from genq.worker.flower import serve

    default = "127.0.0.1" if local_only else settings.flower.address
    serve(
        settings,
        local_only=local_only,
        address=address if address is not None else default,
        port=port if port is not None else settings.flower.port,
    )


@main.command()
@click.option("--local-only", is_flag=True, help="No authentication; listens on 127.0.0.1 only.")
@click.option("--address", default=None, help="Listen address [GENQ_DASHBOARD_ADDRESS, 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Listen port [GENQ_DASHBOARD_PORT, 8950].")
def dashboard(local_only: bool, address: str | None, port: int | None) -> None:
    """Serve the job dashboard: every job live, one job's timeline, outputs, models, health plots,
    cancel and resubmit. Basic auth from GENQ_DASHBOARD_BASIC_AUTH (required unless --local-only)."""
    from genq import logs
    from genq.dashboard.app import load_dashboard_settings, serve
    from genq.settings import get_settings

    settings = get_settings()
    config = load_dashboard_settings()
    logs.setup(settings.log.format)
    default = "127.0.0.1" if local_only else config.address
    serve(
        settings,
        config,
        local_only=local_only,
        address=address if address is not None else default,
        port=port if port is not None else config.port,
    )


@main.command()
@click.option("--address", default=None, help="Listen address [GENQ_METRICS_ADDRESS, 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Listen port [GENQ_METRICS_PORT, 9818].")
@click.option("--once", is_flag=True, help="Print the metrics once and exit instead of serving them.")
def metrics(address: str | None, port: int | None, once: bool) -> None:
    """Serve Prometheus metrics Flower lacks: jobs by kind and state, due polls, queue depth and age,
    upstream latency and errors, rate-limit waits, downloads, models."""
    from prometheus_client import generate_latest

    from genq import exporter, logs
    from genq.settings import get_settings

    settings = get_settings()
    logs.setup(settings.log.format)
    if once:
        click.echo(generate_latest(exporter.registry(settings)).decode(), nl=False)
        return
    exporter.serve(
        settings,
        address if address is not None else settings.metrics.address,
        port if port is not None else settings.metrics.port,
    )


@main.command()
@click.option(
    "--skip",
    multiple=True,
    type=click.Choice(["redis", "broker", "workers", "sweeper"]),
    help="Leave a check out (repeatable).",
)
@click.option("--queue", "queues", multiple=True, help="Only these queues need a live worker (repeatable).")
@click.option("--node", help="This worker must answer, e.g. submit@%h (%h: this host's name).")
@click.option("--url", "urls", multiple=True, help="This HTTP endpoint must answer 2xx (repeatable).")
@click.option("--timeout", type=float, default=3.0, show_default=True, help="Seconds per check.")
@click.option("--sweep-max-age", type=float, default=None, help="Seconds [5 sweep intervals, at least 60].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def health(
    skip: tuple[str, ...],
    queues: tuple[str, ...],
    node: str | None,
    urls: tuple[str, ...],
    timeout: float,
    sweep_max_age: float | None,
    as_json: bool,
) -> None:
    """Check Redis, the broker, a live worker per queue and the sweeper's last run; exit 1 with the
    reason when any fails (a container healthcheck)."""
    import socket

    from celery import Celery

    from genq import health as checks
    from genq.celeryconf import celery_config
    from genq.settings import get_settings

    settings = get_settings()
    app = Celery("genqueue-health", set_as_current=False)  # a producer's view: broker only, no tasks
    app.conf.update(celery_config(settings))
    try:
        results = checks.run(
            settings,
            app,
            skip=skip,
            queues=queues or None,
            node=node.replace("%h", socket.gethostname()) if node else None,
            urls=urls,
            timeout=timeout,
            sweep_max_age=sweep_max_age,
        )
    finally:
        app.close()
    if as_json:
        click.echo(json.dumps([c.as_dict() for c in results], indent=2))
    else:
        for c in results:
            click.echo(f"{'ok  ' if c.ok else 'FAIL'} {c.name:8} {c.detail}")
    if not all(c.ok for c in results):
        sys.exit(1)


@main.command()
def schema() -> None:
    """Print the JSON Schema of requests, as the by-name ``genq.intake`` task accepts them."""
    from genq.schemas import REQUEST_ADAPTER

    click.echo(json.dumps(REQUEST_ADAPTER.json_schema(), indent=2))


def _producer() -> Producer:
    from genq.producer import Producer

    return Producer()


def _print_model(record: Any, as_json: bool) -> None:
    if as_json:
        click.echo(record.model_dump_json(indent=2))
        return
    console = Console()
    console.print(
        f"[bold]{record.id}[/] [bold]{record.state.value}[/]  "
        f"checks {record.checks}, parked jobs {record.parked}"
    )
    if record.error:
        console.print(f"  error: {record.error}")
    for entry in record.history:
        when = time.strftime("%H:%M:%S", time.localtime(entry["at"]))
        console.print(f"  {when} {entry['event']} {entry.get('detail') or ''}")


def _print_record(record: Any, as_json: bool) -> None:
    if as_json:
        click.echo(record.model_dump_json(indent=2))
        return
    console = Console()
    console.print(f"[bold]{record.id}[/] {record.kind.value} [bold]{record.state.value}[/]")
    console.print(f"  producer: {record.producer}, lane {record.lane.value}")
    for label, value in (("upstream", record.upstream_id), ("upstream status", record.upstream_status),
                         ("polls", record.polls), ("model", record.model_id), ("workflow", record.parent_id),
                         ("steps", ", ".join(record.children)), ("error", record.error)):  # fmt: skip
        if value:
            console.print(f"  {label}: {value}")
    for out in record.outputs:
        console.print(f"  {out.path}  {out.bytes} bytes  sha256 {out.sha256}")
    if record.callback:
        target = (
            record.callback.get("url")
            or f"task {record.callback.get('task')} on {record.callback.get('queue')}"
        )
        shown = netguard.redact_url(target) if "url" in record.callback else target
        state = record.callback_state or "waiting for the job to end"
        console.print(f"  callback: {shown}: {state}, {record.callback_attempts} attempts")
        if record.callback_error:
            console.print(f"    last error: {record.callback_error}")
