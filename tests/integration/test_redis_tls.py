"""Redis over TLS, for real: a redis-server that speaks TLS only (``--port 0``) with a throwaway CA that
requires client certificates; a worker runs a job end to end through it, and a server whose
certificate comes from another CA is refused by the ledger, the broker and the result backend."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from redis.backoff import NoBackoff
from redis.retry import Retry

from genq.celeryconf import celery_config
from genq.producer import Producer
from genq.services import redis_client
from genq.settings import Settings
from tests.conftest import Stack
from tests.redis_topologies import Pki, TlsRedis

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def redis_server(pki: Pki, tmp_path: Path) -> Iterator[TlsRedis]:
    """Replaces the plain one of tests/conftest.py, so the ``stack`` fixture runs over TLS."""
    with TlsRedis(pki.server, pki.ca.cert, pki.client, data_dir=tmp_path / "redis") as server:
        yield server


def tls_env(pki: Pki) -> dict[str, str]:
    return {
        "GENQ_REDIS_TLS_CA_FILE": str(pki.ca.cert),
        "GENQ_REDIS_TLS_CERT_FILE": str(pki.client.cert),
        "GENQ_REDIS_TLS_KEY_FILE": str(pki.client.key),
    }


def test_a_worker_runs_a_job_over_verified_tls(stack: Stack, pki: Pki) -> None:
    assert stack.env["GENQ_REDIS_URL"].startswith("rediss://")
    stack.env.update(tls_env(pki))
    worker = stack.worker(concurrency=1)
    producer = stack.producer()

    record = producer.submit_image("a fox over tls", num_images=1).wait(timeout=60)

    assert record.state.value == "succeeded"
    assert record.outputs and Path(record.outputs[0].path).is_file()
    assert "GENQ_REDIS_TLS_INSECURE" not in worker.output()  # verified, so no warning


def _refusal(call: object) -> str:
    assert callable(call)
    with pytest.raises(Exception) as info:
        call()
    chain, exc = [], info.value
    while exc is not None:
        chain.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return " <- ".join(chain)


@pytest.fixture
def impostor(pki: Pki, tmp_path: Path) -> Iterator[TlsRedis]:
    """A TLS Redis whose certificate another CA signed (say, someone on the path)."""
    with TlsRedis(
        pki.impostor, pki.ca.cert, pki.client, auth_clients="no", data_dir=tmp_path / "x"
    ) as server:
        yield server


def test_a_server_certificate_from_another_ca_is_refused(stack: Stack, pki: Pki, impostor: TlsRedis) -> None:
    settings = stack.settings(GENQ_REDIS_URL=impostor.url, **tls_env(pki))

    ledger = redis_client(settings)
    assert "certificate verify failed" in _refusal(ledger.ping)
    ledger.close()

    app = Celery("tls-check", set_as_current=False)
    app.conf.update(celery_config(settings))
    with app.connection_for_write() as broker:
        assert "certificate verify failed" in _refusal(
            lambda: broker.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
        )
    backend = app.backend
    assert "certificate verify failed" in _refusal(lambda: backend.client.ping())
    app.close()


def test_without_a_ca_file_the_system_cas_do_not_trust_a_private_ca(stack: Stack, impostor: TlsRedis) -> None:
    # The case kombu gets wrong by itself: rediss:// with no options meant CERT_NONE.
    settings = stack.settings(GENQ_REDIS_URL=impostor.url)
    app = Celery("tls-check", set_as_current=False)
    app.conf.update(celery_config(settings))
    with app.connection_for_write() as broker:
        assert "certificate verify failed" in _refusal(
            lambda: broker.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
        )
    app.close()


def test_the_opt_out_connects_to_anything_and_says_so(
    stack: Stack, impostor: TlsRedis, caplog: pytest.LogCaptureFixture
) -> None:
    settings: Settings = stack.settings(GENQ_REDIS_URL=impostor.url, GENQ_REDIS_TLS_INSECURE="true")
    with caplog.at_level(logging.WARNING, logger="genq.producer"):
        producer = Producer(settings)
    try:
        assert producer.redis.ping()
    finally:
        producer.close()
    assert any("GENQ_REDIS_TLS_INSECURE" in r.getMessage() for r in caplog.records)

    worker = stack.worker(concurrency=1, GENQ_REDIS_URL=impostor.url, GENQ_REDIS_TLS_INSECURE="true")
    assert "WARNING" in worker.output() and "GENQ_REDIS_TLS_INSECURE is on" in worker.output()


def test_plain_text_cannot_reach_the_tls_server(stack: Stack) -> None:
    plain = redis.Redis(
        host="127.0.0.1",
        port=stack.redis.port,
        socket_connect_timeout=1,
        socket_timeout=1,
        retry=Retry(NoBackoff(), 0),
    )
    with pytest.raises(redis.ConnectionError):
        plain.ping()  # a TLS port answers a plain-text client with nothing it can read
    plain.close()
    assert stack.settings().redis.ssl_options()["ssl_cert_reqs"] == ssl.CERT_REQUIRED
