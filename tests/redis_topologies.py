"""Redis as production runs it, for tests: TLS with a throwaway CA, a unix socket, a primary with a
replica, and a Sentinel set (primary, replica, three sentinels), each a real redis-server on free ports.

The Sentinel set is kept reusable on purpose (a chaos test can kill its primary under load).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from genq.embedded import EmbeddedRedis, find_redis_server, free_port

# ---------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pem:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


def _openssl(*args: str | Path) -> None:
    done = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr[-1000:]}")


_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_ca(directory: Path, name: str) -> Pem:
    """A self-signed CA valid for a day."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = Pem(directory / f"{name}.crt", directory / f"{name}.key")
    _openssl("req", "-x509", *_KEY, "-days", "1", "-subj", f"/CN={name}", "-keyout", ca.key, "-out", ca.cert)
    return ca


def issue(ca: Pem, directory: Path, name: str) -> Pem:
    """A certificate signed by ``ca`` for 127.0.0.1 and localhost, usable by a server and a client."""
    pem = Pem(directory / f"{name}.crt", directory / f"{name}.key")
    csr, ext = directory / f"{name}.csr", directory / f"{name}.ext"
    # Python's ssl is strict about extensions (key identifiers, no CA flag on a leaf): give them all.
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    _openssl("req", *_KEY, "-subj", f"/CN={name}", "-keyout", pem.key, "-out", csr)
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial",
        "-days", "1", "-extfile", ext, "-out", pem.cert,
    )  # fmt: skip
    return pem


@dataclass(frozen=True)
class Pki:
    """The CA genqueue is told to trust, a server and a client certificate it signed, and a server
    certificate from another CA (an impostor)."""

    ca: Pem
    server: Pem
    client: Pem
    impostor: Pem

    @classmethod
    def create(cls, directory: Path) -> Pki:
        ca, other = make_ca(directory, "ca"), make_ca(directory, "other-ca")
        return cls(
            ca,
            issue(ca, directory, "server"),
            issue(ca, directory, "client"),
            issue(other, directory, "impostor"),
        )


# ---------------------------------------------------------------------------- servers


class TlsRedis(EmbeddedRedis):
    """A redis-server that speaks TLS only: ``--port 0``, so plain text cannot even connect."""

    def __init__(
        self, server: Pem, ca: Path, client: Pem, *, auth_clients: str = "yes", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.server_pem, self.ca, self.client_pem, self.auth_clients = server, ca, client, auth_clients

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def listen_args(self) -> list[str]:
        return [
            "--port", "0",
            "--tls-port", str(self.port),
            "--tls-cert-file", str(self.server_pem.cert),
            "--tls-key-file", str(self.server_pem.key),
            "--tls-ca-cert-file", str(self.ca),
            "--tls-auth-clients", self.auth_clients,
        ]  # fmt: skip

    def client(self, **kwargs: Any) -> redis.Redis:
        # Probes the server as it is, whatever CA signed it: only that it answers.
        return redis.Redis(
            host="127.0.0.1", port=self.port, ssl=True, ssl_cert_reqs="none",
            ssl_certfile=str(self.client_pem.cert), ssl_keyfile=str(self.client_pem.key), **kwargs,
        )  # fmt: skip


class UnixRedis(EmbeddedRedis):
    """A redis-server on a unix socket only (in its data directory: keep that path short)."""

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    def listen_args(self) -> list[str]:
        return ["--port", "0", "--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket_path), password=self.password, **kwargs)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not {what} after {timeout}s")
        time.sleep(0.1)


def _info(server: EmbeddedRedis, section: str) -> dict[str, Any]:
    client = server.client(socket_timeout=2)
    try:
        with contextlib.suppress(redis.RedisError):
            return dict(client.info(section))
        return {}
    finally:
        client.close()


@dataclass
class Replicated:
    """A primary and one replica of it."""

    primary: EmbeddedRedis
    replica: EmbeddedRedis

    @contextlib.contextmanager
    def replica_paused(self) -> Iterator[None]:
        """The replica stopped (SIGSTOP): connected as far as the primary knows, acknowledging nothing."""
        assert self.replica.process is not None
        pid = self.replica.process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def replicated(directory: Path, password: str | None = None) -> Iterator[Replicated]:
    """A primary and a replica, once the replica is in sync."""
    auth = ("--masterauth", password) if password else ()
    # Redis waits 5 s by default before a diskless full sync, for more replicas to join it.
    primary_args = (*auth, "--repl-diskless-sync-delay", "0")
    with EmbeddedRedis(data_dir=directory / "primary", password=password, extra_args=primary_args) as primary:
        replica_of = ("--replicaof", "127.0.0.1", str(primary.port), *auth)
        with EmbeddedRedis(
            data_dir=directory / "replica", password=password, extra_args=replica_of
        ) as replica:
            wait_until(
                lambda: _info(replica, "replication").get("master_link_status") == "up", 20, "replica in sync"
            )
            yield Replicated(primary, replica)


# ---------------------------------------------------------------------------- Sentinel


class SentinelNode:
    """``redis-server sentinel.conf --sentinel`` on a free port; it rewrites its own conf file."""

    def __init__(
        self, directory: Path, monitor: tuple[str, int], master: str, passwords: tuple[str, str]
    ) -> None:
        self.port = free_port()
        self.dir = directory
        self.conf = directory / "sentinel.conf"
        self.password = passwords[1] or None
        host, port = monitor
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {directory}",
            f"logfile {directory / 'sentinel.log'}",
            f"sentinel monitor {master} {host} {port} 2",
            f"sentinel down-after-milliseconds {master} 1000",
            f"sentinel failover-timeout {master} 3000",
            f"sentinel parallel-syncs {master} 1",
        ]
        if passwords[0]:
            lines.append(f"sentinel auth-pass {master} {passwords[0]}")
        if passwords[1]:
            lines.append(f"requirepass {passwords[1]}")  # also what sentinels use with each other
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self.conf.write_text("\n".join(lines) + "\n")

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2)

    def start(self) -> SentinelNode:
        self.process = subprocess.Popen(
            [find_redis_server(), str(self.conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = self.client()
        try:
            wait_until(lambda: _answers(client), 10, f"sentinel on {self.port} answering")
        finally:
            client.close()
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@dataclass
class SentinelSet:
    """A primary, its replica and three sentinels monitoring it as ``master`` (quorum 2, 1 s to down)."""

    servers: Replicated
    sentinels: list[SentinelNode]
    master: str
    master_password: str
    sentinel_password: str

    @property
    def nodes(self) -> str:
        """``GENQ_REDIS_SENTINELS``."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def env(self) -> dict[str, str]:
        """The ``GENQ_REDIS_*`` settings that reach this set."""
        return {
            "GENQ_REDIS_SENTINELS": self.nodes,
            "GENQ_REDIS_SENTINEL_MASTER": self.master,
            "GENQ_REDIS_SENTINEL_PASSWORD": self.sentinel_password,
            "GENQ_REDIS_SENTINEL_MASTER_PASSWORD": self.master_password,
        }

    def primary_port(self) -> int | None:
        """Where the sentinels say the primary is (the first one that answers)."""
        for node in self.sentinels:
            client = node.client()
            try:
                addr = client.sentinel_get_master_addr_by_name(self.master)
            except redis.RedisError:
                continue
            finally:
                client.close()
            if addr:
                return int(addr[1])
        return None

    def kill_primary(self, timeout: float = 30.0) -> None:
        """SIGKILL the primary and wait until the sentinels have promoted the replica and it accepts
        writes."""
        old = self.servers.primary
        old.kill()
        replica = self.servers.replica
        # Every sentinel, since a client may ask any of them (redis-py skips one that still sees a
        # primary down, and fails when none sees one up).
        wait_until(
            lambda: all(_names(n, self.master, replica.port) for n in self.sentinels), timeout, "promoted"
        )
        wait_until(
            lambda: _info(replica, "replication").get("role") == "master", timeout, "replica a primary"
        )
        self.servers = Replicated(replica, old)


def _names(node: SentinelNode, master: str, port: int) -> bool:
    """Whether ``node`` names the server on ``port`` as the primary, up."""
    client = node.client()
    try:
        state = client.sentinel_master(master)
    except redis.RedisError:
        return False
    finally:
        client.close()
    return bool(
        state["port"] == port and state["is_master"] and not state["is_sdown"] and not state["is_odown"]
    )


def _ready(node: SentinelNode, master: str) -> bool:
    client = node.client()
    try:
        state = client.sentinel_master(master)
    except redis.RedisError:
        return False
    finally:
        client.close()
    # Each must know the replica and both other sentinels, or a failover could not be voted.
    return int(state.get("num-slaves", 0)) >= 1 and int(state.get("num-other-sentinels", 0)) >= 2


@contextlib.contextmanager
def sentinel_set(
    directory: Path, master: str = "mymaster", master_password: str = "", sentinel_password: str = ""
) -> Iterator[SentinelSet]:
    """The whole set, once every sentinel knows the replica and the other sentinels."""
    with replicated(directory, master_password or None) as servers:
        nodes = [
            SentinelNode(
                directory / f"sentinel-{i}",
                ("127.0.0.1", servers.primary.port),
                master,
                (master_password, sentinel_password),
            )
            for i in range(3)
        ]
        try:
            for node in nodes:
                node.start()
            for node in nodes:
                wait_until(lambda node=node: _ready(node, master), 30, "sentinels aware of each other")
            yield SentinelSet(servers, nodes, master, master_password, sentinel_password)
        finally:
            for node in nodes:
                node.stop()
