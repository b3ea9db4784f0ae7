"""8. Dashboard: the jobs page's latency with 100,000 jobs in the ledger, and the live stream's rate.

A private Redis is filled with 100,000 job records (5,000 in quick), written by the ledger's own create
script, then moved by hand to a realistic mix of states (80% succeeded with one output, 8% failed, the
rest in flight). ``genq dashboard`` runs as its own process with basic auth; answers are timed over HTTP
from this process (requests, one connection):

- the first page of ``/api/jobs`` (50 rows, newest first), a deep page (offset 50,000), a filtered page
  (``state=failed``, which scans), a filter nothing matches (``kind=video``: one request scans its
  budget, 10,000 ids or 50 ms of reading, and answers with a cursor), a lookup by id and
  ``/api/counts``, 40 times each (10 quick);
- baseline: the reader ``genq jobs`` uses (``Ledger.list_records``, in-process, no HTTP) for the same
  first page and the same filter.

The live stream: one SSE client on ``/events`` while this process makes real ledger transitions at 200
per second for 10 s (2 s quick), then as fast as one thread can for 5 s (1 s quick); reported: events
delivered of those made, the delivered rate, and the lag from each transition's time to its arrival at
the client.

Also runnable alone: ``python -m benchmarks.b8_dashboard [--quick]`` prints the JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis
import requests

from benchmarks import harness
from benchmarks.context import Context
from benchmarks.result import BenchResult, ChartItem, Row
from benchmarks.stats import Goal, ratio, summary
from genq import keys
from genq.embedded import free_port
from genq.ledger import Ledger, to_field
from genq.schemas import JobState

NAME = "dashboard"
PAGE_GOAL_MS = 200.0
STREAM_GOAL = 200.0
REPEAT = 40
AUTH = ("bench", "bench-pw-31c7")


def _fill(client: redis.Redis, n: int, log: Any) -> dict[str, list[str]]:
    """``n`` jobs created by the ledger's create script (pipelined), then moved to a mix of states by
    plain writes (with the per-state counts kept right). Returns ids by state."""
    ledger = Ledger(client)
    script = ledger._create  # the very script Ledger.create runs, pipelined for speed
    now = float(client.time()[0])
    ids = [uuid.uuid4().hex for _ in range(n)]
    by_state: dict[str, list[str]] = {"succeeded": [], "failed": [], "pending": [], "running": []}
    for start in range(0, n, 2000):
        pipe = client.pipeline(transaction=False)
        for i, job_id in enumerate(ids[start : start + 2000], start):
            at = now - (n - i) * 0.01  # creation order = index order
            fields = {"id": job_id, "kind": "image", "request": {"prompt": f"a fox #{i}", "num_images": 1},
                      "created_at": at, "updated_at": at, "expected_outputs": 1, "poll_gen": 0}  # fmt: skip
            args: list[Any] = [job_id, "image", at, at + 30, keys.EVENTS_MAXLEN, 86400, ""]
            for name, value in fields.items():
                args += [name, to_field(value)]
            script(keys=[keys.job(job_id), keys.EVENTS, keys.JOBS, keys.DUE, keys.COUNTS, "", "", ""],
                   args=args, client=pipe)  # fmt: skip
        pipe.execute()
        pipe = client.pipeline(transaction=False)
        for i, job_id in enumerate(ids[start : start + 2000], start):
            r = i % 100
            state = "succeeded" if r < 80 else "failed" if r < 88 else "running" if r < 96 else "pending"
            by_state[state].append(job_id)
            if state == "pending":
                continue
            extra: dict[str, str] = {"state": state, "upstream_id": f"up-{i}", "polls": "3"}
            if state == "succeeded":
                out = {"index": 0, "remote_id": f"img-{i}", "path": f"/nowhere/{job_id}/0.png", "bytes": 1000,
                       "sha256": "0" * 64, "content_type": "image/png"}  # fmt: skip
                extra["out:0000"] = json.dumps(out)
            if state == "failed":
                extra["error"] = "upstream job failed: simulated"
            pipe.hset(keys.job(job_id), mapping=extra)
            pipe.hincrby(keys.COUNTS, f"image:pending>{state}", 1)  # one count per move, as the ledger's
        pipe.execute()
        if start % 20000 == 0:
            log(f"{NAME}: {start + 2000:,} of {n:,} jobs written")
    return by_state


def _time(session: requests.Session, url: str, repeat: int = REPEAT) -> dict[str, Any]:
    times = []
    rows = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        answer = session.get(url, timeout=30)
        answer.raise_for_status()
        body = answer.json()
        times.append((time.perf_counter() - t0) * 1000)
        rows = len(body.get("jobs", [])) if isinstance(body, dict) else 0
    return {**summary(times), "rows": rows}


def _in_process(fn: Any, repeat: int = REPEAT) -> dict[str, Any]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return summary(times)


def _stream(url: str, ledger: Ledger, jobs: list[str], rate: float | None, seconds: float) -> dict[str, Any]:
    """Transitions made at ``rate`` per second (None: as fast as one thread can) while an SSE client
    counts what arrives and when. Each job of ``jobs`` goes pending -> submitting -> pending ..., so a
    pool of a few hundred jobs makes any number of real transitions."""
    arrived: dict[str, float] = {}
    made_at: dict[str, float] = {}
    job_of: dict[str, str] = {}
    stop = threading.Event()
    ready = threading.Event()

    def listen() -> None:
        with requests.get(url + "/events", auth=AUTH, stream=True, timeout=(5, 30)) as answer:
            ready.set()
            for line in answer.iter_lines():
                if line.startswith(b"data: "):
                    now = time.time()
                    for e in json.loads(line[6:]):
                        if "job" in e:
                            # arrived last: the main thread reads the others for what arrived
                            job_of[e["id"]] = e["job"]
                            made_at[e["id"]] = e["at"]
                            arrived[e["id"]] = now
                if stop.is_set():
                    return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    ready.wait(10)
    state = dict.fromkeys(jobs, JobState.PENDING)

    def move(job_id: str) -> bool:
        to = JobState.SUBMITTING if state[job_id] is JobState.PENDING else JobState.PENDING
        moved = ledger.transition(job_id, [state[job_id]], to)
        if moved.ok:
            state[job_id] = to
        elif moved.previous is not None:
            state[job_id] = moved.previous  # left in the other state by an earlier run
        return moved.ok

    # The dashboard tails from the stream's end: a transition that arrives shows it is tailing (a fixed
    # pause would only guess). The probe job is not one of those counted.
    probe, jobs = jobs[0], jobs[1:]
    deadline = time.monotonic() + 10
    while not arrived and time.monotonic() < deadline:
        move(probe)
        harness.wait_until(lambda: bool(arrived), timeout=0.5, interval=0.01)
    made = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if rate is not None:
            pause = t0 + made / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        if move(jobs[made % len(jobs)]):
            made += 1
    elapsed = time.monotonic() - t0

    def counted() -> list[str]:
        return [i for i in list(arrived) if job_of.get(i) != probe]

    harness.wait_until(lambda: len(counted()) >= made, timeout=15, interval=0.02)
    stop.set()
    ids = counted()
    lags = [(arrived[i] - made_at[i]) * 1000 for i in ids]
    return {
        "made": made,
        "made_per_s": made / elapsed,
        "delivered": len(ids),
        "delivered_per_s": len(ids) / elapsed,
        "lag_ms": summary(lags),
    }


def measure(
    workdir: Path,
    n: int,
    stream_seconds: float,
    log: Any,
    repeat: int = REPEAT,
    flat_out_seconds: float = 5.0,
) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    server = harness.TrackedRedis(data_dir=workdir / "redis").start()
    try:
        client = redis.Redis.from_url(server.url)
        t0 = time.monotonic()
        by_state = _fill(client, n, log)
        fill_s = time.monotonic() - t0
        # Started after the fill: its live hub tails the event stream from the end, as on a ledger
        # that has been running, instead of relaying the fill's events while pages are timed.
        log(f"{NAME}: {n:,} jobs in {fill_s:.1f}s; starting genq dashboard")
        port = free_port()
        env = {**os.environ, "GENQ_REDIS_URL": server.url, "GENQ_DOWNLOAD_DIR": str(workdir / "downloads"),
               "GENQ_DASHBOARD_BASIC_AUTH": ":".join(AUTH)}  # fmt: skip
        log_file = open(workdir / "dashboard.log", "wb")  # noqa: SIM115 - closed below
        command = [str(Path(sys.executable).parent / "genq"), "dashboard", "--port", str(port)]
        proc = subprocess.Popen(command, env=env, cwd=workdir, stdout=log_file, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            session = requests.Session()
            session.auth = AUTH
            deadline = time.monotonic() + 30
            while True:
                try:
                    session.get(url + "/api/counts", timeout=5).raise_for_status()
                    break
                except requests.RequestException:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError((workdir / "dashboard.log").read_text()) from None
                    time.sleep(0.05)
            some_id = by_state["failed"][len(by_state["failed"]) // 2]
            pages = {
                "first_page": _time(session, url + "/api/jobs?limit=50", repeat),
                "deep_page": _time(session, url + f"/api/jobs?limit=50&offset={n // 2}", repeat),
                "failed_filter": _time(session, url + "/api/jobs?limit=50&state=failed", repeat),
                "no_match_filter": _time(session, url + "/api/jobs?limit=50&kind=video", repeat),
                "by_id": _time(session, url + f"/api/jobs?id={some_id}", repeat),
                "counts": _time(session, url + "/api/counts", repeat),
                "html": {**summary(_html_times(session, url, repeat)), "rows": 0},
            }
            ledger = Ledger(client)
            base = {
                "first_page": _in_process(lambda: ledger.list_records(limit=50), repeat),
                "failed_filter": _in_process(
                    lambda: ledger.list_records(states={JobState.FAILED}, limit=50), repeat
                ),
            }
            log(f"{NAME}: jobs page p95 {pages['first_page']['p95']:.1f} ms; live stream at 200/s")
            pool = by_state["pending"][:500]
            paced = _stream(url, ledger, pool, STREAM_GOAL, stream_seconds)
            log(f"{NAME}: paced {paced['delivered']}/{paced['made']}; now as fast as one thread can")
            flat_out = _stream(url, ledger, pool, None, flat_out_seconds)
        finally:
            proc.terminate()
            proc.wait(10)
            log_file.close()
        return {"jobs": n, "fill_s": fill_s, "pages_ms": pages, "baseline_ms": base, "stream_paced": paced,
                "stream_flat_out": flat_out}  # fmt: skip
    finally:
        server.close()


def _html_times(session: requests.Session, url: str, repeat: int = REPEAT) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        session.get(url + "/", timeout=30).raise_for_status()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def run(ctx: Context) -> BenchResult:
    n = ctx.size(5_000, 100_000)
    repeat = ctx.size(10, REPEAT)
    flat_out_s = ctx.size(1.0, 5.0)
    figures = measure(ctx.workdir / NAME, n, ctx.size(2.0, 10.0), ctx.log, repeat, flat_out_s)
    result = BenchResult(NAME, f"Dashboard: jobs page with {n:,} jobs, live stream at 200/s")
    result.size = {"jobs": n, "repeat": repeat, "flat_out_s": flat_out_s}
    result.figures = figures
    result.baseline = figures["baseline_ms"]
    pages, base = figures["pages_ms"], figures["baseline_ms"]
    paced = figures["stream_paced"]
    m1 = result.check(Goal("jobs page p95 under 200 ms", "first page p95 (ms)", "<=", PAGE_GOAL_MS),
                      pages["first_page"]["p95"])  # fmt: skip
    m2 = result.check(Goal("filtered page p95 under 200 ms", "failed filter p95 (ms)", "<=", PAGE_GOAL_MS),
                      pages["failed_filter"]["p95"])  # fmt: skip
    delivered = paced["delivered"] / paced["made"] if paced["made"] else None
    m3 = result.check(Goal("every event of 200/s delivered", "delivered fraction", ">=", 1.0), delivered)
    m4 = result.check(Goal("200/s kept up with", "delivered per second", ">=", STREAM_GOAL * 0.95),
                      paced["delivered_per_s"])  # fmt: skip
    result.ratios = {
        "first_page": ratio(pages["first_page"]["p95"], base["first_page"]["p95"]),
        "failed_filter": ratio(pages["failed_filter"]["p95"], base["failed_filter"]["p95"]),
    }
    result.rows = [
        Row("jobs page 1 p95 (HTTP)", pages["first_page"]["p95"], base["first_page"]["p95"],
            result.ratios["first_page"], "ms", "<= 200 ms", m1),
        Row("deep page (offset n/2) p95", pages["deep_page"]["p95"], unit="ms"),
        Row("state=failed page p95 (HTTP)", pages["failed_filter"]["p95"], base["failed_filter"]["p95"],
            result.ratios["failed_filter"], "ms", "<= 200 ms", m2),
        Row("no-match filter (one scan budget) p95", pages["no_match_filter"]["p95"], unit="ms"),
        Row("lookup by id p95", pages["by_id"]["p95"], unit="ms"),
        Row("counts p95", pages["counts"]["p95"], unit="ms"),
        Row("live: delivered/made at 200/s", delivered, unit="", goal=">= 1", met=m3),
        Row("live: delivered per s", paced["delivered_per_s"], unit="/s", goal=">= 190/s", met=m4),
        Row("live: lag p95 at 200/s", paced["lag_ms"]["p95"], unit="ms"),
        Row("live: flat out, delivered per s", figures["stream_flat_out"]["delivered_per_s"], unit="/s"),
        Row("live: flat out, lag p95", figures["stream_flat_out"]["lag_ms"]["p95"], unit="ms"),
    ]  # fmt: skip
    result.chart = [
        ChartItem("latency", "8 dashboard: jobs page p95 (ms)", pages["first_page"]["p95"],
                  base["first_page"]["p95"], "ms"),
    ]  # fmt: skip
    result.notes.append("baseline: Ledger.list_records (genq jobs' reader) in-process, without HTTP")
    return result


def main(argv: list[str] | None = None) -> int:
    import tempfile

    quick = "--quick" in (argv if argv is not None else sys.argv[1:])
    harness.install_cleanup()
    workdir = Path(tempfile.mkdtemp(prefix="genq-bench-dashboard-"))
    ctx = Context(quick=quick, workdir=workdir)
    result = run(ctx)
    print(json.dumps(result.to_json(), indent=2))
    harness.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
