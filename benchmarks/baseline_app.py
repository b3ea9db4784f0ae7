"""The baselines as their own tiny Celery app: ``celery -A benchmarks.baseline_app worker``.

It imports nothing of genqueue's library: plain ``requests``, plain ``redis``, plain Celery tasks. The
Celery configuration is genqueue's own (``config.celeryconf.celery_config``: JSON, late acks, prefetch 1,
ignored results, task events), so a comparison measures genqueue's code, not a different Celery setup.
Settings come from ``BENCH_*`` variables (the harness sets them; there is no default Redis, so it can
never touch the one on 6379).

- ``bench.blocking``: the reference client's pattern. POST, then ``while`` not done: GET every
  ``BENCH_BLOCKING_INTERVAL`` seconds with ``time.sleep``, holding its worker slot; then download.
- ``bench.submit`` -> ``bench.poll`` (countdown re-enqueue) -> ``bench.download`` -> ``bench.finalize``:
  bare tasks of genqueue's shape, passing ids, with the same upstream calls and no ledger.
- ``bench.hold``: does nothing; sent with a long countdown to measure what a held countdown costs.
- ``bench.train_blocking``: train a model, then check it every ``interval`` seconds with ``sleep``.

Every finished job is recorded as ``ZADD bench:done <finish time> <job>``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import redis
import requests
from celery import Celery

from genq.celeryconf import celery_config
from genq.settings import Settings

DONE = "bench:done"
GETS = "bench:gets"
QUEUE_OF = {
    "bench.submit": "submit",
    "bench.poll": "poll",
    "bench.download": "download",
    "bench.finalize": "poll",
    "bench.blocking": "poll",
    "bench.hold": "poll",
    "bench.train_blocking": "training",
}


def make_app(redis_url: str | None = None, main: bool = True) -> Celery:
    """The baseline app on ``redis_url`` (default ``BENCH_REDIS_URL``), with genqueue's Celery config."""
    url = redis_url or os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:1/0")  # port 1, never 6379
    settings = Settings(redis={"url": url}, api={"base_url": "http://127.0.0.1:1"})  # type: ignore[arg-type]
    conf = celery_config(settings)
    conf["task_routes"] = {name: {"queue": q} for name, q in QUEUE_OF.items()}
    conf.pop("beat_schedule", None)
    conf["task_annotations"] = {}
    conf["worker_soft_shutdown_timeout"] = 0.0  # stopping between runs: requeue held countdowns at once
    app = Celery("bench-baseline", set_as_current=main)
    app.conf.update(conf)
    return app


def send(client: Celery, name: str, *args: Any, countdown: float | None = None) -> None:
    """Send a baseline task by name from the harness (``client`` from ``make_app(url, main=False)``)."""
    client.send_task(name, args=list(args), queue=QUEUE_OF[name], countdown=countdown)


app = make_app()


class _Process:
    """Per-process clients (rebuilt after fork)."""

    pid = 0
    redis: redis.Redis
    api: requests.Session
    files: requests.Session


def _clients() -> type[_Process]:
    if _Process.pid != os.getpid():
        _Process.redis = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])
        _Process.api = requests.Session()
        _Process.api.headers["Authorization"] = f"Bearer {os.environ.get('BENCH_API_KEY', '')}"
        _Process.files = requests.Session()
        _Process.pid = os.getpid()
    return _Process


def _api() -> str:
    return os.environ["BENCH_API_URL"]


def _post(prompt: str, path: str = "/images/generation") -> str:
    body: dict[str, Any] = {"prompt": prompt, "num_images": 1} if "images" in path else {"prompt": prompt}
    answer = _clients().api.post(_api() + path, json=body, timeout=30)
    answer.raise_for_status()
    data = answer.json()
    return str(data.get("result", data)["jobId"])


def _get(upstream_id: str) -> dict[str, Any]:
    answer = _clients().api.get(f"{_api()}/jobs/{upstream_id}", timeout=30)
    answer.raise_for_status()
    result: dict[str, Any] = answer.json()["result"]
    return result


def _fetch(url: str, dest: Path) -> int:
    dest.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    with _clients().files.get(url, stream=True, timeout=30) as response:
        response.raise_for_status()
        with open(dest, "wb") as out:
            for chunk in response.iter_content(chunk_size=256 * 1024):
                out.write(chunk)
                size += len(chunk)
    return size


def _done(job: str) -> None:
    _clients().redis.zadd(DONE, {job: time.time()})


def _outputs(result: dict[str, Any]) -> list[dict[str, str]]:
    return [*(result.get("images") or []), *(result.get("videos") or [])]


def _download_dir() -> Path:
    return Path(os.environ.get("BENCH_DOWNLOAD_DIR", "bench-downloads"))


@app.task(name="bench.blocking")
def blocking(job: str, prompt: str, interval: float) -> None:
    upstream_id = _post(prompt)
    gets = 0
    while True:
        result = _get(upstream_id)
        gets += 1
        if result["status"] in ("success", "failed"):
            break
        time.sleep(interval)
    for i, out in enumerate(_outputs(result)):
        _fetch(out["url"], _download_dir() / job / f"{i}.png")
    _clients().redis.hincrby(GETS, job, gets)
    _done(job)


@app.task(name="bench.submit")
def submit(job: str, prompt: str, countdown: float) -> None:
    upstream_id = _post(prompt)
    poll.apply_async((job, upstream_id, countdown), countdown=countdown)


@app.task(name="bench.poll")
def poll(job: str, upstream_id: str, countdown: float) -> None:
    result = _get(upstream_id)
    if result["status"] not in ("success", "failed"):
        poll.apply_async((job, upstream_id, countdown), countdown=countdown)
        return
    outputs = _outputs(result)
    for i, out in enumerate(outputs):
        download.apply_async((job, i, len(outputs), out["url"]))
    if not outputs:
        finalize.apply_async((job,))


@app.task(name="bench.download")
def download(job: str, index: int, count: int, url: str) -> None:
    _fetch(url, _download_dir() / job / f"{index}.png")
    if count == 1 or _clients().redis.hincrby(f"bench:outs:{job}", "n", 1) == count:
        finalize.apply_async((job,))


@app.task(name="bench.finalize")
def finalize(job: str) -> None:
    _done(job)


@app.task(name="bench.hold")
def hold(job: str) -> None:
    _done(job)


@app.task(name="bench.train_blocking")
def train_blocking(model_id: str, interval: float) -> None:
    clients = _clients()
    started = time.time()  # from here to the end the task holds its worker slot
    answer = clients.api.get(f"{_api()}/models/{model_id}/train", timeout=30)
    answer.raise_for_status()
    calls = 1
    while True:
        time.sleep(interval)
        result = clients.api.get(f"{_api()}/models/{model_id}", timeout=30).json()["result"]
        calls += 1
        if result["status"] in ("ready", "failed"):
            break
    clients.redis.hset(
        "bench:train",
        mapping={"calls": calls, "started_at": started, "seen_at": time.time(), "status": result["status"]},
    )
    _done(model_id)
