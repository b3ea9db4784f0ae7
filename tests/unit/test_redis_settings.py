"""The Redis settings (TLS, unix sockets, Sentinel, durable intent), their errors, and what Celery and
redis-py are given for them. No Redis here: the integration tests connect."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import pytest

from genq.celeryconf import celery_config
from genq.services import insecure_tls_warning, redis_client, sentinel_primary
from genq.settings import Settings, SettingsError, load_settings

pytestmark = pytest.mark.usefixtures("clean_env")

SECRET = "pw-CANARY-7f3"


def _load(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def _error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    with pytest.raises(SettingsError) as info:
        _load(monkeypatch, **env)
    return str(info.value)


@pytest.fixture
def pem(clean_env: Path) -> Path:
    path = clean_env / "ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n")  # only its existence is checked at load
    return path


# ------------------------------------------------------------------ TLS


def test_rediss_checks_the_certificate_by_default_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    conf = celery_config(_load(monkeypatch, GENQ_REDIS_URL="rediss://:pw@redis.example.test:6380/0"))
    for key in ("broker_use_ssl", "redis_backend_use_ssl"):
        assert conf[key]["ssl_cert_reqs"] == ssl.CERT_REQUIRED, key
        assert conf[key]["ssl_check_hostname"] is True, key
        assert "ssl_ca_certs" not in conf[key]  # the system CAs


def test_tls_files_reach_broker_backend_and_ledger(monkeypatch: pytest.MonkeyPatch, pem: Path) -> None:
    s = _load(
        monkeypatch,
        GENQ_REDIS_URL="rediss://redis.example.test:6380/0",
        GENQ_REDIS_TLS_CA_FILE=str(pem),
        GENQ_REDIS_TLS_CERT_FILE=str(pem),
        GENQ_REDIS_TLS_KEY_FILE=str(pem),
    )
    expected = {"ssl_ca_certs": str(pem), "ssl_certfile": str(pem), "ssl_keyfile": str(pem)}
    conf = celery_config(s)
    assert expected.items() <= conf["broker_use_ssl"].items()
    assert expected.items() <= conf["redis_backend_use_ssl"].items()
    kwargs = redis_client(s).connection_pool.connection_kwargs
    assert expected.items() <= kwargs.items()
    assert kwargs["ssl_cert_reqs"] == ssl.CERT_REQUIRED


def test_plain_redis_gets_no_tls_options(monkeypatch: pytest.MonkeyPatch) -> None:
    conf = celery_config(_load(monkeypatch))
    assert "broker_use_ssl" not in conf and "redis_backend_use_ssl" not in conf


def test_tls_applies_to_a_rediss_ledger_not_to_a_rabbitmq_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    conf = celery_config(
        _load(monkeypatch, GENQ_REDIS_URL="rediss://r:6380/0", GENQ_REDIS_BROKER_URL="amqp://guest@rabbit//")
    )
    assert "broker_use_ssl" not in conf  # kombu's amqp transport takes other keys
    assert conf["redis_backend_use_ssl"]["ssl_cert_reqs"] == ssl.CERT_REQUIRED


def test_insecure_is_explicit_and_warned(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _load(monkeypatch, GENQ_REDIS_URL="rediss://r:6380/0", GENQ_REDIS_TLS_INSECURE="true")
    assert celery_config(s)["broker_use_ssl"]["ssl_cert_reqs"] == ssl.CERT_NONE
    warning = insecure_tls_warning(s)
    assert warning is not None and "GENQ_REDIS_TLS_INSECURE" in warning
    monkeypatch.delenv("GENQ_REDIS_TLS_INSECURE")
    assert insecure_tls_warning(load_settings()) is None


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        ({"GENQ_REDIS_TLS_CA_FILE": "{pem}"}, ["GENQ_REDIS_URL", "rediss://"]),
        ({"GENQ_REDIS_TLS_INSECURE": "true"}, ["plain text", "rediss://"]),
        (
            {"GENQ_REDIS_TLS_CA_FILE": "{pem}", "GENQ_REDIS_BROKER_URL": "amqps://guest@rabbit//"},
            ["plain text"],
        ),
        (
            {"GENQ_REDIS_URL": "rediss://r/0", "GENQ_REDIS_TLS_CA_FILE": "/nowhere/ca.pem"},
            ["GENQ_REDIS_TLS_CA_FILE", "no such file"],
        ),
        (
            {"GENQ_REDIS_URL": "rediss://r/0", "GENQ_REDIS_TLS_CERT_FILE": "{pem}"},
            ["GENQ_REDIS_TLS_KEY_FILE", "both"],
        ),
        (
            {
                "GENQ_REDIS_URL": "rediss://r/0",
                "GENQ_REDIS_TLS_INSECURE": "true",
                "GENQ_REDIS_TLS_CA_FILE": "{pem}",
            },
            ["GENQ_REDIS_TLS_INSECURE", "GENQ_REDIS_TLS_CA_FILE"],
        ),
        ({"GENQ_REDIS_URL": "rediss://r/0?ssl_cert_reqs=none"}, ["GENQ_REDIS_URL", "GENQ_REDIS_TLS_"]),
        (
            {"GENQ_REDIS_BROKER_URL": "rediss://r/0?ssl_cert_reqs=none"},
            ["GENQ_REDIS_BROKER_URL", "GENQ_REDIS_TLS_"],
        ),
        ({"GENQ_REDIS_BROKER_URL": "sqs://q"}, ["GENQ_REDIS_BROKER_URL", "amqp://"]),
    ],
)
def test_tls_mistakes_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, pem: Path, env: dict[str, str], fragments: list[str]
) -> None:
    message = _error(monkeypatch, **{k: v.format(pem=pem) for k, v in env.items()})
    for fragment in fragments:
        assert fragment in message


# ------------------------------------------------------------------ unix sockets


@pytest.mark.parametrize(
    ("url", "celery_url"),
    [
        ("unix:///run/redis/redis.sock", "redis+socket:///run/redis/redis.sock?virtual_host=0"),
        ("unix:///run/redis.sock?db=3", "redis+socket:///run/redis.sock?virtual_host=3"),
        ("unix://:s3cr%2Ft@/run/redis.sock?db=1", "redis+socket://:s3cr%2Ft@/run/redis.sock?virtual_host=1"),
        (
            "unix:///run/redis.sock?db=2&password=s3cr/t",
            "redis+socket://:s3cr%2Ft@/run/redis.sock?virtual_host=2",
        ),
    ],
)
def test_unix_socket_urls_are_spelled_for_celery(
    monkeypatch: pytest.MonkeyPatch, url: str, celery_url: str
) -> None:
    conf = celery_config(_load(monkeypatch, GENQ_REDIS_URL=url))
    assert conf["broker_url"] == celery_url
    assert conf["result_backend"] == celery_url


# ------------------------------------------------------------------ Sentinel


def _sentinel_env(**more: str) -> dict[str, str]:
    return {
        "GENQ_REDIS_SENTINELS": "10.0.0.1:26379, 10.0.0.2:26379,sentinel-3:26380",
        "GENQ_REDIS_SENTINEL_MASTER": "mymaster",
        **more,
    }


def test_sentinel_reaches_broker_backend_and_ledger(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _load(
        monkeypatch,
        **_sentinel_env(
            GENQ_REDIS_SENTINEL_PASSWORD="sentinel-pw",
            GENQ_REDIS_SENTINEL_MASTER_PASSWORD="p@ss",
            GENQ_REDIS_SENTINEL_DB="2",
            GENQ_WORKER_VISIBILITY_TIMEOUT="4000",
        ),
    )
    assert s.redis.sentinels == ["10.0.0.1:26379", "10.0.0.2:26379", "sentinel-3:26380"]
    conf = celery_config(s)
    urls = "sentinel://:p%40ss@10.0.0.1:26379/2;sentinel://:p%40ss@10.0.0.2:26379/2;sentinel://:p%40ss@sentinel-3:26380/2"
    assert conf["broker_url"] == conf["result_backend"] == urls
    for key in ("broker_transport_options", "result_backend_transport_options"):
        options = conf[key]
        assert options["master_name"] == "mymaster"
        assert options["visibility_timeout"] == 4000 == conf["visibility_timeout"]
        assert options["sentinel_kwargs"] == {"password": "sentinel-pw"}
    client = sentinel_primary(s.redis)
    try:
        pool = client.connection_pool
        assert pool.connection_kwargs["password"] == "p@ss"
        assert pool.connection_kwargs["db"] == 2
        assert [c.connection_pool.connection_kwargs["port"] for c in pool.sentinel_manager.sentinels] == [
            26379,
            26379,
            26380,
        ]
        assert (
            pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs["password"] == "sentinel-pw"
        )
    finally:
        client.close()


def test_sentinel_with_a_rabbitmq_broker_keeps_it(monkeypatch: pytest.MonkeyPatch) -> None:
    conf = celery_config(_load(monkeypatch, **_sentinel_env(GENQ_REDIS_BROKER_URL="amqp://guest@rabbit//")))
    assert conf["broker_url"] == "amqp://guest@rabbit//"
    assert "master_name" not in conf["broker_transport_options"]
    assert conf["result_backend"].startswith("sentinel://")


def test_sentinel_passwords_do_not_show_in_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _load(
        monkeypatch,
        **_sentinel_env(GENQ_REDIS_SENTINEL_PASSWORD=SECRET, GENQ_REDIS_SENTINEL_MASTER_PASSWORD=SECRET),
    )
    assert SECRET not in repr(s) and SECRET not in str(s.redis)


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        (_sentinel_env(GENQ_REDIS_URL="redis://other:6379/0"), ["GENQ_REDIS_URL", "GENQ_REDIS_SENTINELS"]),
        (_sentinel_env(GENQ_REDIS_URL="unix:///run/redis.sock"), ["exclusive"]),
        (_sentinel_env(GENQ_REDIS_BROKER_URL="redis://other:6379/0"), ["GENQ_REDIS_BROKER_URL"]),
        (_sentinel_env(GENQ_REDIS_SENTINEL_MASTER=""), ["GENQ_REDIS_SENTINEL_MASTER", "required"]),
        (
            {"GENQ_REDIS_SENTINELS": "10.0.0.1", "GENQ_REDIS_SENTINEL_MASTER": "m"},
            ["GENQ_REDIS_SENTINELS", "host:port"],
        ),
        (
            {"GENQ_REDIS_SENTINELS": "h:99999", "GENQ_REDIS_SENTINEL_MASTER": "m"},
            ["GENQ_REDIS_SENTINELS", "host:port"],
        ),
        (
            {"GENQ_REDIS_SENTINEL_MASTER": "mymaster"},
            ["GENQ_REDIS_SENTINEL_MASTER need GENQ_REDIS_SENTINELS"],
        ),
        (_sentinel_env(GENQ_REDIS_TLS_INSECURE="true"), ["TLS through Sentinel is not supported"]),
    ],
)
def test_sentinel_mistakes_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], fragments: list[str]
) -> None:
    message = _error(monkeypatch, **env)
    for fragment in fragments:
        assert fragment in message


def test_sentinel_errors_do_not_echo_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _error(
        monkeypatch,
        GENQ_REDIS_SENTINEL_PASSWORD=SECRET,
        GENQ_REDIS_SENTINEL_MASTER_PASSWORD=SECRET,
        GENQ_REDIS_SENTINELS="nohostport",
    )
    assert SECRET not in message


# ------------------------------------------------------------------ durable intent


def test_durable_intent_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (load_settings().redis.durable_replicas, load_settings().redis.durable_timeout) == (0, 0.5)
    s = _load(monkeypatch, GENQ_REDIS_DURABLE_REPLICAS="1", GENQ_REDIS_DURABLE_TIMEOUT="0.25")
    assert (s.redis.durable_replicas, s.redis.durable_timeout) == (1, 0.25)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GENQ_REDIS_DURABLE_REPLICAS", "-1"),
        ("GENQ_REDIS_DURABLE_TIMEOUT", "0"),
        ("GENQ_REDIS_DURABLE_REPLICAS", "x"),
    ],
)
def test_durable_intent_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    assert name in _error(monkeypatch, **{name: value})


def test_producer_start_warns_when_insecure(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from genq.producer import Producer

    s = _load(monkeypatch, GENQ_REDIS_URL="rediss://:pw@127.0.0.1:1/0", GENQ_REDIS_TLS_INSECURE="true")
    with caplog.at_level(logging.WARNING, logger="genq.producer"):
        Producer(s).close()  # connects lazily: nothing listens on port 1
    assert any(
        "GENQ_REDIS_TLS_INSECURE" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
    )
