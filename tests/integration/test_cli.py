"""The commands a user types: ``genq demo``, ``genq submit``/``status``, ``celery -A workers worker``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import Stack

pytestmark = pytest.mark.integration
GENQ = str(Path(sys.executable).with_name("genq"))


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    return {**env, **extra}


def test_demo_runs_end_to_end_on_embedded_defaults(tmp_path: Path) -> None:
    result = subprocess.run(
        [GENQ, "demo", "--jobs", "3", "--concurrency", "2"],
        cwd=tmp_path,
        env=_clean_env(COLUMNS="80"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # 3 image jobs of 2 files, a video, a 2-image workflow (2 upscaled files), a parked generation.
    assert "6/6 jobs succeeded, 10 files" in result.stdout
    for kind in ("image", "video", "workflow"):
        assert f" {kind} " in result.stdout
    assert "training demo-model" in result.stdout and "is parked until it is ready" in result.stdout
    assert " NO " not in result.stdout  # every sha256 matches the simulator's
    assert max(len(line) for line in result.stdout.splitlines()) <= 80  # the table fits; nothing wraps
    pngs = sorted((tmp_path / "downloads").rglob("*.png"))
    assert len(pngs) == 3 * 2 + 2 + 2 + 1  # the workflow's generated and upscaled images both stay
    assert all(f.read_bytes().startswith(b"\x89PNG") for f in pngs)
    assert len(list((tmp_path / "downloads").rglob("*.mp4"))) == 1
    # Everything the demo started is gone: no redis-server or worker left with this cwd.
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""


def test_demo_json_prints_every_record_in_full(tmp_path: Path) -> None:
    result = subprocess.run(
        [GENQ, "demo", "--jobs", "1", "--images", "1", "--concurrency", "2", "--json"],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout)  # the progress went to stderr
    assert summary["succeeded"] == summary["jobs_total"] == 4  # an image, a video, a workflow, a parked one
    outputs = [out for job in summary["jobs"] for out in job["outputs"]]
    assert len(outputs) == summary["files"] == 1 + 1 + 2 + 1
    assert all(len(out["sha256"]) == 64 and out["matches_upstream"] for out in outputs)
    assert all(
        len(job["id"]) == 32 and Path(out["path"]).exists()
        for job in summary["jobs"]
        for out in job["outputs"]
    )
    assert "all jobs" in result.stderr


def test_submit_wait_and_status_from_the_command_line(stack: Stack) -> None:
    stack.worker()
    env = _clean_env(**stack.env)
    submitted = subprocess.run(
        [GENQ, "submit", "image", "--prompt", "a kite", "--num-images", "2", "--wait", "--json"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    record = json.loads(submitted.stdout)
    assert record["state"] == "succeeded" and len(record["outputs"]) == 2

    status = subprocess.run(
        [GENQ, "status", record["id"]], env=env, capture_output=True, text=True, timeout=30
    )
    assert status.returncode == 0
    assert "succeeded" in status.stdout and record["outputs"][0]["sha256"] in status.stdout


def test_bad_input_is_refused_before_anything_is_written(stack: Stack) -> None:
    env = _clean_env(**stack.env)
    result = subprocess.run(
        [GENQ, "submit", "image", "--prompt", "x", "--num-images", "50"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "num_images" in result.stderr and "Traceback" not in result.stderr
    assert stack.ledger().list_ids() == []


def test_worker_refuses_invalid_settings_naming_the_variable(tmp_path: Path) -> None:
    env = _clean_env(GENQ_REDIS_URL="http://nope", GENQ_WORKER_VISIBILITY_TIMEOUT="ten")
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "genq.worker", "worker", "-Q", "poll"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "GENQ_REDIS_URL" in result.stderr and "GENQ_WORKER_VISIBILITY_TIMEOUT" in result.stderr
    assert "Traceback" not in result.stderr


def test_settings_come_from_a_dotenv_file(stack: Stack, tmp_path: Path) -> None:
    """A worker started in a folder with a .env reads it (here: a wrong key, so the job fails 401)."""
    (tmp_path / ".env").write_text("GENQ_API_KEY=from-dotenv\n")
    env = {k: v for k, v in stack.env.items() if k != "GENQ_API_KEY"}
    worker_env = _clean_env(**env)
    from genq.processes import WorkerProcess

    with WorkerProcess(worker_env, log_path=tmp_path / "w.log", cwd=tmp_path):
        producer = stack.producer()
        job = producer.submit_image("dotenv")
        from tests.helpers import wait_all

        (record,) = wait_all(producer, [job.id], timeout=30)
    assert record.state.value == "failed" and "401" in (record.error or "")
