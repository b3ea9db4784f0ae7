"""genqueue settings: one pydantic-settings model, read from ``GENQ_*`` env vars and ``.env``.

Groups nest with a single underscore after the prefix: ``GENQ_API_BASE_URL`` is ``api.base_url``,
``GENQ_REDIS_URL`` is ``redis.url``. A poll policy is one JSON value; fields left out keep their defaults::

    GENQ_POLL_IMAGE='{"first_delay": 1, "interval": 2, "deadline": 600}'

Settings are built by :func:`get_settings` (a factory) and never mutated after that.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import ssl
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

ENV_PREFIX = "GENQ_"


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OutboundRules(_Group):
    """Where genqueue may connect to fetch or post for untrusted URLs (the SSRF guard's inputs)."""

    allow_http: bool = False
    """Allow plain http:// URLs; https:// only otherwise."""
    allowed_hosts: Annotated[list[str], NoDecode] = []
    """When set, URLs must be on one of these hosts (``cdn.example.com``, ``*.example.com``);
    comma-separated in the environment."""
    allow_private: bool = False
    """Allow loopback, private and link-local addresses (local development only)."""
    allowed_networks: Annotated[list[str], NoDecode] = []
    """CIDRs allowed although private (an internal host), comma-separated."""

    @field_validator("allowed_hosts", "allowed_networks", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("allowed_networks")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr)  # ValueError names the bad entry
        return value


class ApiSettings(_Group):
    """The upstream generation API."""

    base_url: str = "http://127.0.0.1:8900"
    """Root URL of the API, without a trailing slash."""
    key: SecretStr = SecretStr("")
    """Bearer token. Never logged, never sent to Celery, never stored in Redis."""
    connect_timeout: float = Field(5.0, gt=0)
    """Seconds to establish a connection."""
    read_timeout: float = Field(30.0, gt=0)
    """Seconds to wait for each response."""
    submit_at_least_once: bool = False
    """Retry a submit whose outcome is unknown (a timeout after sending, a worker dying mid-POST)
    instead of ending it ``submit_unknown``: no job is stuck, but one may be paid for twice."""

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_BROKER_SCHEMES = (*_REDIS_SCHEMES, "amqp://", "amqps://", "pyamqp://")
_TLS_ENV = (
    "GENQ_REDIS_TLS_CA_FILE, GENQ_REDIS_TLS_CERT_FILE, GENQ_REDIS_TLS_KEY_FILE or GENQ_REDIS_TLS_INSECURE"
)
_SENTINEL_ONLY = ("sentinel_master", "sentinel_password", "sentinel_master_password", "sentinel_db")


class RedisSettings(_Group):
    """Redis: the ledger, the result backend and (unless ``broker_url`` is set) the broker.

    One of three ways to reach it: a ``redis://`` or ``rediss://`` (TLS) URL, a ``unix://`` socket, or
    Redis Sentinel (``sentinels`` and ``sentinel_master``, with ``url`` left unset)."""

    url: str = DEFAULT_REDIS_URL
    """Ledger and result backend; ``redis://``, ``rediss://`` (TLS) or ``unix:///path?db=N``, password
    in the URL."""
    broker_url: str | None = None
    """Celery broker; defaults to ``url`` (or the Sentinel-managed primary). May be ``amqp://``
    (RabbitMQ)."""
    tls_ca_file: Path | None = None
    """PEM file of the CA(s) that signed the Redis server's certificate; the system CAs otherwise."""
    tls_cert_file: Path | None = None
    """Client certificate (PEM), for a server that requires clients to authenticate by certificate."""
    tls_key_file: Path | None = None
    """Private key (PEM) of ``tls_cert_file``."""
    tls_insecure: bool = False
    """Connect over TLS without checking the server's certificate or name. Anyone on the path can then
    read and change every job and message; logged as a warning at every start."""
    sentinels: Annotated[list[str], NoDecode] = []
    """Redis Sentinel nodes as ``host:port``, comma-separated; ledger, broker and result backend then
    follow the primary Sentinel names."""
    sentinel_master: str = ""
    """The name the sentinels monitor the primary under (``sentinel monitor <name> ...``)."""
    sentinel_password: SecretStr = SecretStr("")
    """Password of the Sentinel nodes themselves (their ``requirepass``), if any."""
    sentinel_master_password: SecretStr = SecretStr("")
    """Password of the primary and its replicas, if any."""
    sentinel_db: int = Field(0, ge=0)
    """Database number on the Sentinel-managed primary."""
    durable_replicas: int = Field(0, ge=0)
    """Replicas that must acknowledge a job's writes before its paid POST is sent (Redis ``WAIT``);
    0 sends without waiting."""
    durable_timeout: float = Field(0.5, gt=0)
    """Seconds to wait for those acknowledgements."""

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(_REDIS_SCHEMES):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return _no_tls_query(value)

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(_BROKER_SCHEMES):
            raise ValueError("must be a redis://, rediss://, unix://, amqp://, amqps:// or pyamqp:// URL")
        return None if value is None else _no_tls_query(value)

    @field_validator("tls_ca_file", "tls_cert_file", "tls_key_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @field_validator("sentinels", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("sentinels")
    @classmethod
    def _host_ports(cls, value: list[str]) -> list[str]:
        for entry in value:
            host, _, port = entry.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{entry!r} is not host:port")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RedisSettings:
        for problem in (self._tls_problem(), self._sentinel_problem()):
            if problem:
                raise ValueError(problem)
        return self

    def _tls_problem(self) -> str | None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            return "GENQ_REDIS_TLS_CERT_FILE and GENQ_REDIS_TLS_KEY_FILE go together: set both or neither"
        if self.tls_insecure and self.tls_ca_file is not None:
            return "GENQ_REDIS_TLS_INSECURE turns off the check GENQ_REDIS_TLS_CA_FILE is for: set one"
        if self.tls_configured and not self.tls_urls:
            where = "GENQ_REDIS_SENTINELS" if self.sentinels else "GENQ_REDIS_URL or GENQ_REDIS_BROKER_URL"
            return (
                f"{_TLS_ENV} is set but {where} connects in plain text: write rediss:// for TLS "
                "(TLS through Sentinel is not supported)"
            )
        return None

    def _sentinel_problem(self) -> str | None:
        if not self.sentinels:
            # Compared with the defaults: every field counts as set here (groups update partially).
            defaults = RedisSettings.model_fields
            extra = [
                f"GENQ_REDIS_{name.upper()}"
                for name in _SENTINEL_ONLY
                if getattr(self, name) != defaults[name].default
            ]
            return f"{', '.join(extra)} need GENQ_REDIS_SENTINELS" if extra else None
        if not self.sentinel_master:
            return "GENQ_REDIS_SENTINEL_MASTER is required with GENQ_REDIS_SENTINELS"
        if self.url != DEFAULT_REDIS_URL:
            return (
                "GENQ_REDIS_URL and GENQ_REDIS_SENTINELS are exclusive: Sentinel names the primary; "
                "put its password in GENQ_REDIS_SENTINEL_MASTER_PASSWORD and its database in "
                "GENQ_REDIS_SENTINEL_DB"
            )
        if self.broker_url is not None and self.broker_url.startswith(_REDIS_SCHEMES):
            return (
                "GENQ_REDIS_BROKER_URL is a Redis URL while GENQ_REDIS_SENTINELS is set: leave it unset "
                "to use the Sentinel-managed primary as the broker (or point it at RabbitMQ)"
            )
        return None

    @property
    def broker(self) -> str:
        """The broker URL as written (for Sentinel, the primary's ``url`` is not used: see celeryconf)."""
        return self.broker_url or self.url

    @property
    def tls_configured(self) -> bool:
        return self.tls_insecure or any(
            f is not None for f in (self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        )

    @property
    def tls_urls(self) -> bool:
        """Whether the ledger or the broker connects with ``rediss://``."""
        return not self.sentinels and (
            self.url.startswith("rediss://") or self.broker.startswith("rediss://")
        )

    def ssl_options(self) -> dict[str, Any]:
        """redis-py's TLS keyword arguments (also what kombu and Celery take as ``*_use_ssl``):
        the server's certificate and name are checked unless ``tls_insecure``."""
        if self.tls_insecure:
            return {"ssl_cert_reqs": ssl.CERT_NONE, "ssl_check_hostname": False}
        options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
        if self.tls_ca_file is not None:
            options["ssl_ca_certs"] = str(self.tls_ca_file)
        if self.tls_cert_file is not None and self.tls_key_file is not None:
            options["ssl_certfile"] = str(self.tls_cert_file)
            options["ssl_keyfile"] = str(self.tls_key_file)
        return options


def _no_tls_query(url: str) -> str:
    # redis-py lets URL query options override keyword arguments, so ?ssl_cert_reqs=none in a URL
    # would silently turn the certificate check off for the ledger.
    if any(key.lower().startswith("ssl") for key in parse_qs(urlsplit(url).query)):
        raise ValueError(f"TLS options do not go in the URL: use {_TLS_ENV}")
    return url


class PollPolicy(_Group):
    """How one kind of upstream job is polled. All times in seconds."""

    first_delay: float = Field(gt=0)
    """Wait after submission before the first status check."""
    interval: float = Field(gt=0)
    """Wait between the first checks."""
    backoff: float = Field(1.0, ge=1.0)
    """Each further wait is the previous one times this factor."""
    max_interval: float = Field(gt=0)
    """Cap on any single wait."""
    jitter: float = Field(0.1, ge=0, lt=1)
    """Each wait is spread by up to ± this fraction, so polls do not fire in lockstep."""
    deadline: float = Field(gt=0)
    """After this long since submission the job ends ``timed_out`` and polling stops."""

    @model_validator(mode="after")
    def _ordered(self) -> PollPolicy:
        if self.max_interval < self.interval:
            raise ValueError("max_interval must be >= interval")
        return self


class PollSettings(_Group):
    """One poll policy per job kind, and one for model training."""

    image: PollPolicy = PollPolicy(first_delay=2, interval=2, backoff=1.25, max_interval=10, deadline=900)
    upscale: PollPolicy = PollPolicy(first_delay=2, interval=2, backoff=1.25, max_interval=10, deadline=900)
    video: PollPolicy = PollPolicy(first_delay=15, interval=10, backoff=1.25, max_interval=30, deadline=3600)
    model: PollPolicy = PollPolicy(
        first_delay=300, interval=300, backoff=1.0, max_interval=300, jitter=0.05, deadline=7200
    )
    """Model training: usually 20-25 minutes, so checked about every 5 minutes."""
    adaptive: bool = True
    """Learn how long each class of job (kind, model and size) takes, in Redis, and check image,
    upscale and video jobs at fixed times from their POST: first when all but ``adaptive_skip`` of
    them may be done, then every ``adaptive_gap`` seconds. Applies to each kind whose policy keeps its
    default timing (a ``GENQ_POLL_<KIND>`` that sets ``first_delay``, ``interval``, ``backoff`` or
    ``max_interval`` chooses that fixed policy for the kind). ``false``: the fixed per-kind policies,
    as before. Their ``deadline``, and ``max_interval`` for error waits, apply either way."""
    adaptive_gap: float = Field(4.7, gt=0)
    """Seconds between checks once a job may be done: the most a result waits to be noticed (the 95th
    percentile is about 0.96 of it); the learned part only decides when checking starts."""
    adaptive_skip: float = Field(0.03, ge=0, lt=0.05)
    """Fraction of jobs allowed to finish more than ``adaptive_gap`` before their first check."""
    adaptive_half_life: float = Field(30.0, ge=1)
    """Observations after which an observed duration weighs half as much (per class)."""
    adaptive_min_samples: float = Field(10.0, ge=1)
    """Recent observations a class needs before its own histogram is used (else its kind's, else a
    fixed ``adaptive_gap`` loop)."""
    adaptive_cache: float = Field(5.0, ge=0)
    """Seconds a worker process reuses a histogram read from Redis."""
    countdown_max: float = Field(60.0, gt=0)
    """Waits up to this long are countdown messages; longer ones are held in Redis by due time and
    dispatched by the sweeper, so they cost no worker memory and no visibility-timeout risk."""
    error_backoff: float = Field(2.0, gt=0)
    """First wait after a transient upstream error; doubles per consecutive error."""
    max_errors: int = Field(8, ge=1)
    """Consecutive transient errors on one job before it ends ``failed``."""

    def held(self, wait: float) -> bool:
        """Whether a wait of ``wait`` seconds is held in Redis (its message sent by the sweeper when
        due) rather than sent now as a countdown a worker keeps in memory (see ``countdown_max``)."""
        return wait > self.countdown_max


class DownloadSettings(OutboundRules):
    """Downloads of job outputs. Output URLs are untrusted input."""

    dir: Path = Path("downloads")
    """Where files land, as ``<dir>/<job id>/<index>.<ext>``."""
    max_bytes: int = Field(1024**3, gt=0)
    """Largest file accepted, in bytes."""
    timeout: float = Field(600.0, gt=0)
    """Wall-clock limit for one file, in seconds."""
    chunk_bytes: int = Field(256 * 1024, ge=4096)
    """Read size while streaming, in bytes: the memory a download holds."""
    max_redirects: int = Field(3, ge=0, le=10)
    """Redirects followed per file, each hop checked like the first; 0 refuses redirects."""
    max_attempts: int = Field(5, ge=1)
    """Tries per file on transient errors before the job ends ``failed``."""


class LimitSettings(_Group):
    """Limits on calls to the upstream API, shared by every worker through Redis. 0 means no limit."""

    rate: float = Field(0.0, ge=0)
    """Requests per second over all endpoints."""
    trigger_rate: float = Field(0.0, ge=0)
    """Requests per second to the paid triggers (POST /images/..., /videos/...)."""
    status_rate: float = Field(0.0, ge=0)
    """Requests per second to GET /jobs/{id}."""
    models_rate: float = Field(0.0, ge=0)
    """Requests per second to /models/..."""
    max_concurrent: int = Field(0, ge=0)
    """Upstream requests in flight at once."""


class BudgetCaps(_Group):
    """Caps on paid triggers in fixed UTC windows (an hour from :00, a day from midnight). ``None``: no
    cap; 0 stops every trigger."""

    triggers_per_hour: int | None = Field(None, ge=0)
    """Paid POSTs per hour."""
    triggers_per_day: int | None = Field(None, ge=0)
    """Paid POSTs per day."""
    cost_per_hour: float | None = Field(None, ge=0)
    """Cost units per hour (see ``GENQ_BUDGETS_COSTS``)."""
    cost_per_day: float | None = Field(None, ge=0)
    """Cost units per day."""


class ProducerPolicy(BudgetCaps):
    """One producer app's caps, quota, lane and share."""

    max_in_flight: int | None = Field(None, ge=1)
    """Jobs of this producer submitted and not yet ended, at most; more wait their turn (pending)."""
    lane: Literal["interactive", "batch"] = "interactive"
    """The lane of its jobs unless a submit says otherwise."""
    on_budget: Literal["reject", "wait"] = "reject"
    """A job past a cap ends ``rejected``, or (``wait``) stays pending until the next window."""
    weight: float = Field(1.0, gt=0)
    """Its share of the trigger rate against other producers with work waiting."""


class CostTable(_Group):
    """Cost units of one trigger of each kind, for the ``cost_per_*`` caps."""

    image: float = Field(1.0, ge=0)
    """Per image asked for (``num_images``)."""
    upscale: float = Field(1.0, ge=0)
    """Per upscale."""
    video_second: float = Field(1.0, ge=0)
    """Per second of video asked for (``duration``)."""


_PRODUCER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class BudgetSettings(_Group):
    """Spend budgets, in-flight quotas, lanes and fair shares per producer app (the id it sends,
    ``default`` when none), and budgets over all of them. Each is JSON; nothing is capped by default.

    For example::

        GENQ_BUDGETS_TOTAL='{"triggers_per_day": 20000}'
        GENQ_BUDGETS_PRODUCERS='{"backfill": {"triggers_per_hour": 2000, "lane": "batch",
                                "on_budget": "wait", "max_in_flight": 50}}'
    """

    total: BudgetCaps = BudgetCaps()
    """Caps over every producer together."""
    producers: dict[str, ProducerPolicy] = {}
    """Producer id -> its caps, ``max_in_flight``, default ``lane``, ``on_budget`` and ``weight``."""
    others: ProducerPolicy = ProducerPolicy()
    """The policy of each producer not named in ``producers`` (each counted on its own)."""
    costs: CostTable = CostTable()
    """Cost units per kind: ``{"image": 1, "upscale": 1, "video_second": 1}`` unless set."""
    fair_shares: bool = True
    """Share the trigger rate (``GENQ_LIMITS_TRIGGER_RATE``, else ``GENQ_LIMITS_RATE``) between producers
    by their ``weight`` while more than one has work waiting; ``false``: first come, first served."""
    batch_share: float = Field(0.2, ge=0, lt=1)
    """Share of the trigger and status rates (``GENQ_LIMITS_*``) kept for the batch lane while it has
    work waiting, so a steady interactive load never starves it."""

    @field_validator("producers")
    @classmethod
    def _names(cls, value: dict[str, ProducerPolicy]) -> dict[str, ProducerPolicy]:
        for name in value:
            if not _PRODUCER_NAME.match(name):
                raise ValueError(
                    f"{name[:80]!r} is not a producer id (letters, digits, '.', '_', '-'; up to 64)"
                )
        return value

    def policy(self, producer: str) -> ProducerPolicy:
        return self.producers.get(producer, self.others)


class CallbackSettings(OutboundRules):
    """Completion callbacks to producer apps (a Celery task by name, or a signed webhook)."""

    secret: SecretStr = SecretStr("")
    """HMAC-SHA256 key that signs every webhook; required to send webhooks."""
    max_attempts: int = Field(6, ge=1)
    """Delivery attempts before the job is marked callback_failed (the job keeps its own state)."""
    backoff: float = Field(2.0, gt=0)
    """First wait after a failed attempt, in seconds; doubles per attempt."""
    timeout: float = Field(10.0, gt=0)
    """Seconds to connect and to wait for the receiver's answer."""


class WorkerSettings(_Group):
    """Celery worker behaviour."""

    task_time_limit: int = Field(900, gt=0)
    """Hard limit per task execution, in seconds (downloads are the longest)."""
    visibility_timeout: int = Field(3600, gt=0)
    """Seconds before an unacknowledged message is delivered again. Must exceed the longest
    countdown plus the longest task, or held polls are delivered twice."""
    eta_task_limit: int = Field(20_000, gt=0)
    """Most countdown tasks one worker holds in memory at once."""
    soft_shutdown_timeout: float = Field(30.0, ge=0)
    """Seconds a worker keeps running tasks after SIGTERM before requeueing the rest."""
    job_ttl: int = Field(7 * 86400, gt=0)
    """Seconds a finished job's record is kept."""
    sweep_interval: float = Field(2.0, gt=0)
    """Seconds between sweeps (beat): the sweeper dispatches held waits and re-drives stalled jobs. Twice
    it is the look-ahead: a held submit or poll (a model's train call or check) due within two sweep
    intervals is sent by this sweep, as a countdown to its due time (at most half of ``sweep_grace``)."""
    sweep_grace: float = Field(30.0, gt=0)
    """Seconds past its due time before a job whose message never came is re-driven."""
    max_deliveries: int = Field(5, ge=1)
    """Deliveries of one task message before it counts as poison (it keeps killing its worker) and
    its job ends failed."""

    @property
    def sweep_ahead(self) -> float:
        """The sweeper's look-ahead, seconds: two intervals, so a sweep that starts up to an interval
        late (its message waits in the poll queue it shares) still sends every poll before it is due."""
        return min(2 * self.sweep_interval, self.sweep_grace / 2)

    @model_validator(mode="after")
    def _limits(self) -> WorkerSettings:
        if self.task_time_limit >= self.visibility_timeout:
            raise ValueError("GENQ_WORKER_TASK_TIME_LIMIT must be below GENQ_WORKER_VISIBILITY_TIMEOUT")
        return self


def check_basic_auth(value: SecretStr) -> SecretStr:
    """``user:password`` entries, comma-separated; the message never echoes the value (a password)."""
    for entry in basic_auth_entries(value):
        user, _, password = entry.partition(":")
        if not user or not password:
            raise ValueError("must be user:password (comma-separated for several), both non-empty")
    return value


def basic_auth_entries(value: SecretStr) -> list[str]:
    return [e for e in value.get_secret_value().split(",") if e]


class FlowerSettings(_Group):
    """``genq flower``, the monitoring UI. It refuses to start without ``basic_auth`` unless it is run
    ``--local-only`` (loopback, no auth)."""

    basic_auth: SecretStr = SecretStr("")
    """``user:password``, several comma-separated. No default: a secret."""
    address: str = "127.0.0.1"
    """Address to listen on; loopback unless it must be reached from elsewhere (a container)."""
    port: int = Field(5555, ge=0, le=65535)
    """Port to listen on (0: any free port)."""

    @field_validator("basic_auth")
    @classmethod
    def _user_password(cls, value: SecretStr) -> SecretStr:
        return check_basic_auth(value)

    @property
    def credentials(self) -> list[str]:
        return basic_auth_entries(self.basic_auth)


class MetricsSettings(_Group):
    """``genq metrics``, the Prometheus exporter."""

    address: str = "127.0.0.1"
    """Address to listen on."""
    port: int = Field(9818, ge=0, le=65535)
    """Port to listen on (0: any free port)."""


class LogSettings(_Group):
    """Log output of every genqueue process."""

    format: Literal["text", "json"] = "text"
    """``text``: Celery's human-readable lines; ``json``: one JSON object per line, each with the task
    name and the job id it was logged under."""


class Settings(BaseSettings):
    """Everything genqueue reads from its environment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        nested_model_default_partial_update=True,
        extra="ignore",
        frozen=True,
    )

    api: ApiSettings = ApiSettings()
    redis: RedisSettings = RedisSettings()
    poll: PollSettings = PollSettings()
    download: DownloadSettings = DownloadSettings()
    limits: LimitSettings = LimitSettings()
    budgets: BudgetSettings = BudgetSettings()
    callbacks: CallbackSettings = CallbackSettings()
    worker: WorkerSettings = WorkerSettings()
    flower: FlowerSettings = FlowerSettings()
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()

    @model_validator(mode="after")
    def _visibility_covers_waits(self) -> Settings:
        # No countdown is longer than poll.countdown_max (longer waits are held in Redis instead) or the
        # sweeper's look-ahead.
        needed = max(self.poll.countdown_max, self.worker.sweep_ahead) + self.worker.task_time_limit
        if self.worker.visibility_timeout <= needed:
            raise ValueError(
                f"GENQ_WORKER_VISIBILITY_TIMEOUT ({self.worker.visibility_timeout}s) must exceed "
                f"GENQ_POLL_COUNTDOWN_MAX plus GENQ_WORKER_TASK_TIME_LIMIT ({needed:.0f}s), or countdown "
                "messages would be delivered twice"
            )
        return self


class SettingsError(RuntimeError):
    """Settings are invalid; the message names each offending environment variable."""


def _env_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not isinstance(p, int)]
    if not parts:
        return "settings"
    head = ENV_PREFIX + parts[0].upper()
    if len(parts) == 1:
        return head
    return f"{head}_{parts[1].upper()}" + ("" if len(parts) == 2 else f" (field {'.'.join(parts[2:])})")


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment (and ``overrides``), or raise :class:`SettingsError`."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = [f"  {_env_name(tuple(err['loc']))}: {err['msg']}" for err in exc.errors()]
        raise SettingsError("invalid genqueue settings:\n" + "\n".join(lines)) from None
    except PydanticSettingsError as exc:
        # Raised before validation when a JSON-valued variable (a GENQ_POLL_* policy) does not parse.
        bad = [name for name, value in os.environ.items() if name.startswith(ENV_PREFIX) and _bad_json(value)]
        names = ", ".join(bad) or "a GENQ_* variable holding JSON"
        raise SettingsError(f"invalid genqueue settings:\n  {names}: not valid JSON ({exc})") from None


def _bad_json(value: str) -> bool:
    if not value.lstrip().startswith(("{", "[")):
        return False
    try:
        json.loads(value)
    except ValueError:
        return True
    return False


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, built once on first use (not at import)."""
    return load_settings()
