"""``genq demo``: the whole system on embedded defaults, in one command.

Starts what is not configured (a private Redis unless ``GENQ_REDIS_URL`` is set; the simulator
unless ``GENQ_API_BASE_URL`` is set), a worker pool, submits a batch of image jobs, shows live
progress and ends with a table of every job. Everything it started is stopped on the way out.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table

from genq.celeryconf import QUEUES
from genq.embedded import EmbeddedRedis
from genq.processes import WorkerProcess
from genq.schemas import JobRecord, JobState, OutputFile
from genq.settings import load_settings
from genq.watch import JobBoard

if TYPE_CHECKING:
    from genq.producer import Producer
    from genq.simulator import SimulatorProcess

PROMPTS = [
    "a lighthouse at dawn", "a fox in fresh snow", "a city of glass", "a bowl of ramen, top view",
    "an origami crane", "a desert storm", "a koi pond", "a cabin in a pine forest",
]  # fmt: skip
DEMO_POLL = '{"first_delay": 1, "interval": 1, "backoff": 1.2, "max_interval": 3, "deadline": 180}'
# The simulator trains in seconds, so the demo checks every second instead of every 5 minutes.
DEMO_MODEL_POLL = '{"first_delay": 1, "interval": 1, "max_interval": 1, "deadline": 120}'
DEMO_MODEL = "demo-model"


@contextlib.contextmanager
def demo_environment(
    workdir: Path, console: Console
) -> Iterator[tuple[dict[str, str], SimulatorProcess | None]]:
    """The GENQ_* environment for the demo, starting Redis and the simulator where none is configured."""
    env = dict(os.environ)
    sim: SimulatorProcess | None = None
    with contextlib.ExitStack() as stack:
        if "GENQ_REDIS_URL" not in env:
            redis_server = stack.enter_context(EmbeddedRedis(data_dir=workdir / "redis"))
            env["GENQ_REDIS_URL"] = redis_server.url
            console.print(f"[dim]private Redis on port {redis_server.port} ({redis_server.binary})[/]")
        if "GENQ_API_BASE_URL" not in env:
            from genq.simulator import SimConfig, start_simulator
            from genq.simulator.config import Duration

            sim = stack.enter_context(
                start_simulator(
                    SimConfig(
                        duration=Duration(kind="lognormal", median=3, sigma=0.5, max=10),
                        video_duration=Duration(value=4),
                        video_bytes=2_000_000,
                        training_duration=4,
                    )
                )
            )
            # The simulator serves its files over plain http from 127.0.0.1: allowed for this run only.
            env.update(
                GENQ_API_BASE_URL=sim.url,
                GENQ_API_KEY=sim.api_key,
                GENQ_DOWNLOAD_ALLOW_HTTP="true",
                GENQ_DOWNLOAD_ALLOW_PRIVATE="true",
            )
            for kind in ("IMAGE", "UPSCALE", "VIDEO"):
                env.setdefault(f"GENQ_POLL_{kind}", DEMO_POLL)
            env.setdefault("GENQ_POLL_MODEL", DEMO_MODEL_POLL)
            console.print(f"[dim]simulator at {sim.url}[/]")
        env.setdefault("GENQ_DOWNLOAD_DIR", str(Path("downloads").resolve()))
        yield env, sim


def run_demo(
    jobs: int = 20,
    images: int = 2,
    concurrency: int = 4,
    console: Console | None = None,
    as_json: bool = False,
) -> int:
    """Run the demo; returns the process exit code (0 when every job succeeded).

    With ``as_json`` the progress goes to stderr and stdout gets only :func:`report` as JSON."""
    console = console or Console(stderr=as_json)
    with (
        tempfile.TemporaryDirectory(prefix="genq-demo-") as tmp,
        demo_environment(Path(tmp), console) as (env, sim),
    ):
        os.environ.update(env)  # this process is the producer; it reads the same settings as the workers
        settings = load_settings()
        from genq.producer import Producer

        with WorkerProcess(env, concurrency=concurrency, log_path=Path(tmp) / "worker.log") as worker:
            console.print(
                f"[dim]worker pool {worker.name}: {concurrency} processes, queues {','.join(QUEUES)}[/]"
            )
            producer = Producer(settings)
            started = time.monotonic()
            ids = _submit_batch(producer, jobs, images, console)
            records = _show_progress(producer, ids, console, timeout=settings.poll.image.deadline + 60)
            elapsed = time.monotonic() - started
        truth = _simulator_checksums(sim, producer, records) if sim else None
        producer.close()
    summary = report(records, truth, elapsed)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        console.print(table(records, truth))
        for line in reasons(records):
            console.print(line, style="red", markup=False, highlight=False)
        ok, files = summary["succeeded"], summary["files"]
        console.print(f"{ok}/{len(records)} jobs succeeded, {files} files, in {elapsed:.1f}s")
    return 0 if summary["succeeded"] == len(records) else 1


def _submit_batch(producer: Producer, jobs: int, images: int, console: Console) -> list[str]:
    """Every kind of work: image jobs, a video, a generate-then-upscale workflow, and a model
    training with a generation parked on it until it is ready."""
    ids = [
        producer.submit_image(
            f"{PROMPTS[i % len(PROMPTS)]} #{i}", num_images=images, width=512, height=512
        ).id
        for i in range(jobs)
    ]
    ids.append(producer.submit_video("waves on a pebble beach", duration=4).id)
    ids.append(producer.submit_workflow("a paper boat", num_images=2, upscale_factor=2).id)
    model = producer.train_model(DEMO_MODEL, force=True)
    parked = producer.submit_image("a portrait in the trained style", model_id=DEMO_MODEL)
    console.print(
        f"[dim]training {DEMO_MODEL} ({model.state.value}); job {parked.id[:8]} is "
        f"{parked.status().state.value} until it is ready[/]"
    )
    return [*ids, parked.id]


def _show_progress(producer: Producer, ids: list[str], console: Console, timeout: float) -> list[JobRecord]:
    records: dict[str, JobRecord] = {}
    deadline = time.monotonic() + timeout
    with JobBoard(console, total=len(ids)) as board:
        while time.monotonic() < deadline:
            for job_id in ids:
                records[job_id] = producer.status(job_id)
                board.show(records[job_id])
            if all(r.terminal for r in records.values()):
                break
            time.sleep(0.2)
    return [records[i] for i in ids]


def _simulator_checksums(sim: SimulatorProcess, producer: Producer, records: list[JobRecord]) -> set[str]:
    """sha256 of every file the simulator served, to show each download is byte-exact."""
    sums: set[str] = set()
    steps = [producer.status(child) for record in records for child in record.children]
    for record in [*records, *steps]:
        if record.upstream_id:
            sums.update(out["sha256"] for out in sim.job(record.upstream_id).get("outputs", []))
    return sums


def report(records: list[JobRecord], truth: set[str] | None, elapsed: float) -> dict[str, Any]:
    """Everything the demo found, in full: what ``genq demo --json`` prints. Each output carries
    ``matches_upstream`` (null when the upstream's checksums are unknown: not the simulator)."""
    jobs = []
    for record in records:
        job = record.model_dump(mode="json")
        for out in job["outputs"]:
            out["matches_upstream"] = None if truth is None else out["sha256"] in truth
        jobs.append(job)
    return {
        "succeeded": sum(r.state is JobState.SUCCEEDED for r in records),
        "jobs_total": len(records),
        "files": sum(len(r.outputs) for r in records),
        "elapsed_seconds": round(elapsed, 3),
        "jobs": jobs,
    }


ID_CHARS = 8
DIGEST_CHARS = 12
FILE_CHARS = ID_CHARS + 7  # <step id>/00.png


def table(records: list[JobRecord], truth: set[str] | None) -> Table:
    """One line per file (or per job without files) that fits an 80-column terminal: short ids, digest
    prefixes, file names (``<step>/<name>`` for a workflow's files, which its steps downloaded). Nothing
    wraps: a long reason is cut with an ellipsis (:func:`reasons` has it whole; ``--json`` everything)."""
    table = Table(
        title="genqueue demo: every job",
        caption="full ids, paths and digests: genq demo --json",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=0,
    )
    # The widest row: 8 + 8 + 14 (submit_unknown) + 8 + 15 + 12 + 5 + 6 one-space gaps = 76 columns.
    columns = ["job", "kind", "state", "upstream", "file", "sha256"] + (
        ["check"] if truth is not None else []
    )
    for name in columns:
        table.add_column(
            name, no_wrap=True, overflow="ellipsis", max_width=FILE_CHARS if name == "file" else None
        )
    for record in records:
        colour = "green" if record.state is JobState.SUCCEEDED else "red"
        upstream = (record.upstream_id or "")[:ID_CHARS] or (
            f"{len(record.children)} steps" if record.children else "-"
        )
        head = [record.id[:ID_CHARS], record.kind.value, f"[{colour}]{record.state.value}[/]", upstream]
        check: list[str] = ["-"] if truth is not None else []
        if not record.outputs:
            table.add_row(*head, record.error or "-", "-", *check)
        for n, out in enumerate(record.outputs):
            if truth is not None:
                check = ["[green]yes[/]" if out.sha256 in truth else "[red]NO[/]"]
            shown = head if n == 0 else [""] * len(head)
            table.add_row(*shown, _file_name(record, out), out.sha256[:DIGEST_CHARS], *check)
    return table


def _file_name(record: JobRecord, out: OutputFile) -> str:
    """The file's name; under another job's directory (a workflow's step), ``<step id>/<name>``."""
    path = Path(out.path)
    return path.name if path.parent.name == record.id else f"{path.parent.name[:ID_CHARS]}/{path.name}"


def reasons(records: list[JobRecord]) -> list[str]:
    """One line per job that did not succeed, with its whole reason."""
    return [
        f"{r.id[:ID_CHARS]} {r.state.value}: {r.error or 'no reason recorded'}"
        for r in records
        if r.state is not JobState.SUCCEEDED
    ]
