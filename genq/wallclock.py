"""A wall-clock limit on a whole HTTP exchange.

``requests`` timeouts bound each socket operation, not the exchange: a peer that drips a byte per
second never trips a 3-second read timeout and can hold the thread for ever. On a prefork worker
Celery's time limit would end it, but not on the threads pool. So a call made under :class:`Limit`
has every connection it takes from the pool registered, and when the time is up a timer shuts those
sockets down: the blocked read returns at once and the call fails.

Only sessions whose pools register their connections are bounded: those from :func:`session` and
:func:`genq.netguard.guarded_session`.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import socket
import threading
import time
from types import TracebackType
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_active = threading.local()
_RECUT_SECONDS = 0.2


class Limit:
    """``with Limit(seconds): session.request(...)``; afterwards ``expired`` says whether it cut."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self.done = False
        self._conns: list[Any] = []
        self._lock = threading.Lock()

    def __enter__(self) -> Limit:
        _active.limit = self
        _WATCHDOG.add(time.monotonic() + self.seconds, self)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._lock:
            self.done = True  # the watchdog drops it lazily
        _active.limit = None

    def track(self, conn: Any) -> None:
        with self._lock:
            self._conns.append(conn)

    def cut(self) -> bool:
        """Shut the call's sockets down; True while the call is still running (look again later:
        a connection still being opened has no socket yet)."""
        with self._lock:
            if self.done:
                return False
            self.expired = True
            for conn in self._conns:
                sock = getattr(conn, "sock", None)
                if isinstance(sock, socket.socket):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
            return True


class _Watchdog:
    """One thread per process for every limit (a timer thread per call would cost more than the
    call's own work); started lazily, and again in a forked child, which inherits no threads."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Limit]] = []
        self._cond = threading.Condition()
        self._pid = 0
        self._seq = 0

    def add(self, at: float, limit: Limit) -> None:
        with self._cond:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._heap.clear()
                threading.Thread(target=self._run, name="genq-wallclock", daemon=True).start()
            self._seq += 1
            heapq.heappush(self._heap, (at, self._seq, limit))
            if self._heap[0][2] is limit:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].done or self._heap[0][0] <= now):
                    _at, seq, limit = heapq.heappop(self._heap)
                    if not limit.done and limit.cut():
                        heapq.heappush(self._heap, (now + _RECUT_SECONDS, seq, limit))
                        break
                self._cond.wait(self._heap[0][0] - now if self._heap else None)


_WATCHDOG = _Watchdog()


def tracking(pool: type[HTTPConnectionPool]) -> type[HTTPConnectionPool]:
    """``pool`` that registers each connection it hands out with the thread's active :class:`Limit`."""

    class Tracking(pool):  # type: ignore[valid-type,misc]
        def _get_conn(self, timeout: float | None = None) -> Any:
            conn = super()._get_conn(timeout)
            limit = getattr(_active, "limit", None)
            if limit is not None:
                limit.track(conn)
            return conn

    Tracking.__name__ = f"Tracking{pool.__name__}"
    return Tracking


class TrackingAdapter(HTTPAdapter):
    """A plain adapter whose connections a :class:`Limit` can cut."""

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **kw: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **kw)
        self.poolmanager.pool_classes_by_scheme = {
            "http": tracking(HTTPConnectionPool),
            "https": tracking(HTTPSConnectionPool),
        }


def session() -> requests.Session:
    """A Session whose calls :class:`Limit` bounds."""
    s = requests.Session()
    adapter = TrackingAdapter()
    s.mount("https://", adapter)
    s.mount("http://", adapter)
    return s
