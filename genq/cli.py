"""``genq``: the command line for producers and operators."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console

from config.settings import SettingsError
from genq.errors import GenqError


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
def demo(jobs: int, images: int, concurrency: int) -> None:
    """Run a batch end to end on embedded defaults (private Redis, simulator, worker pool)."""
    from genq.demo import run_demo

    sys.exit(run_demo(jobs=jobs, images=images, concurrency=concurrency))


@main.group()
def submit() -> None:
    """Submit a job."""


@submit.command("image")
@click.option("--prompt", required=True)
@click.option("--num-images", type=int, default=1, show_default=True)
@click.option("--width", type=int, default=1024, show_default=True)
@click.option("--height", type=int, default=1024, show_default=True)
@click.option("--seed", type=int)
@click.option("--negative-prompt")
@click.option("--model-id")
@click.option("--idempotency-key", help="Resubmitting with the same key returns the first job.")
@click.option("--wait", "wait_for", is_flag=True, help="Wait for the job to finish.")
@click.option("--timeout", type=float, default=None, help="Seconds to wait at most (with --wait).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def submit_image(
    prompt: str,
    num_images: int,
    width: int,
    height: int,
    seed: int | None,
    negative_prompt: str | None,
    model_id: str | None,
    idempotency_key: str | None,
    wait_for: bool,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Generate images."""
    from genq.producer import Producer

    options = {"num_images": num_images, "width": width, "height": height, "seed": seed,
               "negative_prompt": negative_prompt, "model_id": model_id}  # fmt: skip
    producer = Producer()
    handle = producer.submit_image(
        prompt, idempotency_key=idempotency_key, **{k: v for k, v in options.items() if v is not None}
    )
    if not wait_for:
        click.echo(json.dumps({"id": handle.id, "created": handle.created}) if as_json else handle.id)
        return
    _print_record(producer.wait(handle.id, timeout=timeout), as_json)


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(job_id: str, as_json: bool) -> None:
    """Show a job's record."""
    from genq.producer import Producer

    _print_record(Producer().status(job_id), as_json)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8900, show_default=True)
@click.option("--config-json", default=None, help="Simulator settings as JSON (see simulator/config.py).")
def simulator(host: str, port: int, config_json: str | None) -> None:
    """Run the upstream API simulator (for development without an API key)."""
    from simulator.__main__ import main as simulator_main

    argv = ["--host", host, "--port", str(port)] + (["--config-json", config_json] if config_json else [])
    sys.exit(simulator_main(argv))


def _print_record(record: Any, as_json: bool) -> None:
    if as_json:
        click.echo(record.model_dump_json(indent=2))
        return
    console = Console()
    console.print(f"[bold]{record.id}[/] {record.kind.value} [bold]{record.state.value}[/]")
    for label, value in (("upstream", record.upstream_id), ("upstream status", record.upstream_status),
                         ("polls", record.polls), ("error", record.error)):  # fmt: skip
        if value:
            console.print(f"  {label}: {value}")
    for out in record.outputs:
        console.print(f"  {out.path}  {out.bytes} bytes  sha256 {out.sha256}")
