"""Run real Celery worker processes (and other long-running commands) locally: for ``genq demo``, the
tests and the benchmarks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from genq.celeryconf import QUEUES


class ProcessGroup:
    """A command as a child process in its own process group (its log in ``log_path``): ``stop`` and
    ``kill`` end the whole group, pool children included. Subclasses say how it starts."""

    def __init__(
        self, args: Sequence[str], env: Mapping[str, str], *, log_path: Path, cwd: Path | None = None
    ) -> None:
        self.args = list(args)
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def spawn(self, stdout: IO[bytes] | int, stderr: IO[bytes] | int, stdin: int | None = None) -> None:
        self.process = subprocess.Popen(
            self.args,
            env=self.env,
            cwd=self.cwd,
            stdout=stdout,
            stderr=stderr,
            stdin=stdin,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL to the whole group if it lingers."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._group_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._group_signal(signal.SIGKILL)
                self.process.wait()
        self._group_signal(signal.SIGKILL)  # children that outlived their parent
        self.process = None

    def kill(self) -> None:
        """Crash the process and its children at once."""
        if self.process is None:
            return
        self._group_signal(signal.SIGKILL)
        self.process.wait()
        self.process = None

    def _group_signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)


class WorkerProcess(ProcessGroup):
    """``celery -A genq.worker worker`` as a child process in its own process group."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        queues: Sequence[str] = QUEUES,
        concurrency: int = 2,
        pool: str = "prefork",
        log_path: Path,
        name: str | None = None,
        extra_args: Sequence[str] = (),
        cwd: Path | None = None,
        app: str = "genq.worker",
    ) -> None:
        self.name = name or f"genq-{uuid.uuid4().hex[:8]}"
        self.hostname = f"{self.name}@%h"
        args = [
            sys.executable, "-m", "celery", "-A", app, "worker",
            "-Q", ",".join(queues),
            "-c", str(concurrency),
            "-P", pool,
            "-n", self.hostname,
            "--without-gossip", "--without-mingle",
            "-l", "INFO",
            "--logfile", str(log_path),
            *extra_args,
        ]  # fmt: skip
        super().__init__(args, env, log_path=log_path, cwd=cwd)

    ready_marker = " ready."

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("")
        with open(self.log_path.with_suffix(".stderr"), "wb") as stderr:
            self.spawn(subprocess.DEVNULL, stderr)
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"worker exited at start (code {self.process.returncode}):\n{self.output()}"
                )
            if self.ready_marker in self.log_path.read_text(errors="replace"):
                return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"worker not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        parts = []
        for path in (self.log_path, self.log_path.with_suffix(".stderr")):
            if path.exists():
                parts.append(path.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    def children(self) -> list[int]:
        """Pids of the pool's child processes."""
        try:
            out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True, check=False)
        except FileNotFoundError:
            return []
        return [int(p) for p in out.stdout.split()]

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class BeatProcess(WorkerProcess):
    """``celery -A genq.worker beat``: the sweeper's clock."""

    ready_marker = "beat: Starting..."

    def __init__(self, env: Mapping[str, str], *, log_path: Path, cwd: Path | None = None) -> None:
        super().__init__(env, log_path=log_path, cwd=cwd)
        self.args = [
            sys.executable, "-m", "celery", "-A", "workers", "beat",
            "-s", str(log_path.with_suffix(".schedule")),
            "--pidfile=",
            "-l", "INFO",
            "--logfile", str(log_path),
        ]  # fmt: skip
