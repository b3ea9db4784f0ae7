"""How far behind a queue is, read from the broker: when the oldest message still waiting in each
lane's list of that queue was sent (its ``genq_sent_at`` stamp, :data:`genq.metrics.SENT_AT_HEADER`).

The sweeper uses it, for the submit queue and the poll queue, to leave alone a job whose message is
still waiting in that queue: kombu keeps a queue as a Redis list taken oldest first, so a message sent
after the oldest one still waiting has not been taken yet, and a second message for the job would only
wait behind it. Without this, a backlog longer than the sweep grace made the sweeper send every queued
job again, and each re-drive made the waiting message stale, so a long enough backlog spent its time on
stale messages.
"""

from __future__ import annotations

import json
import logging

import redis

from genq.celeryconf import BATCH_PRIORITY, SUBMIT
from genq.ledger import QueuedSince
from genq.metrics import SENT_AT_HEADER

log = logging.getLogger(__name__)


def batch_list(queue: str) -> str:
    """kombu's list for a queue's batch-priority messages (``queue + sep + priority``)."""
    return f"{queue}\x06\x16{BATCH_PRIORITY}"


class QueueBacklog:
    """Reads :class:`QueuedSince` for one queue from a Redis broker; ``client`` None (RabbitMQ)
    always answers unknown, and so does any error: the sweeper then re-drives as if there were no
    backlog."""

    def __init__(self, client: redis.Redis | None, queue: str = SUBMIT) -> None:
        self.client = client
        self.queue = queue

    def __call__(self) -> QueuedSince:
        if self.client is None:
            return QueuedSince()
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.lindex(self.queue, -1)
            pipe.lindex(batch_list(self.queue), -1)
            interactive, batch = pipe.execute()
        except redis.RedisError as exc:
            log.debug("%s backlog unknown: %s", self.queue, exc)
            return QueuedSince()
        return QueuedSince(_sent_at(interactive), _sent_at(batch))


def _sent_at(raw: bytes | None) -> float | None:
    if raw is None:
        return None
    try:
        return float(json.loads(raw)["headers"][SENT_AT_HEADER])
    except (ValueError, KeyError, TypeError):
        return None  # not stamped (sent by another client): unknown
