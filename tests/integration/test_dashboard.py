"""``genq dashboard``: locked down (401 on every page, asset, API call, file, plot and the event stream;
the Host check of ``--local-only``; CSRF on actions), the gallery never serving a path outside the
download directory, the jobs API paging newest first, cancel, the live stream, and no output URL or
token ever in an answer. Against a real redis-server on a free port and the app on aiohttp's test server;
the browser test with real workers is in ``test_dashboard_browser.py``."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer

from genq.dashboard.app import (
    CSRF_HEADER,
    SESSION_COOKIE,
    Dashboard,
    DashboardRefused,
    DashboardSettings,
    EventHub,
    build_app,
    host_name,
    serve,
)
from genq.dashboard.queries import Queries, redact, xrange_entries
from genq.embedded import EmbeddedRedis, free_port
from genq.ledger import Ledger
from genq.producer import Producer
from genq.schemas import JobKind, JobState, OutputFile
from tests.helpers import environment
from tests.integration.procs import genq

pytestmark = pytest.mark.integration

USER, PASSWORD = "ops", "pw-7c1e0d"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
WRONG = {"Authorization": "Basic " + base64.b64encode(f"{USER}:nope".encode()).decode()}
URL_TOKEN = "sig-SECRET-0f9e"  # a canary: must never appear in an answer
GETS = [
    "/", "/static/app.js", "/static/style.css", "/api/session", "/api/counts", "/api/jobs",
    "/api/jobs/{job}", "/api/gallery", "/api/models", "/api/health", "/files/{job}/0",
    "/plots/throughput.svg", "/plots/latency.svg", "/plots/errors.svg", "/plots/queues.svg",
    "/plots/queue_age.svg", "/plots/sweeper.svg", "/events",
]  # fmt: skip


class World:
    def __init__(self, server: EmbeddedRedis, tmp: Path) -> None:
        self.server = server
        self.redis: redis.Redis = redis.Redis.from_url(server.url)
        self.ledger = Ledger(self.redis)
        self.downloads = tmp / "downloads"
        self.downloads.mkdir()
        self.tmp = tmp
        self.env = {"GENQ_REDIS_URL": server.url, "GENQ_DOWNLOAD_DIR": str(self.downloads)}
        with environment(self.env):
            self.producer = Producer()

    def job(self, prompt: str = "a fox", **kwargs: Any) -> str:
        job_id = os.urandom(16).hex()
        request = {"prompt": prompt, "num_images": 1, **kwargs.pop("request", {})}
        self.ledger.create(job_id, JobKind.IMAGE, request, expected_outputs=1, **kwargs)
        return job_id

    def finished(self, data: bytes, *, path: Path | None = None) -> tuple[str, OutputFile]:
        """A succeeded job with one downloaded output (at ``path``, by default in the download dir)."""
        job_id = self.job()
        if path is None:
            (self.downloads / job_id).mkdir()
            path = self.downloads / job_id / "0.png"
            path.write_bytes(data)
        out = OutputFile(index=0, remote_id="img-1", path=str(path), bytes=len(data),
                         sha256=hashlib.sha256(data).hexdigest(), content_type="image/png")  # fmt: skip
        self.ledger.transition(job_id, [JobState.PENDING], JobState.SUBMITTING)
        self.ledger.transition(job_id, [JobState.SUBMITTING], JobState.SUBMITTED, upstream_id="up-1")
        self.ledger.set_urls(job_id, {0: f"https://files.example/0.png?token={URL_TOKEN}"})
        self.ledger.transition(job_id, [JobState.SUBMITTED], JobState.DOWNLOADING)
        self.ledger.record_output(job_id, out)
        self.ledger.transition(job_id, [JobState.DOWNLOADING], JobState.SUCCEEDED)
        return job_id, out

    def dashboard(self, *, local_only: bool = False, hub: bool = True) -> Dashboard:
        return Dashboard(
            Queries(self.redis, self.downloads),
            credentials=[] if local_only else [f"{USER}:{PASSWORD}"],
            local_only=local_only,
            hub=EventHub(redis.Redis.from_url(self.server.url), block_ms=200) if hub else None,
            actions=self.producer,
        )


@pytest.fixture
def world(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[World]:
    w = World(redis_server, tmp_path)
    yield w
    w.producer.close()
    w.redis.close()


def run(dash: Dashboard, body: Callable[[TestClient[Any, Any]], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with TestServer(build_app(dash)) as server, TestClient(server) as client:
            return await body(client)

    return asyncio.run(main())


# ------------------------------------------------------------------ locked down


def test_every_page_asset_api_file_plot_and_the_stream_answer_401_without_credentials(world: World) -> None:
    job, _ = world.finished(b"\x89PNG fake")

    async def body(client: TestClient[Any, Any]) -> None:
        for path in [p.format(job=job) for p in GETS]:
            for headers in ({}, WRONG, {"Authorization": "Bearer x"}, {"Authorization": "Basic %%%"}):
                answer = await client.get(path, headers=headers)
                text = await answer.text()
                assert answer.status == 401, (path, headers, answer.status)
                assert answer.headers["WWW-Authenticate"].startswith("Basic")
                assert job not in text and "genqueue" not in text
        for path in [f"/api/jobs/{job}/cancel", f"/api/jobs/{job}/resubmit"]:
            assert (await client.post(path)).status == 401
        for path in [p.format(job=job) for p in GETS if p != "/events"]:
            answer = await client.get(path, headers=AUTH)
            assert answer.status == 200, (path, answer.status)
        events = await client.get("/events", headers=AUTH)
        assert events.status == 200
        assert events.headers["Content-Type"].startswith("text/event-stream")
        events.close()

    run(world.dashboard(), body)


def test_refuses_to_start_without_credentials(world: World) -> None:
    with pytest.raises(DashboardRefused, match="GENQ_DASHBOARD_BASIC_AUTH is not set"):
        serve(None, DashboardSettings(basic_auth=""), local_only=False, address="127.0.0.1", port=0)
    with pytest.raises(DashboardRefused, match="loopback only"):
        serve(None, DashboardSettings(), local_only=True, address="0.0.0.0", port=0)
    with pytest.raises(ValueError, match="must be user:password"):
        DashboardSettings(basic_auth="admin:")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_DASHBOARD")}
    port = free_port()
    done = subprocess.run(
        genq("dashboard", "--port", str(port)), env={**env, **world.env}, capture_output=True, text=True,
        timeout=60, cwd=world.tmp,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "GENQ_DASHBOARD_BASIC_AUTH is not set" in done.stderr


def test_local_only_answers_to_localhost_names_only(world: World) -> None:
    assert [host_name(h) for h in ("127.0.0.1:80", "LOCALHOST", "[::1]:8950", "evil.example:80")] == [
        "127.0.0.1", "localhost", "::1", "evil.example"
    ]  # fmt: skip

    async def body(client: TestClient[Any, Any]) -> None:
        assert (await client.get("/api/counts")).status == 200  # no credentials needed
        for host in ("localhost:8950", "127.0.0.1", "[::1]:1"):
            assert (await client.get("/api/counts", headers={"Host": host})).status == 200, host
        for host in ("attacker.example", "attacker.example:8950", "127.0.0.1.nip.io", "localhost.evil"):
            for path in ("/", "/api/jobs", "/static/app.js", "/events"):
                answer = await client.get(path, headers={"Host": host})
                assert answer.status == 403, (host, path)

    run(world.dashboard(local_only=True), body)


# ------------------------------------------------------------------ files


def test_gallery_serves_ledger_outputs_only_and_never_outside_the_download_dir(world: World) -> None:
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(200)
    job, out = world.finished(data)
    secret = world.tmp / "secret.txt"
    secret.write_text("not for the page")
    # Records that point outside the download directory: directly, by '..', and through a symlink.
    outside, _ = world.finished(b"x", path=secret)
    dotted, _ = world.finished(b"x", path=world.downloads / ".." / "secret.txt")
    (world.downloads / "link").mkdir()
    (world.downloads / "link" / "0.png").symlink_to(secret)
    linked, _ = world.finished(b"x", path=world.downloads / "link" / "0.png")
    dir_itself, _ = world.finished(b"x", path=world.downloads)

    async def body(client: TestClient[Any, Any]) -> None:
        answer = await client.get(f"/files/{job}/0", headers=AUTH)
        assert answer.status == 200
        assert await answer.read() == data
        assert hashlib.sha256(data).hexdigest() == out.sha256
        assert answer.headers["Content-Type"] == "image/png"
        for path in [
            f"/files/{job}/1", f"/files/{job}/-1", f"/files/{job}/x", "/files/0123456789abcdef/0",
            f"/files/{outside}/0", f"/files/{dotted}/0", f"/files/{linked}/0", f"/files/{dir_itself}/0",
            "/files/..%2F..%2Fsecret.txt/0", "/files/../secret.txt", f"/files/{job}/0/../../secret.txt",
            "/files/%2e%2e/0", f"/files/{job}%00/0",
        ]:  # fmt: skip
            answer = await client.get(path, headers=AUTH)
            assert answer.status == 404, (path, answer.status)
            assert "not for the page" not in await answer.text()
        page = await (await client.get("/api/gallery", headers=AUTH)).json()
        ids = [i["id"] for i in page["items"]]
        assert ids[-1] == job and ids == sorted(ids, key=ids.index)  # newest first: job was first made
        text = json.dumps(page)
        assert str(world.downloads) not in text and "path" not in text

    run(world.dashboard(), body)


# ------------------------------------------------------------------ actions


def test_cancel_needs_the_sessions_csrf_token_and_works_with_it(world: World) -> None:
    job = world.job()

    async def body(client: TestClient[Any, Any]) -> None:
        # No session yet: refused even with a token from elsewhere.
        cancel = f"/api/jobs/{job}/cancel"
        assert (await client.post(cancel, headers={**AUTH, CSRF_HEADER: "x"})).status == 403
        answer = await client.get("/api/session", headers=AUTH)
        set_cookie = answer.headers["Set-Cookie"]
        assert set_cookie.startswith(SESSION_COOKIE + "=")
        assert "SameSite=Strict" in set_cookie and "HttpOnly" in set_cookie
        session = await answer.json()
        token = session["csrf"]
        assert (await client.post(f"/api/jobs/{job}/cancel", headers=AUTH)).status == 403
        wrong = {**AUTH, CSRF_HEADER: token[:-1] + ("0" if token[-1] != "0" else "1")}
        assert (await client.post(f"/api/jobs/{job}/cancel", headers=wrong)).status == 403
        foreign = {**AUTH, CSRF_HEADER: token, "Origin": "http://attacker.example"}
        assert (await client.post(f"/api/jobs/{job}/cancel", headers=foreign)).status == 403
        assert world.ledger.get(job).state is JobState.PENDING  # type: ignore[union-attr]
        # The token of one session is worth nothing in another.
        async with ClientSession() as other:
            answer = await other.post(client.make_url(cancel), headers={**AUTH, CSRF_HEADER: token})
            assert answer.status == 403
        ok = await client.post(f"/api/jobs/{job}/cancel", headers={**AUTH, CSRF_HEADER: token})
        assert ok.status == 200, await ok.text()
        assert await ok.json() == {"id": job, "done": True, "state": "cancelled"}
        again = await (await client.post(cancel, headers={**AUTH, CSRF_HEADER: token})).json()
        assert again["done"] is False
        missing = await client.post("/api/jobs/0000/cancel", headers={**AUTH, CSRF_HEADER: token})
        assert missing.status == 404
        # Resubmit only moves a submit_unknown job.
        resubmit = f"/api/jobs/{job}/resubmit"
        refused = await (await client.post(resubmit, headers={**AUTH, CSRF_HEADER: token})).json()
        assert refused == {"id": job, "done": False, "state": "cancelled"}

    run(world.dashboard(), body)
    assert world.ledger.get(job).state is JobState.CANCELLED  # type: ignore[union-attr]


# ------------------------------------------------------------------ jobs


def test_jobs_api_pages_newest_first_and_filters(world: World) -> None:
    ids = [world.job(f"fox {i}") for i in range(130)]
    keyed = world.job("keyed", idempotency_key="order-42")
    ids.append(keyed)
    for job in ids[:7]:
        world.ledger.transition(job, [JobState.PENDING], JobState.FAILED, error="upstream job failed: boom")

    async def body(client: TestClient[Any, Any]) -> None:
        first = await (await client.get("/api/jobs?limit=50", headers=AUTH)).json()
        assert [j["id"] for j in first["jobs"]] == ids[::-1][:50]
        assert first["next"] == 50
        second = await (await client.get("/api/jobs?limit=50&offset=50", headers=AUTH)).json()
        assert [j["id"] for j in second["jobs"]] == ids[::-1][50:100]
        last = await (await client.get("/api/jobs?limit=50&offset=100", headers=AUTH)).json()
        assert [j["id"] for j in last["jobs"]] == ids[::-1][100:] and last["next"] is None
        failed = await (await client.get("/api/jobs?state=failed&limit=5", headers=AUTH)).json()
        assert [j["id"] for j in failed["jobs"]] == ids[:7][::-1][:5]
        older = f"/api/jobs?state=failed&limit=5&offset={failed['next']}"
        more = await (await client.get(older, headers=AUTH)).json()
        assert [j["id"] for j in more["jobs"]] == ids[:2][::-1]
        assert failed["jobs"][0]["error"] == "upstream job failed: boom"
        none = await (await client.get("/api/jobs?kind=video", headers=AUTH)).json()
        assert none["jobs"] == [] and none["next"] is None
        by_id = await (await client.get(f"/api/jobs?id={ids[3]}", headers=AUTH)).json()
        assert [j["id"] for j in by_id["jobs"]] == [ids[3]]
        by_key = await (await client.get("/api/jobs?idem=order-42", headers=AUTH)).json()
        assert [j["id"] for j in by_key["jobs"]] == [keyed]
        counts = await (await client.get("/api/counts", headers=AUTH)).json()
        assert counts["states"] == {"pending": 124, "failed": 7} and counts["listed"] == 131

    run(world.dashboard(), body)


def test_job_page_has_timeline_reason_and_request_and_no_url_or_token(world: World) -> None:
    job = world.job(
        "a fox", request={"image_url": f"https://img.example/a.png?X-Amz-Signature={URL_TOKEN}"},
        callback={"url": f"https://hooks.example/genq?key={URL_TOKEN}"},
    )  # fmt: skip
    world.ledger.transition(job, [JobState.PENDING], JobState.SUBMITTING)
    world.ledger.set_urls(job, {0: f"https://files.example/0.png?token={URL_TOKEN}"})
    world.ledger.transition(
        job, [JobState.SUBMITTING], JobState.FAILED,
        error=f"download of https://files.example/0.png?token={URL_TOKEN} refused: HTTP 403",
    )  # fmt: skip
    done, _ = world.finished(b"png")

    async def body(client: TestClient[Any, Any]) -> None:
        answers = []
        for path in (f"/api/jobs/{job}", f"/api/jobs/{done}", "/api/jobs", "/api/gallery", "/api/models"):
            answer = await client.get(path, headers=AUTH)
            assert answer.status == 200
            answers.append(await answer.text())
        assert URL_TOKEN not in "".join(answers)
        detail = json.loads(answers[0])
        assert detail["job"]["error"] == "download of https://files.example/0.png refused: HTTP 403"
        assert detail["job"]["request"]["image_url"] == "https://img.example/a.png"
        assert detail["job"]["callback"]["target"] == "https://hooks.example/genq"
        assert detail["events_complete"] is True
        steps = [s["step"] for s in detail["timeline"]]
        assert steps[:3] == ["accepted (pending)", "submitting (paid POST)", "failed"], steps
        assert detail["timeline"][1]["since_prev"] >= 0
        finished = json.loads(answers[1])
        assert [s["step"] for s in finished["timeline"]][-2:] == ["finalized: succeeded", "downloads: 1/1"]
        assert "path" not in json.dumps(finished["job"]["outputs"])
        assert (await client.get("/api/jobs/nope", headers=AUTH)).status == 404

    run(world.dashboard(), body)
    assert (
        redact("see https://u:p@h.example:8/p?q=1#f and http://x/y")
        == "see https://h.example:8/p and http://x/y"
    )


def test_plots_are_svg_without_script(world: World) -> None:
    world.finished(b"png")

    async def body(client: TestClient[Any, Any]) -> None:
        for name in ("throughput", "latency", "errors", "queues", "queue_age", "sweeper"):
            answer = await client.get(f"/plots/{name}.svg", headers=AUTH)
            assert answer.status == 200
            assert answer.headers["Content-Type"].startswith("image/svg+xml")
            text = await answer.text()
            assert text.startswith("<svg") and "<script" not in text
        assert (await client.get("/plots/nope.svg", headers=AUTH)).status == 404

    run(world.dashboard(), body)


# ------------------------------------------------------------------ live


def test_a_state_change_appears_on_the_live_stream(world: World) -> None:
    job = world.job()

    async def body(client: TestClient[Any, Any]) -> list[dict[str, Any]]:
        answer = await client.get("/events", headers=AUTH)
        assert answer.status == 200
        await asyncio.sleep(0.3)  # the hub tails from where the stream was when the app started
        started = time.monotonic()
        await asyncio.to_thread(world.ledger.transition, job, [JobState.PENDING], JobState.SUBMITTING)
        seen: list[dict[str, Any]] = []
        while not any(e.get("job") == job and e.get("to") == "submitting" for e in seen):
            assert time.monotonic() - started < 10, seen
            line = await asyncio.wait_for(answer.content.readline(), timeout=10)
            if line.startswith(b"data: "):
                seen += json.loads(line[6:])
        answer.close()
        # A client that reconnects with the last id it saw gets what it missed.
        await asyncio.to_thread(world.ledger.transition, job, [JobState.SUBMITTING], JobState.FAILED)
        last = world.ledger.last_event_id()
        first_id = xrange_entries(world.redis, count=1)[0][0]
        again = await client.get("/events", headers={**AUTH, "Last-Event-ID": first_id})
        replay: list[dict[str, Any]] = []
        while not any(e.get("id") == last for e in replay):
            line = await asyncio.wait_for(again.content.readline(), timeout=10)
            if line.startswith(b"data: "):
                replay += json.loads(line[6:])
        again.close()
        return replay

    replay = run(world.dashboard(), body)
    assert [(e["job"], e["to"]) for e in replay][-2:] == [(job, "submitting"), (job, "failed")]


def test_models_show_state_time_in_training_and_parked_jobs(world: World) -> None:
    from genq.model_ledger import ModelLedger
    from genq.schemas import ModelState

    models = ModelLedger(world.redis)
    assert models.request("style-7", deadline=3600)
    models.transition("style-7", [ModelState.REQUESTED], ModelState.TRAINING, started_at=models.clock() - 600)
    parked = world.job("in the style", model_id="style-7")
    assert world.ledger.get(parked).state is JobState.PARKED  # type: ignore[union-attr]

    async def body(client: TestClient[Any, Any]) -> dict[str, Any]:
        answer = await client.get("/api/models", headers=AUTH)
        assert answer.status == 200
        return await answer.json()  # type: ignore[no-any-return]

    (model,) = run(world.dashboard(), body)["models"]
    assert (model["id"], model["state"], model["parked"], model["parked_ids"]) == (
        "style-7", "training", 1, [parked]
    )  # fmt: skip
    assert 600 <= model["training_seconds"] < 660
    assert model["expected_seconds"] == [1200.0, 1500.0]
    assert [h["event"] for h in model["history"]] == ["requested", "training"]


def test_a_workflows_page_lists_its_steps_and_their_changes(world: World) -> None:
    from genq import intake

    request = intake.validate({"kind": "workflow", "generate": {"prompt": "a paper boat", "num_images": 2}})
    flow = intake.accept(world.ledger, request)
    (step,) = flow.to_submit
    world.ledger.transition(step, [JobState.PENDING], JobState.SUBMITTING)

    async def body(client: TestClient[Any, Any]) -> dict[str, Any]:
        return await (await client.get(f"/api/jobs/{flow.id}", headers=AUTH)).json()  # type: ignore[no-any-return]

    detail = run(world.dashboard(), body)
    assert [s["id"] for s in detail["steps"]] == [step]
    assert detail["steps"][0]["state"] == "submitting" and detail["steps"][0]["parent_id"] == flow.id
    steps = [(s["step"], s.get("job")) for s in detail["timeline"]]
    assert ("accepted (pending)", None) in steps and ("upstream running", None) in steps
    assert (f"step {step[:8]}: submitting", step) in steps
    assert detail["job"]["request"]["generate"]["prompt"] == "a paper boat"
