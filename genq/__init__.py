"""genqueue: reliable work on an asynchronous AI generation API, on Celery and Redis.

Producer apps import :mod:`genq.producer`; workers run ``celery -A genq.worker worker -Q ...``.

The modules stay flat, one concern each, so an import names what it uses (``genq.ledger``, not
``genq.core.store.ledger``); the layers, from the outside in:

- **Public API**: ``producer`` (submit, follow, cancel), ``errors`` (the one error tree), ``schemas``
  (typed requests, upstream payloads and ledger records), ``settings``, ``cli``, ``demo``.
- **Pipeline steps** (plain Python, no Celery; each returns the ``actions`` to take next): ``intake``
  (validate and record), ``control`` (cancel, resubmit), ``jobs`` (submit, poll, download, finalize),
  ``training``, ``workflows``, ``callbacks``, ``sweeper``; their rules: ``retry``, ``polling``,
  ``schedule`` and ``durations`` (when to poll), ``clock`` (Redis's time).
- **Ledger**: ``ledger`` and ``model_ledger`` (records changed only by compare-and-set Lua scripts),
  ``keys`` (every Redis key), ``limits`` (the shared rate limit).
- **Upstream and downloads**: ``api``, ``downloads``, ``netguard`` (the SSRF guard), ``wallclock``.
- **Operations**: ``celeryconf`` (task names, queues, Celery config), ``services`` (connections and the
  per-process service graph), ``worker/`` (the Celery app and thin tasks), ``metrics``, ``exporter``,
  ``health``, ``logs``, ``watch``, ``dashboard/``, ``processes`` and ``embedded`` (child processes and a
  private redis-server), ``simulator/`` (the upstream, for development and tests).
"""

__version__ = "0.1.0"
