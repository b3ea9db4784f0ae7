"""The project's simulator (``simulator.app.build_app``, unchanged) plus two benchmark-only routes:

- ``POST /_bench/bulk {"count", "kind", "duration"}``: create ``count`` upstream jobs at once through
  the simulator's own ``SimState.create_job`` (as a paid POST would, counted as one POST each), and
  answer their ids. The capacity benchmark needs 100,000 upstream jobs in flight; making them through
  100,000 HTTP POSTs would only measure the POST path, which other benchmarks already do.
- ``GET /_bench/truth``: every job's kind, creation time and duration (the simulator's monotonic
  clock, which is the machine's), and its GET count and times: detection latency is measured from it.

    python -m benchmarks.simserver --config-json '{...}'   # prints SIMULATOR LISTENING <url>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from typing import Any

from aiohttp import web

from genq.simulator.__main__ import LISTENING_PREFIX
from genq.simulator.app import build_app
from genq.simulator.config import Duration, SimConfig
from genq.simulator.state import STATE_KEY


async def bulk(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    body: dict[str, Any] = await request.json()
    count = int(body.get("count", 1))
    kind = body.get("kind", "image")
    duration = float(body.get("duration", 3600.0))
    if not 0 < count <= 50_000 or kind not in ("image", "video"):
        return web.json_response({"error": "count 1..50000, kind image|video"}, status=400)
    ids = []
    saved = state.config
    # A fixed duration for these jobs only: the config is swapped for the loop (one event loop, no await).
    field = "video_duration" if kind == "video" else "duration"
    state.config = saved.model_copy(update={field: Duration(kind="fixed", value=duration)})
    try:
        for _ in range(count):
            job = state.create_job(kind, {"prompt": "bench bulk"}, "", None, 1)
            ids.append(job.job_id)
    finally:
        state.config = saved
    return web.json_response({"ids": ids})


async def truth(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    out: dict[str, Any] = {}
    for job_id, job in state.jobs.items():
        counters = state.stats.per_job.get(job_id)
        out[job_id] = {
            "kind": job.kind,
            "created": job.created_mono,
            "duration": job.duration,
            "outcome": job.outcome,
            "gets": counters.gets if counters else 0,
            "get_times": list(counters.get_times) if counters else [],
        }
    return web.json_response({"jobs": out, "now": time.monotonic()})


def build(config: SimConfig) -> web.Application:
    app = build_app(config)
    app.router.add_post("/_bench/bulk", bulk)
    app.router.add_get("/_bench/truth", truth)
    return app


async def _serve(config: SimConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(build(config), access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=2048)
        await site.start()
        sys.stdout.write(f"{LISTENING_PREFIX}http://{host}:{int(runner.addresses[0][1])}\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.simserver")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--config-json", default="{}")
    args = parser.parse_args()
    config = SimConfig.model_validate(json.loads(args.config_json))
    asyncio.run(_serve(config, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
