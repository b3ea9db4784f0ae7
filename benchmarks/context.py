"""What every benchmark gets: the size (quick or full), a work directory, a logger, and helpers to
submit and follow jobs through genqueue's producer and the baseline app."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from benchmarks.harness import ENVIRON, Stack
from genq import keys
from genq.ledger import as_text, state_counts
from genq.producer import Producer
from genq.schemas import JobRecord
from genq.settings import Settings, load_settings


@dataclass
class Context:
    quick: bool
    workdir: Path
    sim_capacity: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def log(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        sys.stderr.write(f"[{elapsed:7.1f}s] {message}\n")
        sys.stderr.flush()

    def size(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full


def settings_for(stack: Stack, env: dict[str, str]) -> Settings:
    """genqueue settings exactly as its workers will read them (the stack's env plus ``env``).

    Read from a patched ``os.environ``, one call at a time: two sides' threads calling at once made
    one read the environment while the other replaced it (a KeyError in pydantic-settings), and a
    process started meanwhile would get the patched one (see ``harness.environ``)."""
    import os
    from unittest import mock

    from genq.settings import get_settings

    with ENVIRON:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
        with mock.patch.dict(os.environ, {**clean, **stack.env, **env}, clear=True):
            get_settings.cache_clear()
            try:
                return load_settings()
            finally:
                get_settings.cache_clear()


def producer_for(stack: Stack, env: dict[str, str]) -> Producer:
    return Producer(settings_for(stack, env))


def counts(client: redis.Redis) -> dict[str, int]:
    return state_counts(client.hgetall(keys.COUNTS))


def terminal_count(client: redis.Redis, kinds: Sequence[str] = ("image",)) -> int:
    terminal = ("succeeded", "failed", "timed_out", "cancelled", "submit_unknown", "rejected")
    c = counts(client)
    return sum(c.get(f"{k}:{s}", 0) for k in kinds for s in terminal)


def succeeded_count(client: redis.Redis, kinds: Sequence[str] = ("image",)) -> int:
    c = counts(client)
    return sum(c.get(f"{k}:succeeded", 0) for k in kinds)


def records(client: redis.Redis, ids: Sequence[str]) -> list[JobRecord]:
    out: list[JobRecord] = []
    for start in range(0, len(ids), 1000):
        pipe = client.pipeline(transaction=False)
        for job_id in ids[start : start + 1000]:
            pipe.hgetall(f"genq:job:{job_id}")
        for raw in pipe.execute():
            if raw:
                out.append(JobRecord.from_hash({as_text(k): as_text(v) for k, v in raw.items()}))
    return out


def wait_terminal(
    ctx: Context, client: redis.Redis, n: int, timeout: float, kinds: Sequence[str] = ("image",)
) -> bool:
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        done = terminal_count(client, kinds)
        if done >= n:
            return True
        if done != last and int(time.monotonic()) % 10 == 0:
            last = done
        time.sleep(0.05)
    ctx.log(f"timeout: {terminal_count(client, kinds)}/{n} terminal after {timeout:.0f}s")
    return False


def wait_done(ctx: Context, client: redis.Redis, n: int, timeout: float, key: str = "bench:done") -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.zcard(key) >= n:
            return True
        time.sleep(0.05)
    ctx.log(f"timeout: {client.zcard(key)}/{n} baseline jobs done after {timeout:.0f}s")
    return False


def done_times(client: redis.Redis, key: str = "bench:done") -> list[float]:
    return [float(score) for _, score in client.zrange(key, 0, -1, withscores=True)]
