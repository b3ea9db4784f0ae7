"""``genq flower``: authentication on every page, API and ``/metrics``, loopback by default, task arguments
shown as job id and kind (payloads never), and a real browser reading the Tasks page during a batch."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from genq.embedded import free_port
from genq.intake import job_id_for
from genq.simulator import SimConfig
from tests.helpers import Stack, wait_all
from tests.integration.procs import ARTIFACTS, BIN, Service, ensure_debian_packages, genq, wait_http

pytestmark = pytest.mark.integration

PAGES = ["/", "/workers", "/tasks", "/broker", "/tasks/datatable", "/task/nope", "/worker/nope"]
APIS = ["/api/workers", "/api/tasks", "/api/task/types", "/api/queues/length", "/api/task/info/nope"]


@dataclass
class FlowerUnderTest:
    url: str
    auth: tuple[str, str]
    service: Service


def start_flower(stack: Stack, *args: str, auth: str | None = None) -> FlowerUnderTest:
    port = free_port()
    env = {**os.environ, **stack.env}
    env.pop("GENQ_FLOWER_BASIC_AUTH", None)
    if auth:
        env["GENQ_FLOWER_BASIC_AUTH"] = auth
    service = Service(
        genq("flower", "--port", str(port), *args), env, stack.tmp / f"flower-{port}.log"
    ).start()
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthcheck", service=service)
    user, _, password = (auth or ":").partition(":")
    return FlowerUnderTest(url, (user, password), service)


@pytest.fixture
def sim_config() -> SimConfig:
    # Jobs stay in flight a few seconds, so the batch is still running while Flower is read.
    return SimConfig(api_key="test-key-0d9f", images_per_job=1, duration={"kind": "fixed", "value": 3})


@pytest.fixture
def flower(stack: Stack) -> Iterator[FlowerUnderTest]:
    under_test = start_flower(stack, auth=f"ops:{secrets.token_urlsafe(12)}")
    yield under_test
    under_test.service.stop()


# ------------------------------------------------------------------ authentication


def test_refuses_to_start_without_credentials(stack: Stack) -> None:
    env = {k: v for k, v in {**os.environ, **stack.env}.items() if k != "GENQ_FLOWER_BASIC_AUTH"}
    port = free_port()
    done = subprocess.run(
        genq("flower", "--port", str(port)), env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "GENQ_FLOWER_BASIC_AUTH is not set" in done.stderr
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/", timeout=2)


@pytest.mark.parametrize("value", ["admin", "admin:", ":secret"])
def test_refuses_credentials_without_user_or_password(stack: Stack, value: str) -> None:
    env = {**os.environ, **stack.env, "GENQ_FLOWER_BASIC_AUTH": value}
    done = subprocess.run(genq("flower", "--port", str(free_port())), env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert "GENQ_FLOWER_BASIC_AUTH" in done.stderr
    assert "must be user:password" in done.stderr


def test_every_page_and_api_answers_401_without_the_right_credentials(flower: FlowerUnderTest) -> None:
    wrong = (flower.auth[0], flower.auth[1] + "x")
    for path in PAGES + APIS + ["/metrics"]:
        for auth in (None, wrong, ("nobody", flower.auth[1])):
            answer = requests.get(flower.url + path, auth=auth, timeout=10, allow_redirects=False)
            assert answer.status_code == 401, (path, auth and auth[0], answer.status_code)
            if not path.startswith("/api/"):  # pages ask the browser for credentials; the API just refuses
                assert answer.headers.get("WWW-Authenticate", "").startswith("Basic"), path
    for path in ["/api/task/async-apply/genq.sweep", "/api/worker/shutdown/anyone", "/api/task/revoke/x"]:
        assert requests.post(flower.url + path, timeout=10).status_code == 401, path


def test_pages_api_and_metrics_answer_with_the_credentials(flower: FlowerUnderTest) -> None:
    for path in ["/", "/workers", "/tasks", "/broker", "/api/workers", "/api/tasks", "/metrics"]:
        answer = requests.get(flower.url + path, auth=flower.auth, timeout=30)
        assert answer.status_code == 200, (path, answer.status_code)
    assert "flower_" in requests.get(flower.url + "/metrics", auth=flower.auth, timeout=10).text


def test_healthcheck_stays_open_and_says_nothing(flower: FlowerUnderTest) -> None:
    answer = requests.get(flower.url + "/healthcheck", timeout=10)
    assert (answer.status_code, answer.text) == (200, "OK")


def test_plain_celery_flower_leaves_metrics_open_which_genq_flower_closes(stack: Stack) -> None:
    """Flower's own ``/metrics`` needs no credentials even with --basic-auth: what genq flower fixes."""
    port = free_port()
    env = {**os.environ, **stack.env}
    plain = Service(
        [str(BIN / "celery"), "-A", "genq.worker", "flower", f"--port={port}", "--address=127.0.0.1",
         "--basic-auth=ops:pw-0d9f"],
        env,
        stack.tmp / "plain-flower.log",
    ).start()  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthcheck", service=plain)
        assert requests.get(url + "/workers", timeout=10).status_code == 401
        opened = requests.get(url + "/metrics", timeout=10)
        assert opened.status_code == 200
        assert "flower_" in opened.text
    finally:
        plain.stop()


def test_binds_to_loopback_by_default(flower: FlowerUnderTest) -> None:
    listening = [
        c.laddr
        for p in [
            psutil.Process(flower.service.pid),
            *psutil.Process(flower.service.pid).children(recursive=True),
        ]
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening, "Flower listens nowhere"
    assert {addr.ip for addr in listening} == {"127.0.0.1"}


def test_local_only_needs_no_credentials_but_refuses_other_host_names(stack: Stack) -> None:
    local = start_flower(stack, "--local-only")
    try:
        assert requests.get(local.url + "/workers", timeout=10).status_code == 200
        # A page that DNS-rebinds its own name to 127.0.0.1 still sends its own Host header.
        rebound = requests.get(local.url + "/workers", headers={"Host": "attacker.example:5555"}, timeout=10)
        assert rebound.status_code == 403
        assert (
            requests.get(local.url + "/api/workers", headers={"Host": "attacker.example"}).status_code == 403
        )
    finally:
        local.service.stop()


# ------------------------------------------------------------------ what Flower shows


def _datatable(flower: FlowerUnderTest) -> list[dict[str, object]]:
    params = {
        "draw": "1", "start": "0", "length": "500", "search[value]": "",
        "order[0][column]": "0", "order[0][dir]": "desc", "columns[0][data]": "received",
    }  # fmt: skip
    answer = requests.get(flower.url + "/tasks/datatable", params=params, auth=flower.auth, timeout=30)
    answer.raise_for_status()
    rows: list[dict[str, object]] = answer.json()["data"]
    return rows


def _wait_rows(flower: FlowerUnderTest, done: object, timeout: float = 60) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = _datatable(flower)
        if done(rows):  # type: ignore[operator]
            return rows
        if time.monotonic() > deadline:
            pytest.fail(f"Flower's tasks never showed what was expected: {rows[:10]}")
        time.sleep(0.5)


def test_tasks_show_their_name_job_id_and_kind_and_never_a_payload(
    stack: Stack, flower: FlowerUnderTest
) -> None:
    stack.worker(concurrency=2)
    producer = stack.producer()
    job = producer.submit_image("a quiet harbour", num_images=1)
    # A by-name intake carries the whole request; Flower must show its ids, not the prompt.
    canary = f"PROMPT-CANARY-{secrets.token_hex(4)}"
    producer.celery.send_task(
        "genq.intake", args=[{"kind": "image", "prompt": canary}, "order-77"], queue="submit"
    )
    intake_job = job_id_for("order-77")
    deadline = time.monotonic() + 30
    while producer.ledger.get(intake_job) is None:  # the worker records it when the intake task runs
        assert time.monotonic() < deadline, "the intake task never ran"
        time.sleep(0.2)
    wait_all(producer, [job.id, intake_job], timeout=90)

    rows = _wait_rows(
        flower,
        lambda rows: (
            {"genq.submit", "genq.poll", "genq.download", "genq.intake"} <= {r["name"] for r in rows}
        ),
    )
    shown = {(r["name"], r["args"]) for r in rows}
    assert ("genq.submit", f"image job={job.id} gen=0") in shown
    assert ("genq.download", f"image job={job.id} index=0 attempt=0") in shown
    assert any(n == "genq.poll" and a.startswith(f"image job={job.id} gen=") for n, a in shown)  # type: ignore[union-attr]
    assert ("genq.intake", f"image request_id=order-77 job={intake_job}") in shown
    pages = (
        json.dumps(rows)
        + requests.get(
            flower.url + "/task/" + next(str(r["uuid"]) for r in rows if r["name"] == "genq.intake"),
            auth=flower.auth,
            timeout=10,
        ).text
    )
    assert canary not in pages
    # The upstream API key is no task argument and no Celery setting: Flower has nothing to show.
    worker_pages = requests.get(flower.url + "/api/workers?refresh=1", auth=flower.auth, timeout=30).text
    assert stack.sim.api_key not in pages + worker_pages


# ------------------------------------------------------------------ a real browser


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=2000,1200",
]  # fmt: skip


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    reason = ensure_debian_packages({"chromium": "chromium", "chromedriver": "chromium-driver"})
    if reason:
        pytest.skip(f"no headless Chromium: {reason}")
    return shutil.which("chromium") or "", shutil.which("chromedriver") or ""


def test_browser_logs_in_and_sees_the_batch_on_the_tasks_page(
    stack: Stack, flower: FlowerUnderTest, chromium: tuple[str, str]
) -> None:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service as DriverService

    stack.worker(concurrency=2)
    stack.beat()
    producer = stack.producer()
    # Long enough upstream jobs that the batch is still in flight when a slow Chromium shows the page.
    ids = [producer.submit_image(f"a lantern #{i} [sim:duration=5]").id for i in range(8)]

    options = webdriver.ChromeOptions()
    options.binary_location = chromium[0]
    profile = tempfile.mkdtemp(prefix="genq-chromium-", dir=stack.tmp)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=DriverService(executable_path=chromium[1]), options=options)
    job = ids[0]
    try:
        # Basic auth on every request the page makes, its AJAX calls included.
        token = base64.b64encode(":".join(flower.auth).encode()).decode()
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd(
            "Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}}
        )
        driver.get(flower.url + "/tasks")
        _wait_for(driver, lambda body: "genq.poll" in body and any(f"image job={i}" in body for i in ids))
        in_flight = [r.state.value for r in (producer.status(i) for i in ids) if not r.terminal]
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "flower-tasks-during-batch.png"))
        # Then one job's whole life, once it has ended: search the table for its id.
        producer.wait(job, timeout=60)
        driver.refresh()
        driver.find_element("css selector", "input[type='search']").send_keys(job)
        _wait_for(
            driver,
            lambda body: (
                {"genq.submit", "genq.poll", "genq.download"} <= set(body.split())
                and f"image job={job}" in body
            ),
        )
        shot = ARTIFACTS / "flower-tasks-one-job.png"
        driver.save_screenshot(str(shot))
        body = driver.find_element("tag name", "body").text
    finally:
        driver.quit()

    assert "Access denied" not in body
    assert in_flight, "the batch had finished before the Tasks page showed it"
    assert f"image job={job} gen=" in body  # its polls, with their generation
    assert f"image job={job} index=0 attempt=0" in body
    assert Path(shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshots in {ARTIFACTS}; jobs in flight when the page first showed the batch: {in_flight}")
    records = wait_all(producer, ids, timeout=120)
    assert all(r.state.value == "succeeded" for r in records), [r.error for r in records]


def _wait_for(driver: object, seen: object, timeout: float = 60) -> None:
    """Until ``seen(visible text of the page)``; the table refreshes itself as events arrive."""
    deadline = time.monotonic() + timeout
    while True:
        body = driver.find_element("tag name", "body").text  # type: ignore[attr-defined]
        if seen(body):  # type: ignore[operator]
            return
        if time.monotonic() > deadline:
            pytest.fail("the Tasks page never showed what was expected:\n" + body[-3000:])
        time.sleep(0.5)
