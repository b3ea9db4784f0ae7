"""genqueue's worker app with one safety step switched off, to measure what it costs: benchmark only.

``BENCH_ABLATE=fsync`` makes ``os.fsync`` a no-op in the worker; ``BENCH_ABLATE=sha256`` gives
``genq.downloads`` a hash object that hashes nothing. ``celery -A benchmarks.ablation_app worker``.
"""

from __future__ import annotations

import os
import types
from typing import Any

from genq import downloads
from genq.worker.celery_app import app

__all__ = ["app"]


class _NoHash:
    def update(self, data: Any) -> None:
        pass

    def hexdigest(self) -> str:
        return "0" * 64


_ablate = os.environ.get("BENCH_ABLATE", "")
if "fsync" in _ablate:
    os.fsync = lambda fd: None
if "sha256" in _ablate:
    downloads.hashlib = types.SimpleNamespace(sha256=_NoHash)  # type: ignore[assignment]
