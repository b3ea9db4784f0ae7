"""Re-exports :mod:`genq.celeryconf`, where the Celery configuration is derived from the settings."""

from genq.celeryconf import QUEUES, TASK_QUEUES, celery_config

__all__ = ["QUEUES", "TASK_QUEUES", "celery_config"]
