"""Configuration, where an operator looks for it. The code lives in :mod:`genq.settings` (typed settings
from ``GENQ_*`` env vars and ``.env``; every one is listed in docs/settings.md) and
:mod:`genq.celeryconf` (the Celery config derived from them), so that an installed genqueue puts nothing
but ``genq`` on ``sys.path``; these modules re-export them for a checkout."""

from genq.settings import Settings, get_settings

__all__ = ["Settings", "get_settings"]
