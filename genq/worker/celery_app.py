"""Builds the Celery app from settings. Invalid settings stop the process with a readable message."""

from __future__ import annotations

from celery import Celery

from genq.celeryconf import celery_config
from genq.settings import Settings, SettingsError, get_settings


def create_app(settings: Settings | None = None) -> Celery:
    if settings is None:
        try:
            settings = get_settings()
        except SettingsError as exc:
            raise SystemExit(str(exc)) from None
    app = Celery(
        "genqueue", include=["genq.worker.tasks"], set_as_current=True, task_cls="genq.worker.base:GenqTask"
    )
    app.conf.update(celery_config(settings))
    from genq.worker import kombu_fix, signals  # noqa: F401  (signals connects the worker signal handlers)

    kombu_fix.install()

    return app


app = create_app()
