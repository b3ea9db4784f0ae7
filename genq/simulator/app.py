"""The upstream generation API as an aiohttp application (contract: /work/shared/upstream-api.md).

API routes (Bearer auth; latency, 429 and 5xx faults apply, in that order, after the auth check):
    POST /images/generation    prompt (required), num_images|count 1..8, width, height, model_id|modelId,
                               seed, negative_prompt
    POST /images/upscaling     image_id|image_url (one required), factor 2|4 -> 1 image
    POST /videos/generation    prompt and/or image_id|image_url, duration -> 1 video
    GET  /jobs/{id}            status from the elapsed fraction of the job's duration:
                               created < 10% <= queued < 30% <= running < 100% <= success|failed
    GET  /models/{id}/train    200 "Training started"; ready after `training_duration` seconds,
                               failed when the model id contains "fail"
    GET  /models/{id}          untrained|training|ready|failed

File routes (no Bearer; the `?token=` from the output URL, 403 if wrong):
    GET  /files/{id}/{i}.png|.mp4   streamed in 64 KiB chunks, `Range: bytes=...` answered with 206

Control routes (no auth): GET /_sim/stats[?jobs=0], GET|POST /_sim/config, GET /_sim/jobs/{id},
POST /_sim/reset, GET /_sim/health.

Prompt directives (they override the random rates; for upscaling they are read from image_id/image_url):
    [sim:fail]          the job ends `failed` with "simulated failure: ..."
    [sim:never]         the job stays `running` forever
    [sim:duration=3.5]  this job takes 3.5 s
    [sim:images=3]      this image job produces 3 images (0..8)

Changing `file_token` at runtime invalidates every URL handed out before, which simulates URL expiry.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from genq.simulator.common import BadRequest, error_response, json_object, state_of
from genq.simulator.config import SimConfig
from genq.simulator.control import add_control_routes
from genq.simulator.files import add_file_routes
from genq.simulator.state import STATE_KEY, Job, JobKind, SimState

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Keeps /jobs answers cached per (status, origin, token) without letting odd Host headers grow memory.
_BODY_CACHE_LIMIT = 16


def _authorized(request: web.Request, api_key: str) -> bool:
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())


async def _fault_or_handle(request: web.Request, state: SimState, handler: Handler) -> web.StreamResponse:
    cfg = state.config
    if cfg.latency > 0:
        await asyncio.sleep(cfg.latency)
    if not _authorized(request, cfg.api_key):
        return error_response(401, "unauthorized")
    rng = state.fault_rng
    if cfg.rate_429_rate > 0 and rng.random() < cfg.rate_429_rate:
        retry = str(math.ceil(cfg.retry_after))
        return error_response(429, "rate limited", headers={"Retry-After": retry})
    if cfg.error_5xx_rate > 0 and rng.random() < cfg.error_5xx_rate:
        # The upstream itself refuses before doing anything.
        status = rng.choice((500, 503))
        return error_response(status, f"simulated upstream error {status}")
    try:
        answer = await handler(request)
    except BadRequest as exc:
        return error_response(400, str(exc))
    if cfg.gateway_error_rate > 0 and rng.random() < cfg.gateway_error_rate:
        # A gateway in front lost the answer of a request the upstream did act on.
        status = rng.choice((502, 504))
        return error_response(status, f"simulated gateway error {status}")
    return answer


def api_route(route_key: str, handler: Handler) -> Handler:
    """Counting, auth and fault injection shared by every API route."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        state = state_of(request)
        now = time.monotonic()
        state.stats.api_request(route_key, now)
        job_id = request.match_info.get("job_id")
        # Only known jobs get counters, so polling random ids cannot grow the stats without bound.
        if route_key == "GET /jobs" and job_id in state.jobs:
            counters = state.stats.job(job_id)
            counters.gets += 1
            counters.get_times.append(now)
        response = await _fault_or_handle(request, state, handler)
        state.stats.responses[str(response.status)] += 1
        return response

    return wrapped


def _opt_str(body: dict[str, Any], *names: str) -> str | None:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise BadRequest(f"{name} must be a non-empty string")
        return value
    return None


def _opt_int(body: dict[str, Any], names: tuple[str, ...], low: int, high: int) -> int | None:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise BadRequest(f"{name} must be an integer in {low}..{high}")
        return value
    return None


def _opt_number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest(f"{name} must be a number in {low}..{high}")
    return float(value)


def _trigger_answer(state: SimState, job: Job) -> web.Response:
    if state.config.bare_trigger_response:
        return web.json_response({"jobId": job.job_id})
    result = {"jobId": job.job_id, "status": "created", "createdAt": job.created_at, "modelId": job.model_id}
    return web.json_response({"result": result})


async def _create(
    request: web.Request, kind: JobKind, body: dict[str, Any], directive_text: str
) -> web.Response:
    state = state_of(request)
    model_id = _opt_str(body, "model_id", "modelId")
    count = _opt_int(body, ("num_images", "count"), 1, 8) if kind == "image" else None
    job = state.create_job(kind, body, directive_text, model_id, count)
    return _trigger_answer(state, job)


async def generate_images(request: web.Request) -> web.StreamResponse:
    body = await json_object(request)
    prompt = _opt_str(body, "prompt")
    if prompt is None:
        raise BadRequest("prompt is required")
    _opt_int(body, ("width",), 1, 8192)
    _opt_int(body, ("height",), 1, 8192)
    _opt_int(body, ("seed",), -(2**63), 2**63 - 1)
    _opt_str(body, "negative_prompt")
    return await _create(request, "image", body, prompt)


async def upscale_image(request: web.Request) -> web.StreamResponse:
    body = await json_object(request)
    image_id = _opt_str(body, "image_id")
    image_url = _opt_str(body, "image_url")
    if image_id is None and image_url is None:
        raise BadRequest("image_id or image_url is required")
    factor = body.get("factor", 2)
    if factor not in (2, 4) or isinstance(factor, bool):
        raise BadRequest("factor must be 2 or 4")
    return await _create(request, "upscale", body, f"{image_id or ''} {image_url or ''}")


async def generate_video(request: web.Request) -> web.StreamResponse:
    body = await json_object(request)
    prompt = _opt_str(body, "prompt")
    image = _opt_str(body, "image_id") or _opt_str(body, "image_url")
    if prompt is None and image is None:
        raise BadRequest("prompt or image_id/image_url is required")
    _opt_number(body, "duration", 0.1, 600)
    return await _create(request, "video", body, prompt or "")


def _origin(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def _job_result(job: Job, status: str, origin: str, token: str) -> dict[str, Any]:
    outputs: list[dict[str, str]] = []
    if status == "success":
        prefix = "vid" if job.kind == "video" else "img"
        outputs = [
            {
                "id": f"{prefix}_{job.job_id}_{i}",
                "url": f"{origin}/files/{job.job_id}/{i}.{job.output_ext}?token={token}",
            }
            for i in range(job.output_count)
        ]
    return {
        "jobId": job.job_id,
        "status": status,
        "images": outputs if job.kind != "video" else [],
        "videos": outputs if job.kind == "video" else [],
        "error": job.error if status == "failed" else None,
        "modelId": job.model_id,
        "createdAt": job.created_at,
    }


async def get_job(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    job = state.jobs.get(request.match_info["job_id"])
    if job is None:
        return error_response(404, "job not found")
    cfg = state.config
    status = job.status(time.monotonic())
    if cfg.malformed_rate > 0 and state.fault_rng.random() < cfg.malformed_rate:
        if state.fault_rng.random() < 0.5:
            truncated = b'{"result": {"jobId": "' + job.job_id.encode() + b'", "status": '
            return web.Response(body=truncated, content_type="application/json")
        status = "weird-status"
    origin = _origin(request)
    key = (status, origin, cfg.file_token)
    body = job.body_cache.get(key)
    if body is None:
        body = json.dumps({"result": _job_result(job, status, origin, cfg.file_token)}).encode()
        if len(job.body_cache) < _BODY_CACHE_LIMIT:
            job.body_cache[key] = body
    return web.Response(body=body, content_type="application/json")


async def train_model(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    model_id = request.match_info["model_id"]
    state.stats.train_calls[model_id] += 1
    state.train(model_id, time.monotonic())
    return web.json_response("Training started")


async def get_model(request: web.Request) -> web.StreamResponse:
    model = state_of(request).model(request.match_info["model_id"], time.monotonic())
    return web.json_response({"result": model.as_result()})


def build_app(config: SimConfig | None = None) -> web.Application:
    app = web.Application()
    app[STATE_KEY] = SimState(config or SimConfig())
    app.router.add_post("/images/generation", api_route("POST /images/generation", generate_images))
    app.router.add_post("/images/upscaling", api_route("POST /images/upscaling", upscale_image))
    app.router.add_post("/videos/generation", api_route("POST /videos/generation", generate_video))
    app.router.add_get("/jobs/{job_id}", api_route("GET /jobs", get_job))
    app.router.add_get("/models/{model_id}/train", api_route("GET /models/train", train_model))
    app.router.add_get("/models/{model_id}", api_route("GET /models", get_model))
    add_file_routes(app)
    add_control_routes(app)
    return app
