"""Fixtures shared by the unit tests (no network, no Redis)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from genq.settings import ENV_PREFIX, get_settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No ``GENQ_*`` variable from the outside, an empty cwd (no stray ``.env``), a fresh settings cache."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()
