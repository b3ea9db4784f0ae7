"""Chaos runs use a Redis that fsyncs every write, so a SIGKILLed Redis loses nothing it acknowledged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from genq.embedded import EmbeddedRedis


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(data_dir=tmp_path / "redis", appendfsync="always") as server:
        yield server
