"""genqueue: reliable work on an asynchronous AI generation API, on Celery and Redis.

Producer apps import :mod:`genq.producer`; workers run ``celery -A genq.worker worker -Q ...``.
"""

__version__ = "0.1.0"
