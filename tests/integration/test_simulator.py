"""The simulator as a real subprocess, exercised over HTTP the way genqueue will see it."""

from __future__ import annotations

import hashlib
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from genq.simulator import SimConfig, SimulatorProcess, start_simulator

pytestmark = pytest.mark.integration

BASE = SimConfig(
    api_key="test-key",
    seed=7,
    duration={"kind": "fixed", "value": 0.4},
    video_duration={"kind": "fixed", "value": 0.2},
    video_bytes=300_000,
    image_size=32,
    training_duration=0.4,
    file_token="tok-123",
)
TERMINAL = {"success", "failed"}
STATUS_ORDER = ["created", "queued", "running", "success", "failed"]


@pytest.fixture(scope="module")
def sim_process() -> Iterator[SimulatorProcess]:
    sim = start_simulator(BASE)
    try:
        yield sim
    finally:
        assert sim.stop() == 0, sim.stderr_text()


@pytest.fixture
def sim(sim_process: SimulatorProcess) -> Iterator[SimulatorProcess]:
    sim_process.configure(**BASE.model_dump())
    sim_process.reset_stats()
    yield sim_process
    # Restore even when a test fails halfway through a fault configuration.
    sim_process.configure(**BASE.model_dump())


def post(sim: SimulatorProcess, path: str, body: dict[str, Any], **kwargs: Any) -> requests.Response:
    return requests.post(sim.url + path, json=body, headers=sim.headers, timeout=5, **kwargs)


def get(sim: SimulatorProcess, path: str) -> requests.Response:
    return requests.get(sim.url + path, headers=sim.headers, timeout=5)


def submit(sim: SimulatorProcess, path: str, body: dict[str, Any]) -> str:
    response = post(sim, path, body)
    assert response.status_code == 200, response.text
    result = response.json()["result"]
    assert result["status"] == "created"
    job_id: str = result["jobId"]
    assert len(job_id) == 32 and int(job_id, 16) >= 0
    return job_id


def wait_terminal(sim: SimulatorProcess, job_id: str, limit: float = 5.0) -> tuple[dict[str, Any], list[str]]:
    statuses: list[str] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        response = get(sim, f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()["result"]
        if not statuses or statuses[-1] != result["status"]:
            statuses.append(result["status"])
        if result["status"] in TERMINAL:
            return result, statuses
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} not terminal after {limit} s: {statuses}")


def assert_valid_png(data: bytes, size: int) -> None:
    """Walk the chunks, check every CRC and that IDAT inflates to exactly size rows of RGB."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, kinds = 8, b"", []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, kind
        kinds.append(kind)
        if kind == b"IHDR":
            assert struct.unpack(">II", body[:8]) == (size, size)
        if kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    assert len(zlib.decompress(idat)) == (1 + size * 3) * size


def test_api_requires_bearer_key(sim: SimulatorProcess) -> None:
    no_key = requests.post(sim.url + "/images/generation", json={"prompt": "x"}, timeout=5)
    wrong = requests.get(sim.url + "/jobs/abc", headers={"Authorization": "Bearer nope"}, timeout=5)
    assert (no_key.status_code, no_key.json()) == (401, {"error": "unauthorized"})
    assert wrong.status_code == 401
    assert sim.stats()["jobs_created"] == 0
    # Control routes are open.
    assert requests.get(sim.url + "/_sim/health", timeout=5).json() == {"ok": True}


def test_image_job_lifecycle_and_download(sim: SimulatorProcess) -> None:
    job_id = submit(sim, "/images/generation", {"prompt": "a cat [sim:images=3]", "model_id": "m1"})
    result, statuses = wait_terminal(sim, job_id)

    assert statuses[-1] == "success"
    assert "running" in statuses
    assert statuses == sorted(statuses, key=STATUS_ORDER.index), statuses
    assert result["videos"] == [] and result["error"] is None and result["modelId"] == "m1"
    assert [img["id"] for img in result["images"]] == [f"img_{job_id}_{i}" for i in range(3)]

    truth = sim.job(job_id)
    assert truth["kind"] == "image" and truth["outcome"] == "success" and truth["duration"] == 0.4
    assert truth["modelStatusAtSubmit"] == "untrained"
    digests = set()
    for image, expected in zip(result["images"], truth["outputs"], strict=True):
        assert image["url"].startswith(sim.url + f"/files/{job_id}/") and image["url"].endswith(
            "?token=tok-123"
        )
        response = requests.get(image["url"], timeout=5)
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "image/png"
        assert_valid_png(response.content, 32)
        assert len(response.content) == expected["size"]
        assert hashlib.sha256(response.content).hexdigest() == expected["sha256"]
        digests.add(expected["sha256"])
    assert len(digests) == 3


def test_unfinished_job_has_no_outputs_and_unknown_job_is_404(sim: SimulatorProcess) -> None:
    job_id = submit(sim, "/images/generation", {"prompt": "slow [sim:duration=30]"})
    result = get(sim, f"/jobs/{job_id}").json()["result"]
    assert result["status"] in {"created", "queued"} and result["images"] == []
    file_url = f"{sim.url}/files/{job_id}/0.png?token=tok-123"
    assert requests.get(file_url, timeout=5).status_code == 404
    missing = get(sim, "/jobs/" + "0" * 32)
    assert (missing.status_code, missing.json()) == (404, {"error": "job not found"})


def test_fail_and_never_directives(sim: SimulatorProcess) -> None:
    failing = submit(sim, "/images/generation", {"prompt": "[sim:fail] [sim:duration=0.1] boom"})
    never = submit(sim, "/images/generation", {"prompt": "[sim:never][sim:duration=0.1] forever"})
    result, _ = wait_terminal(sim, failing)
    assert result["status"] == "failed"
    assert result["error"].startswith("simulated failure: ")
    assert result["images"] == []
    assert sim.job(failing)["outputs"] == []
    time.sleep(0.15)
    assert get(sim, f"/jobs/{never}").json()["result"]["status"] == "running"


def test_fail_rate_applies_to_all_jobs(sim: SimulatorProcess) -> None:
    sim.configure(fail_rate=1.0, duration={"value": 0.05})
    job_id = submit(sim, "/images/generation", {"prompt": "p"})
    result, _ = wait_terminal(sim, job_id)
    assert result["status"] == "failed" and "fail_rate" in result["error"]


def test_bare_trigger_response(sim: SimulatorProcess) -> None:
    sim.configure(bare_trigger_response=True)
    body = post(sim, "/images/generation", {"prompt": "bare"}).json()
    assert set(body) == {"jobId"}
    assert sim.job(body["jobId"])["kind"] == "image"


def test_request_validation(sim: SimulatorProcess) -> None:
    assert post(sim, "/images/generation", {"prompt": ""}).status_code == 400
    assert post(sim, "/images/generation", {"prompt": "x", "num_images": 9}).status_code == 400
    assert post(sim, "/images/upscaling", {"factor": 2}).status_code == 400
    assert post(sim, "/images/upscaling", {"image_id": "i", "factor": 3}).status_code == 400
    assert post(sim, "/videos/generation", {"duration": 4}).status_code == 400
    bad_json = requests.post(sim.url + "/images/generation", data=b"{", headers=sim.headers, timeout=5)
    assert bad_json.status_code == 400 and "error" in bad_json.json()
    assert sim.stats()["jobs_created"] == 0


def test_upscaling_produces_one_image(sim: SimulatorProcess) -> None:
    job_id = submit(sim, "/images/upscaling", {"image_id": "img_x_0 [sim:duration=0.05]", "factor": 4})
    result, _ = wait_terminal(sim, job_id)
    assert len(result["images"]) == 1 and result["videos"] == []
    assert sim.job(job_id)["kind"] == "upscale"


def test_5xx_injection_creates_no_job(sim: SimulatorProcess) -> None:
    sim.configure(error_5xx_rate=1.0)
    codes = set()
    for _ in range(12):
        response = post(sim, "/images/generation", {"prompt": "x"})
        assert "error" in response.json()
        codes.add(response.status_code)
    assert codes <= {500, 502, 503} and len(codes) >= 2
    assert get(sim, "/models/m").status_code in {500, 502, 503}
    stats = sim.stats()
    assert stats["jobs_created"] == 0
    assert stats["requests"]["POST /images/generation"] == 12
    assert sum(stats["responses"].get(str(c), 0) for c in (500, 502, 503)) == 13


def test_429_with_retry_after(sim: SimulatorProcess) -> None:
    sim.configure(rate_429_rate=1.0, retry_after=1.2)
    response = get(sim, "/jobs/whatever")
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "2"
    assert response.json() == {"error": "rate limited"}
    sim.configure(rate_429_rate=0.0)
    assert get(sim, "/jobs/whatever").status_code == 404


def test_latency_and_malformed(sim: SimulatorProcess) -> None:
    job_id = submit(sim, "/images/generation", {"prompt": "x"})
    sim.configure(latency=0.3, malformed_rate=1.0)
    started = time.monotonic()
    response = get(sim, f"/jobs/{job_id}")
    assert time.monotonic() - started >= 0.3
    assert response.status_code == 200
    try:
        status = response.json()["result"]["status"]
    except ValueError:
        status = "invalid-json"
    assert status in {"weird-status", "invalid-json"}


def test_video_streaming_with_range(sim: SimulatorProcess) -> None:
    job_id = submit(sim, "/videos/generation", {"prompt": "waves", "duration": 4})
    result, _ = wait_terminal(sim, job_id)
    assert result["images"] == [] and len(result["videos"]) == 1
    video = result["videos"][0]
    assert video["id"] == f"vid_{job_id}_0" and ".mp4?token=" in video["url"]

    full = requests.get(video["url"], timeout=5)
    assert full.status_code == 200
    assert full.headers["Content-Type"] == "video/mp4"
    assert full.headers["Accept-Ranges"] == "bytes"
    assert int(full.headers["Content-Length"]) == len(full.content) == 300_000
    assert full.content[4:8] == b"ftyp"
    truth = sim.job(job_id)["outputs"][0]
    assert hashlib.sha256(full.content).hexdigest() == truth["sha256"] and truth["size"] == 300_000

    tail = requests.get(video["url"], headers={"Range": "bytes=123457-"}, timeout=5)
    assert tail.status_code == 206
    assert tail.headers["Content-Range"] == "bytes 123457-299999/300000"
    assert tail.content == full.content[123457:]
    middle = requests.get(video["url"], headers={"Range": "bytes=10-19"}, timeout=5)
    assert (middle.status_code, middle.content) == (206, full.content[10:20])
    beyond = requests.get(video["url"], headers={"Range": "bytes=300000-"}, timeout=5)
    assert beyond.status_code == 416

    sim.configure(range_support=False)
    ignored = requests.get(video["url"], headers={"Range": "bytes=5-"}, timeout=5)
    assert ignored.status_code == 200 and len(ignored.content) == 300_000


def test_slow_drip_download(sim: SimulatorProcess) -> None:
    job_id = submit(sim, "/videos/generation", {"prompt": "[sim:duration=0]"})
    url = get(sim, f"/jobs/{job_id}").json()["result"]["videos"][0]["url"]
    sim.configure(file_drip_delay=0.05)
    started = time.monotonic()
    body = requests.get(url, timeout=5).content
    # 300 000 bytes are 5 chunks of 64 KiB, so 4 pauses.
    assert time.monotonic() - started >= 0.2
    assert hashlib.sha256(body).hexdigest() == sim.job(job_id)["outputs"][0]["sha256"]


def test_file_token_is_checked(sim: SimulatorProcess) -> None:
    job_id = submit(sim, "/images/generation", {"prompt": "[sim:duration=0] t"})
    url = get(sim, f"/jobs/{job_id}").json()["result"]["images"][0]["url"]
    base = url.split("?")[0]
    assert requests.get(url, timeout=5).status_code == 200
    assert requests.get(base, timeout=5).status_code == 403
    assert requests.get(base + "?token=wrong", timeout=5).status_code == 403
    assert requests.get(base.replace("0.png", "7.png") + "?token=tok-123", timeout=5).status_code == 404
    assert requests.get(base.replace(".png", ".mp4") + "?token=tok-123", timeout=5).status_code == 404
    # Rotating the token expires every URL handed out before.
    sim.configure(file_token="rotated")
    assert requests.get(url, timeout=5).status_code == 403


def test_model_training(sim: SimulatorProcess) -> None:
    assert get(sim, "/models/m-ok").json()["result"]["status"] == "untrained"
    started = get(sim, "/models/m-ok/train")
    assert (started.status_code, started.json()) == (200, "Training started")
    assert get(sim, "/models/m-fail/train").json() == "Training started"
    assert get(sim, "/models/m-ok").json()["result"]["status"] == "training"
    assert get(sim, "/models/m-ok/train").status_code == 200

    time.sleep(0.5)
    ready = get(sim, "/models/m-ok").json()["result"]
    assert ready["status"] == "ready" and ready["error"] is None and ready["trainedAt"].endswith("Z")
    failed = get(sim, "/models/m-fail").json()["result"]
    assert failed == failed | {"status": "failed", "error": "simulated training failure"}
    # Ready models stay ready when asked to train again.
    get(sim, "/models/m-ok/train")
    assert get(sim, "/models/m-ok").json()["result"]["status"] == "ready"
    assert sim.stats()["train_calls"] == {"m-ok": 3, "m-fail": 1}


def test_stats_counts(sim: SimulatorProcess) -> None:
    job_id = submit(sim, "/images/generation", {"prompt": "counted"})
    for _ in range(3):
        get(sim, f"/jobs/{job_id}")
        time.sleep(0.05)
    get(sim, "/jobs/unknown")
    requests.get(sim.url + "/images/generation", timeout=5)  # wrong method: not an API route hit

    stats = sim.stats()
    assert stats["requests"] == {"POST /images/generation": 1, "GET /jobs": 4}
    assert stats["total"] == 5
    assert stats["responses"] == {"200": 4, "404": 1}
    assert stats["max_rate_1s"] == 5
    per_job = stats["per_job"][job_id]
    assert (per_job["posts"], per_job["gets"], per_job["files"]) == (1, 3, 0)
    gaps = [b - a for a, b in zip(per_job["get_times"], per_job["get_times"][1:], strict=False)]
    assert len(gaps) == 2 and all(gap >= 0.04 for gap in gaps)
    assert set(stats["per_job"]) == {job_id}

    sim.reset_stats()
    assert sim.stats()["total"] == 0 and sim.stats()["per_job"] == {}


def test_configure_rejects_invalid_values(sim: SimulatorProcess) -> None:
    with pytest.raises(RuntimeError, match="400"):
        sim.configure(fail_rate=2)
    with pytest.raises(RuntimeError, match="400"):
        sim.configure(no_such_field=1)
    assert sim.configure(duration={"value": 0.25})["duration"]["kind"] == "fixed"


def test_start_failure_reports_stderr(sim: SimulatorProcess) -> None:
    port = int(sim.url.rsplit(":", 1)[1])
    with pytest.raises(RuntimeError, match="cannot listen"):
        start_simulator(BASE, port=port, timeout=10)
