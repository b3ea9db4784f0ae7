"""Run the simulator as a real subprocess and talk to its control endpoints (for tests, demo, benchmarks)."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

from genq.simulator.config import SimConfig

LISTENING_PREFIX = "SIMULATOR LISTENING "
_PROJECT_ROOT = Path(__file__).resolve().parent.parent
_CONTROL_TIMEOUT = 10.0
_live: weakref.WeakSet[SimulatorProcess] = weakref.WeakSet()


class SimulatorProcess:
    """A running `python -m simulator`; `stop()` (or leaving the `with` block) ends it."""

    def __init__(self, popen: subprocess.Popen[bytes], url: str, config: SimConfig, log_dir: Path) -> None:
        self.popen = popen
        self.url = url
        self.config = config
        self._log_dir = log_dir
        self._session = requests.Session()
        _live.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def api_key(self) -> str:
        return self.config.api_key

    @property
    def headers(self) -> dict[str, str]:
        """Request headers that pass the simulator's Bearer check."""
        return {"Authorization": f"Bearer {self.api_key}"}

    def _control(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        response = self._session.request(method, self.url + path, json=payload, timeout=_CONTROL_TIMEOUT)
        if response.status_code >= 400:
            raise RuntimeError(f"simulator {method} {path} -> {response.status_code}: {response.text}")
        return response.json()

    def stats(self, include_jobs: bool = True) -> dict[str, Any]:
        result: dict[str, Any] = self._control("GET", "/_sim/stats" + ("" if include_jobs else "?jobs=0"))
        return result

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Merge `changes` into the live config (nested dicts merge); returns the new config."""
        new: dict[str, Any] = self._control("POST", "/_sim/config", changes)
        self.config = SimConfig.model_validate(new)
        return new

    def job(self, job_id: str) -> dict[str, Any]:
        """Ground truth for a job: kind, request, duration, outcome, outputs with sha256 and size."""
        truth: dict[str, Any] = self._control("GET", f"/_sim/jobs/{job_id}")
        return truth

    def jobs(self) -> list[dict[str, Any]]:
        """Every job the simulator created: ``jobId``, ``kind``, the request body and ``createdAt``."""
        result: list[dict[str, Any]] = self._control("GET", "/_sim/jobs")["jobs"]
        return result

    def reset_stats(self) -> None:
        self._control("POST", "/_sim/reset")

    def stderr_text(self) -> str:
        path = self._log_dir / "stderr"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait up to `timeout` seconds, then SIGKILL; returns the exit code."""
        self._session.close()
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        _live.discard(self)
        _remove_dir(self._log_dir)
        return self.popen.returncode

    def __enter__(self) -> SimulatorProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SimulatorProcess(pid={self.pid}, url={self.url!r})"


def _remove_dir(path: Path) -> None:
    for child in path.glob("*"):
        with contextlib.suppress(OSError):
            child.unlink()
    with contextlib.suppress(OSError):
        path.rmdir()


def _listening_url(stdout_path: Path) -> str | None:
    text = stdout_path.read_text(errors="replace")
    for line in text.splitlines(keepends=True):
        # A line without its newline may still be half-written.
        if line.startswith(LISTENING_PREFIX) and line.endswith("\n"):
            return line[len(LISTENING_PREFIX) :].strip()
    return None


def start_simulator(
    config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0, timeout: float = 15
) -> SimulatorProcess:
    """Start `python -m simulator` and wait for its LISTENING line; RuntimeError (with stderr) on failure."""
    config = config or SimConfig()
    log_dir = Path(tempfile.mkdtemp(prefix="genq-sim-"))
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "genq.simulator", "--host", host, "--port", str(port)]
    command += ["--config-json", json.dumps(config.model_dump())]
    # Files rather than pipes: nobody drains the pipes after startup, and a full pipe would stall the server.
    with open(log_dir / "stdout", "wb") as out, open(log_dir / "stderr", "wb") as err:
        popen = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
    deadline = time.monotonic() + timeout
    while True:
        url = _listening_url(log_dir / "stdout")
        if url is not None:
            return SimulatorProcess(popen, url, config, log_dir)
        problem = None
        if popen.poll() is not None:
            problem = f"exited with code {popen.returncode} before listening"
        elif time.monotonic() > deadline:
            problem = f"did not report listening within {timeout} s"
            popen.kill()
            popen.wait()
        if problem is not None:
            stderr = (log_dir / "stderr").read_text(errors="replace").strip()
            _remove_dir(log_dir)
            raise RuntimeError(
                f"simulator {problem} ({' '.join(command[:7])}); stderr:\n{stderr or '(empty)'}"
            )
        time.sleep(0.02)


@atexit.register
def _stop_leftovers() -> None:
    # A test run that crashes before its teardown must not leave simulator servers behind.
    for sim in list(_live):
        with contextlib.suppress(Exception):
            sim.stop(timeout=2.0)
