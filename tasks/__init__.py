"""The tasks, where an operator looks for them: they live in :mod:`genq.worker.tasks`, thin Celery
tasks over the plain services of :mod:`genq.jobs`, :mod:`genq.training` and :mod:`genq.callbacks`."""
