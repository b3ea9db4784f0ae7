"""0. The simulator's own request rate, alone: the reference for "the simulator is never the bottleneck".

An asyncio client (aiohttp, 64 requests in flight over keep-alive connections) hammers ``GET /jobs/{id}``
and then ``POST /images/generation`` for a few seconds each; the rate is what the simulator answered
per second (its own ``max_rate_1s`` too). Every other benchmark reports its peak 1-second rate against
this figure.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from benchmarks.context import Context
from benchmarks.harness import stack
from benchmarks.result import BenchResult, Row
from genq.simulator import SimConfig

NAME = "simulator"
IN_FLIGHT = 64


async def _hammer(url: str, key: str, seconds: float, method: str, path: str, body: Any) -> int:
    done = 0
    stop_at = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one() -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                async with session.request(method, url + path, json=body) as response:
                    await response.read()
                    if response.status < 400:
                        done += 1

        await asyncio.gather(*(one() for _ in range(IN_FLIGHT)))
    return done


def run(ctx: Context) -> BenchResult:
    seconds = ctx.size(0.5, 4.0)
    result = BenchResult(NAME, "The simulator's own request rate, alone")
    result.size = {"seconds_per_route": seconds, "in_flight": IN_FLIGHT}
    with stack(SimConfig(api_key="bench-key"), ctx.workdir / NAME, NAME) as s:
        (job_id,) = s.sim.bulk_create(1, duration=3600)
        s.sim.reset_stats()
        t0 = time.monotonic()
        gets = asyncio.run(_hammer(s.sim.url, s.sim.api_key, seconds, "GET", f"/jobs/{job_id}", None))
        get_rate = gets / (time.monotonic() - t0)
        get_peak = s.sim.stats(include_jobs=False)["max_rate_1s"]
        s.sim.reset_stats()
        t0 = time.monotonic()
        body = {"prompt": "capacity", "num_images": 1}
        posts = asyncio.run(_hammer(s.sim.url, s.sim.api_key, seconds, "POST", "/images/generation", body))
        post_rate = posts / (time.monotonic() - t0)
        post_peak = s.sim.stats(include_jobs=False)["max_rate_1s"]
    result.figures = {
        "get_jobs_per_s": get_rate,
        "get_jobs_peak_1s": get_peak,
        "post_per_s": post_rate,
        "post_peak_1s": post_peak,
        "rate_per_s": min(get_rate, post_rate),
    }
    ctx.log(
        f"simulator alone: GET {get_rate:.0f}/s (peak {get_peak}), POST {post_rate:.0f}/s (peak {post_peak})"
    )
    result.rows = [
        Row("GET /jobs/{id} per s (alone)", get_rate, unit="req/s"),
        Row("POST /images/generation per s", post_rate, unit="req/s"),
    ]
    result.notes.append(
        "measured with the load generator on the same 2 cores, so these are lower bounds of what the "
        "simulator can serve; every benchmark's peak 1-second rate is compared with get_jobs_per_s"
    )
    return result


def headroom_row(ctx: Context, peak: float | None) -> Row:
    """A table row: a benchmark's peak simulator load as a fraction of the simulator's rate alone."""
    capacity = ctx.sim_capacity.get("get_jobs_per_s")
    frac = (peak / capacity) if peak and capacity else None
    return Row(
        "simulator peak load / its rate alone",
        frac,
        unit="",
        goal="< 1: not the bottleneck",
        met=None if frac is None else frac < 1.0,
    )
