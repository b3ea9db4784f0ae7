"""genqueue's worker app with cProfile in every pool child: ``celery -A benchmarks.profiled_app worker``.

Each child profiles from its start to its (warm) shutdown and dumps ``child-<pid>.prof`` into
``BENCH_PROFILE_DIR``. Used for a separate small run only, never for the timed ones.
"""

from __future__ import annotations

import cProfile
import os
from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown

from genq.worker.celery_app import app

__all__ = ["app"]

_profile: cProfile.Profile | None = None


@worker_process_init.connect(weak=False)
def _start(**_: Any) -> None:
    global _profile
    _profile = cProfile.Profile()
    _profile.enable()


@worker_process_shutdown.connect(weak=False)
def _dump(**_: Any) -> None:
    if _profile is None:
        return
    _profile.disable()
    directory = os.environ.get("BENCH_PROFILE_DIR", ".")
    _profile.dump_stats(os.path.join(directory, f"child-{os.getpid()}.prof"))
