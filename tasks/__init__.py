"""Thin Celery tasks over :mod:`genq.jobs`. Each task takes ids, runs one service step, dispatches."""
