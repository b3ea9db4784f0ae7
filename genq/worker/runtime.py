"""The services of this worker process, built once per process on first use.

Prefork children are forked from the main process; a Redis or HTTP connection made before the fork
must not be shared, so the graph is rebuilt when the pid changes.
"""

from __future__ import annotations

import os
import threading

from genq.services import Services
from genq.settings import get_settings

_lock = threading.Lock()
_services: Services | None = None
_pid = 0


def services() -> Services:
    global _services, _pid
    if _services is None or _pid != os.getpid():
        with _lock:
            if _services is None or _pid != os.getpid():
                _services = Services.build(get_settings())
                _pid = os.getpid()
    return _services


def reset() -> None:
    global _services
    with _lock:
        if _services is not None and _pid == os.getpid():
            _services.close()
        _services = None
