"""The Celery app, where an operator looks for it: ``celery -A workers worker -Q ...`` from a checkout
is the same as ``celery -A genq.worker worker -Q ...`` (the code lives in :mod:`genq.worker`, so an
installed genqueue puts nothing but ``genq`` on ``sys.path``)."""

from genq.worker import app

__all__ = ["app"]
