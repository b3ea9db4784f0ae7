"""Every Redis key genqueue writes, in one place. All keys share one prefix."""

from __future__ import annotations

PREFIX = "genq"

EVENTS = f"{PREFIX}:events"
"""Stream: one entry per job state transition."""
JOBS = f"{PREFIX}:jobs"
"""Sorted set: every job id by creation time (listing)."""
DUE = f"{PREFIX}:due"
"""Sorted set: every unfinished job id by the time its next step is due (the sweeper's index)."""
CALLBACKS_DUE = f"{PREFIX}:callbacks:due"
"""Sorted set: jobs whose completion callback is still to be delivered, by when it is due."""
EXPIRING = f"{PREFIX}:expiring"
"""Sorted set: ended job ids by when their records expire, so :data:`JOBS` and the due indexes are
trimmed of them (:meth:`genq.ledger.Ledger.trim`)."""
COUNTS = f"{PREFIX}:counts"
"""Hash: ``<kind>:<state>`` -> number of jobs in that state."""

MODELS = f"{PREFIX}:models"
"""Sorted set: every model genqueue has trained, by first request time."""
MODELS_DUE = f"{PREFIX}:models:due"
"""Sorted set: models in training by the time their next step is due (the sweeper's index)."""
SWEEP_LOCK = f"{PREFIX}:sweep:lock"
"""String with a short TTL: a sweep is running or just ran, so a sweep message arriving now (a
backlog of them, or two beats) does nothing."""
DURABLE_MARK = f"{PREFIX}:durable:mark"
"""String written just before a WAIT by :meth:`genq.ledger.Ledger.make_durable` (its value: when)."""
SWEEP_LAST = f"{PREFIX}:sweep:last"
"""String: when the sweeper last ran (Unix time), for health checks."""
METRICS = f"{PREFIX}:metrics"
"""Hash: counters the workers add to and ``genq metrics`` exports (upstream latency buckets and
errors, downloads, rate-limit waits); :mod:`genq.metrics` names the fields."""
JOB_PREFIX = f"{PREFIX}:job:"
MODEL_PREFIX = f"{PREFIX}:model:"

EVENTS_MAXLEN = 100_000
"""Approximate cap on the event stream."""


def job(job_id: str) -> str:
    """Hash: the job record."""
    return f"{JOB_PREFIX}{job_id}"


def job_urls(job_id: str) -> str:
    """Hash: output index -> download URL. Kept apart because URLs can carry tokens."""
    return f"{PREFIX}:job:{job_id}:urls"


def idempotency(key: str) -> str:
    """String: producer idempotency key -> job id."""
    return f"{PREFIX}:idem:{key}"


def model(model_id: str) -> str:
    """Hash: the model record."""
    return f"{MODEL_PREFIX}{model_id}"


def model_history(model_id: str) -> str:
    """List: JSON events of the model's training (requested, started, checks, ready, failed)."""
    return f"{PREFIX}:model:{model_id}:history"


def model_parked(model_id: str) -> str:
    """Set: ids of jobs parked until the model is ready."""
    return f"{PREFIX}:model:{model_id}:parked"


def poll_durations(job_class: str) -> str:
    """Hash: the learned duration histogram of one class of job (``b<bin>`` weights, ``n`` their total,
    ``s`` the next observation's weight; see :mod:`genq.schedule`). Expires when unused for a while."""
    return f"{PREFIX}:polldur:{job_class}"


LIMIT_SEMAPHORE = f"{PREFIX}:limit:inflight"
"""Sorted set: leases of upstream calls in flight, scored by expiry."""


def limit_window(family: str) -> str:
    """Sorted set: admission times of upstream calls of one family (``*``: all) in the last second."""
    return f"{PREFIX}:limit:window:{family}"


def limit_lane_window(family: str) -> str:
    """Sorted set: admission times of one family's interactive calls in the current window."""
    return f"{PREFIX}:limit:lane:{family}:interactive"


def limit_batch_waiting(family: str) -> str:
    """String with a short TTL: a batch call of this family was turned away lately."""
    return f"{PREFIX}:limit:lane:{family}:batch-waiting"


def limit_batch_turn(family: str) -> str:
    """String with a TTL: when (Redis time) the next turned-away batch call of this family may try again."""
    return f"{PREFIX}:limit:lane:{family}:batch-turn"


def limit_batch_turns(family: str) -> str:
    """Hash with a TTL: job id -> the turn its turned-away batch call was given (it keeps its place)."""
    return f"{PREFIX}:limit:lane:{family}:batch-turns"


def admit_prefix(family: str) -> str:
    """The admission queue of one family's submits refused by the limiter (:mod:`genq.limits`):

    - ``<prefix>:q:<lane>:<producer>``: sorted set, ``"<job id> <gen>"`` scored by arrival (FIFO);
    - ``<prefix>:p:<lane>``: sorted set, the producers with submits queued, scored by virtual time;
    - ``<prefix>:state``: hash, the arrival counter and each lane's virtual time;
    - ``<prefix>:grants``: hash, job id -> until when (Redis time) its granted turn holds;
    - ``<prefix>:grants-until``: sorted set, the same job ids scored by that time (the tick drops the
      turns that ran out untaken);
    - ``<prefix>:tick``: string, the token of the one admission tick scheduled."""
    return f"{PREFIX}:admit:{family}"


LIMIT_BLOCKED = f"{PREFIX}:limit:blocked"
"""String: until when (Redis time) the upstream is closed after a 429."""


def deliveries(task_id: str) -> str:
    """Counter: how many times one task message was delivered to a worker."""
    return f"{PREFIX}:deliveries:{task_id}"


TOTAL_SCOPE = "*"
"""The budget scope of every producer together (no producer id can be ``*``)."""
SPEND_PREFIX = f"{PREFIX}:spend:"
INFLIGHT_PREFIX = f"{PREFIX}:inflight:"
PRODUCERS = f"{PREFIX}:producers"
"""Set: every producer id that has been charged for a trigger (what ``genq budgets`` lists)."""


def spend(scope: str, period: str, start: int) -> str:
    """Hash: paid triggers of one producer (``*``: all, kept only while a total cap is set) in one
    budget window: ``t`` triggers and ``c`` cost units charged, ``pt``/``pc`` the part whose POST has not
    been answered yet (``pc`` only where a cost cap is set). ``period`` is ``h`` or ``d``, ``start`` the
    window's start (Unix seconds); expires a while after the window."""
    return f"{SPEND_PREFIX}{scope}:{period}:{start}"


def inflight(producer: str) -> str:
    """Set: ids of one producer's jobs submitted (or being submitted) and not ended: its quota."""
    return f"{INFLIGHT_PREFIX}{producer}"
