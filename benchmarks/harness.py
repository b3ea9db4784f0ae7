"""The services a benchmark runs against, all local and all stopped on exit: a private Redis
(EmbeddedRedis, never the one on 6379), the upstream simulator (with benchmark-only bulk routes, see
:mod:`benchmarks.simserver`), real ``celery worker`` / ``beat`` processes of genqueue or of the baseline
app, and helpers to measure them (RSS, Redis memory, waits)."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import redis
import requests

from genq.celeryconf import QUEUES
from genq.embedded import EmbeddedRedis
from genq.processes import BeatProcess, WorkerProcess
from genq.simulator import SimConfig, SimulatorProcess

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_POOLS: list[dict[str, Any]] = [  # README "Running workers" and docker-compose: a worker a pool
    {"queues": ["submit"], "concurrency": 2, "pool": "prefork"},
    {"queues": ["poll"], "concurrency": 4, "pool": "prefork"},
    {"queues": ["download"], "concurrency": 8, "pool": "threads"},
    {"queues": ["training"], "concurrency": 1, "pool": "prefork"},
]


ENVIRON = threading.Lock()
"""Held while ``os.environ`` is read or patched (``context.settings_for`` patches it to read genqueue's
settings): a thread that copies it while another has replaced it gets a partial environment."""


def environ() -> dict[str, str]:
    """A copy of ``os.environ``, never one taken while it is patched."""
    with ENVIRON:
        return dict(os.environ)


def in_parallel(*calls: Callable[[], object]) -> list[object]:
    """Run ``calls`` at once, each in a thread; their results in order, or the first one's error
    once all are done."""
    with ThreadPoolExecutor(max(1, len(calls))) as pool:
        futures = [pool.submit(call) for call in calls]
    return [f.result() for f in futures]


class Stoppable(Protocol):
    def stop(self) -> Any: ...


# ------------------------------------------------------------------ every process is stopped on exit

_lock = threading.Lock()
_live: list[Stoppable] = []


def track(thing: Stoppable) -> None:
    with _lock:
        _live.append(thing)


def untrack(thing: Stoppable) -> None:
    with _lock:
        if thing in _live:
            _live.remove(thing)


def stop_all() -> None:
    """Stop everything still running, newest first. Safe to call more than once."""
    while True:
        with _lock:
            if not _live:
                return
            thing = _live.pop()
        with contextlib.suppress(Exception):
            thing.stop()


def _on_signal(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def install_cleanup() -> None:
    """Stop every tracked process at exit, on Ctrl-C and on SIGTERM/SIGHUP (raised as KeyboardInterrupt
    so ``finally`` blocks run first)."""
    atexit.register(stop_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, _on_signal)


# ------------------------------------------------------------------ simulator with bulk routes


class BenchSimulator(SimulatorProcess):
    """The project's simulator plus the ``/_bench/*`` routes of :mod:`benchmarks.simserver`."""

    def bulk_create(self, count: int, kind: str = "image", duration: float = 3600.0) -> list[str]:
        ids: list[str] = []
        while len(ids) < count:
            n = min(20_000, count - len(ids))
            answer = self._control("POST", "/_bench/bulk", {"count": n, "kind": kind, "duration": duration})
            ids += answer["ids"]
        return ids

    def truth(self) -> dict[str, dict[str, Any]]:
        """Every job: kind, created (monotonic), duration, GETs and their times (monotonic)."""
        result: dict[str, dict[str, Any]] = self._control("GET", "/_bench/truth")["jobs"]
        return result

    def stop(self, timeout: float = 5.0) -> int | None:
        untrack(self)
        return super().stop(timeout)


def start_bench_simulator(config: SimConfig, timeout: float = 15) -> BenchSimulator:
    log_dir = Path(tempfile.mkdtemp(prefix="genq-bench-sim-"))
    env = environ()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "benchmarks.simserver", "--config-json", json.dumps(config.model_dump())]
    with open(log_dir / "stdout", "wb") as out, open(log_dir / "stderr", "wb") as err:
        popen = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=ROOT)
    deadline = time.monotonic() + timeout
    while True:
        text = (log_dir / "stdout").read_text(errors="replace")
        for line in text.splitlines(keepends=True):
            if line.startswith("SIMULATOR LISTENING ") and line.endswith("\n"):
                sim = BenchSimulator(popen, line.split(" ", 2)[2].strip(), config, log_dir)
                track(sim)
                return sim
        if popen.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                popen.kill()
            popen.wait()
            raise RuntimeError(f"bench simulator did not start: {(log_dir / 'stderr').read_text()[-2000:]}")
        time.sleep(0.02)


# ------------------------------------------------------------------ Celery processes


class BenchWorker(WorkerProcess):
    """A ``celery worker`` of any app (genqueue's ``workers`` or a benchmark app), tracked for cleanup."""

    def __init__(
        self, env: Mapping[str, str], *, app: str = "genq.worker", loglevel: str = "INFO", **kwargs: Any
    ) -> None:
        super().__init__(env, cwd=ROOT, **kwargs)
        self.args[self.args.index("-A") + 1] = app
        self.args[self.args.index("-l") + 1] = loglevel

    def start(self, timeout: float = 60.0) -> BenchWorker:
        track(self)
        super().start(timeout)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        untrack(self)
        super().stop(timeout)

    def kill(self) -> None:
        untrack(self)
        super().kill()


class BenchBeat(BeatProcess):
    def __init__(self, env: Mapping[str, str], *, log_path: Path) -> None:
        super().__init__(env, log_path=log_path, cwd=ROOT)

    def start(self, timeout: float = 60.0) -> BenchBeat:
        track(self)
        super().start(timeout)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        untrack(self)
        super().stop(timeout)

    def kill(self) -> None:
        untrack(self)
        super().kill()


class TrackedRedis(EmbeddedRedis):
    def start(self, timeout: float = 10.0) -> TrackedRedis:
        track(self)
        super().start(timeout)
        return self

    def stop(self) -> None:
        super().stop()

    def close(self) -> None:
        untrack(self)
        super().close()


# ------------------------------------------------------------------ the stack


class Stack:
    """One private Redis, one simulator, the GENQ_* environment pointing at them, and the Celery
    processes started on them; ``close`` stops all of it."""

    def __init__(self, sim_config: SimConfig, workdir: Path, name: str) -> None:
        self.workdir = workdir
        self.name = name
        workdir.mkdir(parents=True, exist_ok=True)
        # Both take a moment to boot and need nothing of each other. One that fails leaves the other
        # tracked, so stop_all still ends it.
        with ThreadPoolExecutor(2) as pool:
            redis_started = pool.submit(
                TrackedRedis(data_dir=workdir / "redis", appendfsync="everysec").start
            )
            sim_started = pool.submit(start_bench_simulator, sim_config)
            self.redis_server = redis_started.result()
            self.sim = sim_started.result()
        self.redis = redis.Redis.from_url(self.redis_server.url, socket_timeout=60)
        self.processes: list[WorkerProcess] = []
        self._started = 0
        self.download_dir = workdir / "downloads"
        self.env: dict[str, str] = {
            "GENQ_REDIS_URL": self.redis_server.url,
            "GENQ_API_BASE_URL": self.sim.url,
            "GENQ_API_KEY": self.sim.api_key,
            "GENQ_DOWNLOAD_DIR": str(self.download_dir),
            "GENQ_DOWNLOAD_ALLOW_HTTP": "true",
            "GENQ_DOWNLOAD_ALLOW_PRIVATE": "true",  # the simulator serves files from 127.0.0.1
            # Stopping a worker between runs should not wait for held countdowns (measures nothing).
            "GENQ_WORKER_SOFT_SHUTDOWN_TIMEOUT": "0",
            # The baseline app reads these (it imports nothing of genqueue's settings).
            "BENCH_REDIS_URL": self.redis_server.url,
            "BENCH_API_URL": self.sim.url,
            "BENCH_API_KEY": self.sim.api_key,
            "BENCH_DOWNLOAD_DIR": str(workdir / "baseline-downloads"),
        }

    def _next(self) -> int:
        self._started += 1
        return self._started

    def process_env(self, **extra: str) -> dict[str, str]:
        clean = {k: v for k, v in environ().items() if not k.startswith(("GENQ_", "BENCH_"))}
        return {**clean, **self.env, **extra, "PYTHONPATH": str(ROOT)}

    def worker(
        self,
        queues: Sequence[str] = QUEUES,
        concurrency: int = 2,
        pool: str = "prefork",
        app: str = "genq.worker",
        env: Mapping[str, str] | None = None,
        start: bool = True,
        extra_args: Sequence[str] = (),
        loglevel: str = "INFO",
    ) -> BenchWorker:
        worker = BenchWorker(
            self.process_env(**(env or {})),
            app=app,
            loglevel=loglevel,
            queues=queues,
            concurrency=concurrency,
            pool=pool,
            log_path=self.workdir / f"{app.replace('.', '-')}-{self._next()}.log",
            extra_args=extra_args,
        )
        self.processes.append(worker)
        return worker.start() if start else worker

    def workers(
        self, specs: Sequence[dict[str, Any]], beat_env: Mapping[str, str] | None = None
    ) -> list[BenchWorker]:
        """Start several workers at once, and beat with them if ``beat_env`` is given (each takes
        seconds to boot; one after the other, a benchmark waits for the sum)."""
        made: list[WorkerProcess] = [self.worker(start=False, **spec) for spec in specs]
        if beat_env is not None:
            made.append(self.beat(env=beat_env, start=False))
        in_parallel(*(w.start for w in made))
        return [w for w in made if isinstance(w, BenchWorker)]

    def beat(self, env: Mapping[str, str] | None = None, start: bool = True) -> BenchBeat:
        beat = BenchBeat(self.process_env(**(env or {})), log_path=self.workdir / f"beat-{self._next()}.log")
        self.processes.append(beat)
        return beat.start() if start else beat

    def stop_processes(self, graceful: bool = False) -> None:
        """End every Celery process of this stack, all at once.

        Killed unless ``graceful``: by then the run's figures are read, and a warm shutdown measures
        nothing but costs a second or more per process on a loaded machine. ``graceful`` is for
        processes that write something on their way out (cProfile dumps)."""

        def stop(proc: WorkerProcess) -> None:
            with contextlib.suppress(Exception):
                if graceful:
                    proc.stop(timeout=15)
                else:
                    proc.kill()

        in_parallel(*(lambda p=p: stop(p) for p in self.processes))
        self.processes.clear()

    def reset(self) -> None:
        """Stop the Celery processes and empty Redis and the simulator's counters, for the next run."""
        self.stop_processes()
        self.redis.flushall()
        self.sim.reset_stats()

    def close(self) -> None:
        self.stop_processes()
        with contextlib.suppress(Exception):
            self.redis.close()
        with contextlib.suppress(Exception):
            self.sim.stop()
        with contextlib.suppress(Exception):
            self.redis_server.close()


@contextlib.contextmanager
def stack(sim_config: SimConfig, workdir: Path, name: str) -> Iterator[Stack]:
    s = Stack(sim_config, workdir, name)
    try:
        yield s
    finally:
        s.close()


@contextlib.contextmanager
def stacks(*specs: tuple[SimConfig, Path, str]) -> Iterator[list[Stack]]:
    """Several stacks (one per side of a benchmark), booted at once."""
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = [pool.submit(Stack, *spec) for spec in specs]
    made: list[Stack] = []
    try:
        for f in futures:
            made.append(f.result())
        yield made
    finally:
        in_parallel(*(one.close for one in made))  # close never raises


# ------------------------------------------------------------------ measuring


def _tree(pids: Sequence[int]) -> Iterator[Any]:
    """These processes and all their descendants, each once (``psutil.Process``)."""
    import psutil

    seen: set[int] = set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            if p.pid not in seen:
                seen.add(p.pid)
                yield p


def tree_rss(pids: Sequence[int], kind: str = "rss") -> int:
    """Memory of these processes and all their descendants, in bytes: ``rss`` (resident, counting
    pages shared after fork once per process) or ``pss`` (proportional: shared pages split)."""
    import psutil

    total = 0
    for p in _tree(pids):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_full_info().pss if kind == "pss" else p.memory_info().rss
    return total


def tree_cpu(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) used so far by these processes and all their descendants.

    Read before and after a timed run, the difference is what the run cost those processes; pool
    children live for the whole run, so nothing they used is lost with a reaped child."""
    import psutil

    total = 0.0
    for p in _tree(pids):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


# The harness's own queries, not the system's work.
_HARNESS_COMMANDS = frozenset({"info", "config|get", "config|set", "monitor", "flushall", "dbsize"})


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Calls per command since Redis started (``INFO commandstats``), those run inside Lua scripts
    included: the difference of two readings is everything a run made Redis do."""
    out: dict[str, int] = {}
    for key, value in client.info("commandstats").items():
        name = str(key).removeprefix("cmdstat_")
        if name not in _HARNESS_COMMANDS:
            out[name] = int(value["calls"])
    return out


def calls_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}


def process_rss(pid: int) -> int:
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.NoSuchProcess:
        return 0


class RssSampler:
    """Samples the RSS of a process tree in a thread; ``peak`` is the highest seen."""

    def __init__(self, pids: Sequence[int], interval: float = 0.05) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pids))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def settle_memory(client: redis.Redis, seconds: float = 1.0) -> int:
    """Redis used_memory after a short pause (lazy frees and client buffers settle)."""
    time.sleep(seconds)
    return used_memory(client)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05, what: str = "") -> bool:
    """Poll ``predicate`` until true or ``timeout``; returns whether it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def sim_headroom(peak_rate: float | None, capacity: float | None) -> float | None:
    """The simulator's peak 1-second request rate as a fraction of what it served alone."""
    if not peak_rate or not capacity:
        return None
    return peak_rate / capacity


def http_get(url: str, timeout: float = 10.0) -> Any:
    response = requests.get(url, timeout=timeout)
    response.raise_for_status()
    return response.json()
