"""``config.settings`` from env vars and ``.env``, its errors, its secrecy; and ``config.celeryconf``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from genq.celeryconf import QUEUES, TASK_QUEUES, celery_config
from genq.settings import PollPolicy, Settings, SettingsError, get_settings, load_settings

KEY = "sk-CANARY-123"

pytestmark = pytest.mark.usefixtures("clean_env")


def _error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert info.value.__cause__ is None
    return str(info.value)


# ------------------------------------------------------------------ values from the environment


def test_defaults_without_environment() -> None:
    s = load_settings()
    assert s.api.base_url == "http://127.0.0.1:8900"
    assert s.api.key.get_secret_value() == ""
    assert s.redis.url == "redis://127.0.0.1:6379/0"
    assert s.redis.broker == s.redis.url
    assert s.download.dir == Path("downloads")
    assert s.download.allow_http is False
    assert s.worker.visibility_timeout == 3600
    assert s.poll.image == PollPolicy(
        first_delay=2, interval=2, backoff=1.25, max_interval=10, jitter=0.1, deadline=900
    )


def test_env_vars_reach_their_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENQ_API_BASE_URL", "https://api.example.test/v1/")
    monkeypatch.setenv("GENQ_API_KEY", KEY)
    monkeypatch.setenv("GENQ_API_READ_TIMEOUT", "12.5")
    monkeypatch.setenv("GENQ_REDIS_URL", "rediss://:pw@redis.example.test:6380/2")
    monkeypatch.setenv("GENQ_DOWNLOAD_DIR", "/data/genq-out")
    monkeypatch.setenv("GENQ_DOWNLOAD_ALLOW_HTTP", "true")
    monkeypatch.setenv("GENQ_DOWNLOAD_MAX_BYTES", "1048576")
    monkeypatch.setenv("GENQ_WORKER_TASK_TIME_LIMIT", "600")

    s = load_settings()

    assert s.api.base_url == "https://api.example.test/v1"  # trailing slash dropped
    assert s.api.key.get_secret_value() == KEY
    assert s.api.read_timeout == 12.5
    assert s.api.connect_timeout == 5.0
    assert s.redis.url == "rediss://:pw@redis.example.test:6380/2"
    assert s.redis.broker == "rediss://:pw@redis.example.test:6380/2"
    assert s.download.dir == Path("/data/genq-out")
    assert s.download.allow_http is True
    assert s.download.max_bytes == 1048576
    assert s.worker.task_time_limit == 600


def test_broker_url_overrides_the_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENQ_REDIS_URL", "redis://ledger:6379/0")
    monkeypatch.setenv("GENQ_REDIS_BROKER_URL", "amqp://guest@rabbit//")
    s = load_settings()
    assert s.redis.url == "redis://ledger:6379/0"
    assert s.redis.broker == "amqp://guest@rabbit//"


@pytest.mark.parametrize(("raw", "expected"), [("true", True), ("1", True), ("false", False), ("0", False)])
def test_allow_http_booleans(monkeypatch: pytest.MonkeyPatch, raw: str, expected: bool) -> None:
    monkeypatch.setenv("GENQ_DOWNLOAD_ALLOW_HTTP", raw)
    assert load_settings().download.allow_http is expected


def test_poll_policy_as_full_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "GENQ_POLL_IMAGE",
        json.dumps(
            {"first_delay": 1, "interval": 3, "backoff": 2, "max_interval": 20, "jitter": 0, "deadline": 60}
        ),
    )
    s = load_settings()
    assert s.poll.image == PollPolicy(
        first_delay=1, interval=3, backoff=2, max_interval=20, jitter=0, deadline=60
    )
    # Other kinds keep their defaults.
    assert s.poll.video == Settings.model_fields["poll"].default.video


def test_poll_policy_partial_json_keeps_the_other_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    # Real behaviour: a partial object is merged into the default policy (nested partial update),
    # it is not refused for the fields it leaves out.
    monkeypatch.setenv("GENQ_POLL_IMAGE", '{"first_delay": 1, "interval": 3, "deadline": 600}')
    image = load_settings().poll.image
    assert image == PollPolicy(
        first_delay=1, interval=3, backoff=1.25, max_interval=10, jitter=0.1, deadline=600
    )


def test_poll_policy_partial_json_is_still_validated_as_a_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # interval 50 merged with the default max_interval 10 breaks max_interval >= interval.
    message = _error(monkeypatch, GENQ_POLL_IMAGE='{"interval": 50}')
    assert "GENQ_POLL_IMAGE" in message
    assert "max_interval must be >= interval" in message


def test_poll_policy_bad_field_type_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _error(monkeypatch, GENQ_POLL_IMAGE='{"first_delay": "soon"}')
    assert "GENQ_POLL_IMAGE (field first_delay)" in message


@pytest.mark.parametrize("name", ["GENQ_POLL_IMAGE", "GENQ_POLL_VIDEO"])
def test_poll_policy_malformed_json_raises_settings_error(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    message = _error(monkeypatch, **{name: "{first_delay: 1"})
    assert "GENQ_POLL_" in message
    assert "not valid JSON" in message


def test_poll_policy_malformed_json_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _error(monkeypatch, GENQ_POLL_IMAGE="{first_delay: 1")
    assert "GENQ_POLL_IMAGE" in message


# ------------------------------------------------------------------ .env


def test_dotenv_in_cwd_is_read(clean_env: Path) -> None:
    (clean_env / ".env").write_text(
        f"GENQ_API_KEY={KEY}\nGENQ_REDIS_URL=redis://dotenv:6379/3\nGENQ_POLL_IMAGE="
        '\'{"first_delay": 4, "interval": 4, "max_interval": 8, "deadline": 100}\'\n',
        encoding="utf-8",
    )
    s = load_settings()
    assert s.api.key.get_secret_value() == KEY
    assert s.redis.url == "redis://dotenv:6379/3"
    assert (s.poll.image.first_delay, s.poll.image.max_interval, s.poll.image.deadline) == (4, 8, 100)


def test_env_var_beats_dotenv(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / ".env").write_text(
        "GENQ_REDIS_URL=redis://dotenv:6379/3\nGENQ_API_KEY=from-dotenv\n", encoding="utf-8"
    )
    monkeypatch.setenv("GENQ_REDIS_URL", "redis://from-env:6379/4")
    s = load_settings()
    assert s.redis.url == "redis://from-env:6379/4"
    assert s.api.key.get_secret_value() == "from-dotenv"


def test_dotenv_elsewhere_is_not_read(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = clean_env / "elsewhere"
    other.mkdir()
    (other / ".env").write_text("GENQ_REDIS_URL=redis://elsewhere:6379/0\n", encoding="utf-8")
    assert load_settings().redis.url == "redis://127.0.0.1:6379/0"
    monkeypatch.chdir(other)
    assert load_settings().redis.url == "redis://elsewhere:6379/0"


def test_overrides_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENQ_REDIS_URL", "redis://from-env:6379/0")
    monkeypatch.setenv("GENQ_REDIS_BROKER_URL", "amqp://from-env//")
    s = load_settings(redis={"url": "redis://override:6379/1"})
    assert s.redis.url == "redis://override:6379/1"
    assert s.redis.broker == "amqp://from-env//"  # the rest of the group still comes from the env


def test_invalid_dotenv_value_names_the_variable(clean_env: Path) -> None:
    (clean_env / ".env").write_text("GENQ_REDIS_URL=http://not-redis\n", encoding="utf-8")
    with pytest.raises(SettingsError, match="GENQ_REDIS_URL"):
        load_settings()


# ------------------------------------------------------------------ invalid values


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("GENQ_REDIS_URL", "http://localhost:6379", "redis://"),
        ("GENQ_REDIS_URL", "localhost:6379", "redis://"),
        ("GENQ_API_BASE_URL", "ftp://api.example.test", "http://"),
        ("GENQ_API_READ_TIMEOUT", "0", "greater than 0"),
        ("GENQ_WORKER_VISIBILITY_TIMEOUT", "abc", "integer"),
        ("GENQ_WORKER_VISIBILITY_TIMEOUT", "0", "greater than 0"),
        ("GENQ_WORKER_VISIBILITY_TIMEOUT", "-5", "greater than 0"),
        ("GENQ_DOWNLOAD_ALLOW_HTTP", "maybe", "boolean"),
        ("GENQ_DOWNLOAD_MAX_BYTES", "lots", "integer"),
        ("GENQ_DOWNLOAD_CHUNK_BYTES", "1024", "greater than or equal to 4096"),
        ("GENQ_POLL_MAX_ERRORS", "0", "greater than or equal to 1"),
    ],
)
def test_invalid_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, fragment: str
) -> None:
    message = _error(monkeypatch, **{name: value})
    assert f"  {name}: " in message
    assert fragment in message
    assert message.startswith("invalid genqueue settings:")


def test_every_invalid_variable_is_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _error(
        monkeypatch, GENQ_REDIS_URL="http://x", GENQ_DOWNLOAD_CHUNK_BYTES="1", GENQ_API_BASE_URL="x"
    )
    lines = message.splitlines()[1:]
    assert len(lines) == 3
    assert {line.split(":")[0].strip() for line in lines} == {
        "GENQ_REDIS_URL",
        "GENQ_DOWNLOAD_CHUNK_BYTES",
        "GENQ_API_BASE_URL",
    }


def test_settings_error_is_a_runtime_error() -> None:
    assert issubclass(SettingsError, RuntimeError)


def test_task_time_limit_must_be_below_visibility(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _error(monkeypatch, GENQ_WORKER_TASK_TIME_LIMIT="5000")
    assert "GENQ_WORKER_TASK_TIME_LIMIT must be below GENQ_WORKER_VISIBILITY_TIMEOUT" in message


def _needed() -> float:
    """The longest countdown plus the task time limit, for the current defaults.

    Waits longer than ``poll.countdown_max`` are held in Redis and dispatched by the sweeper, so the
    longest message the broker holds unacknowledged is a ``countdown_max`` countdown plus a task.
    """
    s = load_settings()
    return s.poll.countdown_max + s.worker.task_time_limit


@pytest.mark.parametrize("below", [0, 1, 10])
def test_visibility_timeout_must_cover_countdown_plus_task(
    monkeypatch: pytest.MonkeyPatch, below: int
) -> None:
    needed = _needed()
    timeout = math.floor(needed) - below
    message = _error(monkeypatch, GENQ_WORKER_VISIBILITY_TIMEOUT=str(timeout))
    assert "GENQ_WORKER_VISIBILITY_TIMEOUT" in message
    assert f"({timeout}s)" in message
    assert f"({needed:.0f}s)" in message
    assert "GENQ_POLL_COUNTDOWN_MAX" in message
    assert "GENQ_WORKER_TASK_TIME_LIMIT" in message


def test_visibility_timeout_just_above_the_need_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    timeout = math.floor(_needed()) + 1
    monkeypatch.setenv("GENQ_WORKER_VISIBILITY_TIMEOUT", str(timeout))
    assert load_settings().worker.visibility_timeout == timeout


def test_visibility_check_follows_countdown_max_and_task_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENQ_WORKER_VISIBILITY_TIMEOUT", "1000")
    monkeypatch.setenv("GENQ_WORKER_TASK_TIME_LIMIT", "600")
    monkeypatch.setenv("GENQ_POLL_COUNTDOWN_MAX", "399")
    s = load_settings()  # 399 + 600 = 999 < 1000
    assert (s.worker.visibility_timeout, s.poll.countdown_max) == (1000, 399.0)
    monkeypatch.setenv("GENQ_POLL_COUNTDOWN_MAX", "400")  # 400 + 600 = 1000: not strictly above
    message = _error(monkeypatch)
    assert "GENQ_WORKER_VISIBILITY_TIMEOUT (1000s)" in message
    assert "(1000s)" in message.split("GENQ_WORKER_VISIBILITY_TIMEOUT (1000s)", 1)[1]
    monkeypatch.setenv("GENQ_POLL_COUNTDOWN_MAX", "60")
    monkeypatch.setenv("GENQ_WORKER_TASK_TIME_LIMIT", "950")  # 60 + 950 = 1010 > 1000
    assert "(1010s)" in _error(monkeypatch)


def test_long_poll_policies_need_no_longer_visibility(monkeypatch: pytest.MonkeyPatch) -> None:
    # Waits beyond countdown_max are held in Redis, so a slow policy does not force the timeout up.
    timeout = math.floor(_needed()) + 1
    monkeypatch.setenv("GENQ_WORKER_VISIBILITY_TIMEOUT", str(timeout))
    monkeypatch.setenv(
        "GENQ_POLL_VIDEO",
        json.dumps({"first_delay": 15, "interval": 10, "max_interval": 5000, "deadline": 36000}),
    )
    s = load_settings()
    assert s.poll.video.max_interval == 5000
    assert s.worker.visibility_timeout == timeout


# ------------------------------------------------------------------ secrecy, immutability, caching


def test_api_key_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENQ_API_KEY", KEY)
    s = load_settings()
    assert s.api.key.get_secret_value() == KEY  # it was read...
    for text in (repr(s), str(s), s.model_dump_json(), repr(s.api), json.dumps(s.model_dump(), default=str)):
        assert KEY not in text  # ...and is never shown
        assert "CANARY" not in text
    assert "**********" in s.model_dump_json()


def test_api_key_not_in_settings_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _error(monkeypatch, GENQ_API_KEY=KEY, GENQ_API_BASE_URL="nope", GENQ_REDIS_URL="nope")
    assert "GENQ_API_BASE_URL" in message
    assert KEY not in message


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValidationError):
        s.redis = s.redis  # type: ignore[misc]
    with pytest.raises(ValidationError):
        s.api.base_url = "https://elsewhere"  # type: ignore[misc]


def test_get_settings_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENQ_REDIS_URL", "redis://first:6379/0")
    first = get_settings()
    monkeypatch.setenv("GENQ_REDIS_URL", "redis://second:6379/0")
    second = get_settings()
    assert second is first
    assert second.redis.url == "redis://first:6379/0"
    get_settings.cache_clear()
    third = get_settings()
    assert third is not first
    assert third.redis.url == "redis://second:6379/0"


def test_get_settings_raises_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENQ_REDIS_URL", "http://x")
    with pytest.raises(SettingsError, match="GENQ_REDIS_URL"):
        get_settings()


# ------------------------------------------------------------------ celery configuration


@pytest.fixture
def celery_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("GENQ_API_KEY", KEY)
    monkeypatch.setenv("GENQ_REDIS_URL", "redis://ledger.example.test:6379/5")
    monkeypatch.setenv("GENQ_WORKER_VISIBILITY_TIMEOUT", "4321")
    monkeypatch.setenv("GENQ_WORKER_ETA_TASK_LIMIT", "777")
    return load_settings()


def test_celery_config_serializers_are_json_only(celery_settings: Settings) -> None:
    conf = celery_config(celery_settings)
    assert conf["task_serializer"] == "json"
    assert conf["result_serializer"] == "json"
    assert conf["accept_content"] == ["json"]
    assert conf["result_accept_content"] == ["json"]


def test_celery_config_acks_late(celery_settings: Settings) -> None:
    conf = celery_config(celery_settings)
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1


def test_celery_config_one_visibility_timeout_everywhere(celery_settings: Settings) -> None:
    conf = celery_config(celery_settings)
    assert conf["visibility_timeout"] == 4321
    assert conf["broker_transport_options"]["visibility_timeout"] == 4321
    assert conf["result_backend_transport_options"]["visibility_timeout"] == 4321


def test_celery_config_limits_and_urls(celery_settings: Settings) -> None:
    conf = celery_config(celery_settings)
    assert conf["worker_eta_task_limit"] == 777
    assert conf["task_time_limit"] == 900
    assert conf["task_soft_time_limit"] == 870
    assert conf["task_time_limit"] < conf["visibility_timeout"]
    assert conf["broker_url"] == "redis://ledger.example.test:6379/5"
    assert conf["result_backend"] == "redis://ledger.example.test:6379/5"


def test_celery_config_routes_every_task_to_its_queue(celery_settings: Settings) -> None:
    conf = celery_config(celery_settings)
    assert conf["task_routes"] == {name: {"queue": queue} for name, queue in TASK_QUEUES.items()}
    assert conf["task_routes"]["genq.submit"] == {"queue": "submit"}
    assert conf["task_routes"]["genq.download"] == {"queue": "download"}
    declared = {q.name for q in conf["task_queues"]}
    assert declared == set(QUEUES)
    assert set(TASK_QUEUES.values()) <= declared
    assert conf["task_default_queue"] in declared


def test_celery_config_holds_no_api_key(celery_settings: Settings) -> None:
    assert celery_settings.api.key == SecretStr(KEY)
    dumped = json.dumps(celery_config(celery_settings), default=str)
    assert KEY not in dumped
    assert "CANARY" not in dumped
