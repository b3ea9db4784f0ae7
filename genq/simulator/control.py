"""Control routes (`/_sim/...`, no auth): stats, live config, ground truth per job, counter reset."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from genq.simulator.common import BadRequest, error_response, json_object, state_of
from genq.simulator.files import png_bytes, video_sha256

# Hashing a large video blocks the loop for a while; above this size it moves to a thread.
_HASH_IN_THREAD_ABOVE = 4 * 1024 * 1024


async def control_stats(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    include_jobs = request.query.get("jobs", "1").lower() not in ("0", "false", "no")
    out = state.stats.as_dict(include_jobs=include_jobs)
    out["jobs_total"] = len(state.jobs)
    return web.json_response(out)


async def control_get_config(request: web.Request) -> web.StreamResponse:
    return web.json_response(state_of(request).config.model_dump())


async def control_set_config(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    try:
        new = state.config.merged(await json_object(request))
    except BadRequest as exc:
        return error_response(400, str(exc))
    except ValidationError as exc:
        details = exc.errors(include_url=False, include_context=False)
        return web.json_response({"error": "invalid config", "details": details}, status=400)
    state.set_config(new)
    return web.json_response(new.model_dump())


async def control_job(request: web.Request) -> web.StreamResponse:
    """The ground truth for one job; `sha256` is over exactly the bytes `/files/...` serves."""
    state = state_of(request)
    job = state.jobs.get(request.match_info["job_id"])
    if job is None:
        return error_response(404, "job not found")
    now = time.monotonic()
    outputs: list[dict[str, Any]] = []
    for i in range(job.output_count):
        if job.kind == "video":
            if job.video_bytes > _HASH_IN_THREAD_ABOVE:
                digest = await asyncio.to_thread(video_sha256, job.job_id, job.video_bytes)
            else:
                digest = video_sha256(job.job_id, job.video_bytes)
            output_id, size = f"vid_{job.job_id}_{i}", job.video_bytes
        else:
            data = png_bytes(job.job_id, i, job.image_size)
            output_id, size, digest = f"img_{job.job_id}_{i}", len(data), hashlib.sha256(data).hexdigest()
        path = f"/files/{job.job_id}/{i}.{job.output_ext}"
        outputs.append({"id": output_id, "index": i, "path": path, "size": size, "sha256": digest})
    truth = {
        "jobId": job.job_id,
        "kind": job.kind,
        "request": job.request,
        "duration": job.duration,
        "outcome": job.outcome,
        "error": job.error,
        "status": job.status(now),
        "elapsed": now - job.created_mono,
        "createdAt": job.created_at,
        "modelId": job.model_id,
        "modelStatusAtSubmit": job.model_status_at_submit,
        "outputs": outputs,
    }
    return web.json_response(truth)


async def control_jobs(request: web.Request) -> web.StreamResponse:
    """Every job created, with its kind and request body: lets a test attribute each upstream job
    (and so each paid POST) to the request that made it."""
    state = state_of(request)
    jobs = [
        {"jobId": j.job_id, "kind": j.kind, "request": j.request, "createdAt": j.created_at}
        for j in state.jobs.values()
    ]
    return web.json_response({"jobs": jobs})


async def control_reset(request: web.Request) -> web.StreamResponse:
    state_of(request).stats.reset()
    return web.json_response({"ok": True})


async def control_health(request: web.Request) -> web.StreamResponse:
    return web.json_response({"ok": True})


def add_control_routes(app: web.Application) -> None:
    app.router.add_get("/_sim/stats", control_stats)
    app.router.add_get("/_sim/config", control_get_config)
    app.router.add_post("/_sim/config", control_set_config)
    app.router.add_get("/_sim/jobs", control_jobs)
    app.router.add_get("/_sim/jobs/{job_id}", control_job)
    app.router.add_post("/_sim/reset", control_reset)
    app.router.add_get("/_sim/health", control_health)
