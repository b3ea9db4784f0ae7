"""The Celery app: ``celery -A workers worker -Q submit,poll,download``."""

from workers.celery_app import app

__all__ = ["app"]
