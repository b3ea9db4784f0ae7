"""The worker side: the Celery app (``celery -A genq.worker worker -Q submit,poll,download,training``),
its task base, the tasks and the per-process services. Producers never import this package."""

from genq.worker.celery_app import app

__all__ = ["app"]
