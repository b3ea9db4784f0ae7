"""How far behind the submit queue is, read from the broker: when the oldest message still waiting in
each lane's submit list was sent (its ``genq_sent_at`` stamp, :data:`genq.metrics.SENT_AT_HEADER`).

The sweeper uses it to leave alone a pending job whose submit message is still waiting in that queue:
kombu keeps a queue as a Redis list taken oldest first, so a message sent after the oldest one still
waiting has not been taken yet, and a second message for the job would only wait behind it. Without
this, a backlog longer than the sweep grace made the sweeper send every queued job again, and each
re-drive made the waiting message stale, so a long enough backlog spent its time on stale messages.
"""

from __future__ import annotations

import json
import logging

import redis

from genq.celeryconf import BATCH_PRIORITY, SUBMIT
from genq.ledger import QueuedSince
from genq.metrics import SENT_AT_HEADER

log = logging.getLogger(__name__)

BATCH_LIST = f"{SUBMIT}\x06\x16{BATCH_PRIORITY}"
"""kombu's list for the submit queue's batch-priority messages (``queue + sep + priority``)."""


class SubmitBacklog:
    """Reads :class:`QueuedSince` from a Redis broker; ``client`` None (RabbitMQ) always answers
    unknown, and so does any error: the sweeper then re-drives as if there were no backlog."""

    def __init__(self, client: redis.Redis | None) -> None:
        self.client = client

    def __call__(self) -> QueuedSince:
        if self.client is None:
            return QueuedSince()
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.lindex(SUBMIT, -1)
            pipe.lindex(BATCH_LIST, -1)
            interactive, batch = pipe.execute()
        except redis.RedisError as exc:
            log.debug("submit backlog unknown: %s", exc)
            return QueuedSince()
        return QueuedSince(_sent_at(interactive), _sent_at(batch))


def _sent_at(raw: bytes | None) -> float | None:
    if raw is None:
        return None
    try:
        return float(json.loads(raw)["headers"][SENT_AT_HEADER])
    except (ValueError, KeyError, TypeError):
        return None  # not stamped (sent by another client): unknown
