"""Kept so ``tasks.jobs`` still names the task module in a checkout; see :mod:`genq.worker.tasks`."""

from genq.worker.tasks import dispatch

__all__ = ["dispatch"]
