"""``genq dashboard`` in headless Chromium during a real batch (workers, beat, the simulator): the live
table moves without a reload, a finished job's thumbnail has the very bytes the ledger recorded, a failed
job shows its reason, and the page without credentials shows nothing. Screenshots go to
``test-artifacts/dashboard-*.png``."""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from genq.embedded import free_port
from genq.simulator import SimConfig
from tests.helpers import Stack, wait_all
from tests.integration.procs import ARTIFACTS, Service, ensure_debian_packages, genq, wait_http

pytestmark = pytest.mark.integration

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1600,1100",
]  # fmt: skip
SHA256_OF_IMG = """
const [selector, done] = [arguments[0], arguments[arguments.length - 1]];
const img = document.querySelector(selector);
if (!img || !img.complete || !img.naturalWidth) { done(null); return; }
fetch(img.src, {credentials: "same-origin"}).then((r) => r.arrayBuffer())
  .then((buf) => crypto.subtle.digest("SHA-256", buf))
  .then((d) => done({width: img.naturalWidth, height: img.naturalHeight,
    sha256: Array.from(new Uint8Array(d)).map((b) => b.toString(16).padStart(2, "0")).join("")}))
  .catch((e) => done({error: String(e)}));
"""

ROW_STATES = """return Object.fromEntries(arguments[0].map((id) => {
  const cell = document.querySelector(`tr[data-job="${id}"] td.st`);
  return [id, cell ? cell.textContent : ""];
}));"""
FILES_SHOWN = """return arguments[0].every((id) => {
  const row = document.querySelector(`tr[data-job="${id}"]`);
  return row && row.children[7].textContent === "1/1";
});"""
PLOTS_DRAWN = "return [...document.querySelectorAll('img.plot')].every(i => i.complete && i.naturalWidth > 0)"


@pytest.fixture
def sim_config() -> SimConfig:
    # Jobs stay in flight a moment, so the table is seen moving.
    return SimConfig(api_key="test-key-0d9f", images_per_job=1, duration={"kind": "fixed", "value": 1.5})


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    reason = ensure_debian_packages({"chromium": "chromium", "chromedriver": "chromium-driver"})
    if reason:
        pytest.skip(f"no headless Chromium: {reason}")
    return shutil.which("chromium") or "", shutil.which("chromedriver") or ""


@pytest.fixture
def dashboard(stack: Stack) -> Iterator[tuple[str, tuple[str, str]]]:
    port = free_port()
    auth = ("ops", secrets.token_urlsafe(12))
    env = {**os.environ, **stack.env, "GENQ_DASHBOARD_BASIC_AUTH": ":".join(auth)}
    service = Service(genq("dashboard", "--port", str(port)), env, stack.tmp / "dashboard.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/", service=service)
        yield url, auth
    finally:
        service.stop()


def _wait(driver: Any, check: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            body = driver.find_element("tag name", "body").text
            pytest.fail(f"the dashboard never showed {what}:\n{body[-3000:]}")
        time.sleep(0.2)


def test_browser_sees_the_batch_live_its_pictures_and_a_failure(
    stack: Stack, dashboard: tuple[str, tuple[str, str]], chromium: tuple[str, str]
) -> None:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service as DriverService

    url, auth = dashboard
    stack.worker(concurrency=2)
    stack.beat()
    producer = stack.producer()

    options = webdriver.ChromeOptions()
    options.binary_location = chromium[0]
    profile = tempfile.mkdtemp(prefix="genq-chromium-", dir=stack.tmp)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=DriverService(executable_path=chromium[1]), options=options)
    driver.set_script_timeout(30)
    ARTIFACTS.mkdir(exist_ok=True)
    find = driver.find_elements
    try:
        token = base64.b64encode(":".join(auth).encode()).decode()
        driver.execute_cdp_cmd("Network.enable", {})
        headers = {"Authorization": f"Basic {token}"}
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": headers})
        driver.get(url + "/#/jobs")
        _wait(driver, lambda: find("css selector", "#live.on"), "the live stream connected")
        driver.execute_script("window.__notReloaded = true;")

        producer.train_model("style-1")  # for the Models view
        # One job that fails upstream, then a small batch that succeeds.
        stack.sim.configure(fail_rate=1.0)
        failed = producer.submit_image("a storm that will not be drawn").id
        _wait(driver, lambda: producer.status(failed).upstream_id, "the failing job submitted")
        stack.sim.configure(fail_rate=0.0)
        ids = [producer.submit_image(f"a paper lantern #{i}").id for i in range(4)]

        def row_states() -> dict[str, str]:
            states: dict[str, str] = driver.execute_script(ROW_STATES, [failed, *ids])
            return states

        def row_state(job: str) -> str:
            return row_states()[job]

        # Rows appear and move through their states without any reload.
        seen: dict[str, set[str]] = {j: set() for j in ids}

        def all_succeeded() -> bool:
            states = row_states()
            for j in ids:
                seen[j].add(states[j])
            return all(states[j] == "succeeded" for j in ids)

        _wait(driver, lambda: all(row_state(j) for j in ids), "the new jobs' rows")
        driver.save_screenshot(str(ARTIFACTS / "dashboard-jobs-live.png"))
        _wait(driver, all_succeeded, "every job succeeded in the table")
        _wait(driver, lambda: row_state(failed) == "failed", "the failed job's row")
        # The rows that moved are read again from the ledger: their files show up too.
        _wait(driver, lambda: driver.execute_script(FILES_SHOWN, ids), "every row's file")
        assert driver.execute_script("return window.__notReloaded === true")
        moved = {j: sorted(s - {""}) for j, s in seen.items()}
        assert any(len(s) >= 2 for s in moved.values()), moved  # seen in at least two states live
        driver.save_screenshot(str(ARTIFACTS / "dashboard-jobs-done.png"))

        # The failed job's page: its reason and its timeline.
        driver.get(url + f"/#/job/{failed}")
        reason = _wait(driver, lambda: [e.text for e in find("id", "job-error")], "the reason")[0]
        assert "upstream job failed: simulated failure" in reason
        timeline = driver.find_element("id", "timeline").text
        assert "submitting (paid POST)" in timeline and "failed" in timeline
        driver.save_screenshot(str(ARTIFACTS / "dashboard-job-failed.png"))

        # The gallery: each thumbnail's bytes are the file whose sha256 the ledger holds.
        records = wait_all(producer, ids, timeout=60)
        driver.get(url + "/#/gallery")
        for rec in records:
            out = rec.outputs[0]
            selector = f'#gallery figure[data-job="{rec.id}"] img'
            shown = _wait(driver, lambda s=selector: driver.execute_async_script(SHA256_OF_IMG, s), rec.id)
            assert shown.get("sha256") == out.sha256, shown
            assert (shown["width"], shown["height"]) == (64, 64)
        driver.save_screenshot(str(ARTIFACTS / "dashboard-gallery.png"))

        driver.get(url + "/#/models")
        _wait(driver, lambda: "style-1" in driver.find_element("id", "models").text, "the model")
        models_text = driver.find_element("id", "models").text
        assert "time in training" in models_text and "jobs parked on it" in models_text
        driver.save_screenshot(str(ARTIFACTS / "dashboard-models.png"))

        driver.get(url + "/#/health")
        _wait(
            driver,
            lambda: driver.execute_script(PLOTS_DRAWN),
            "every plot drawn",
        )
        driver.save_screenshot(str(ARTIFACTS / "dashboard-health.png"))

        # Without credentials the page shows nothing of the ledger.
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})
        driver.get(url + "/?fresh=1#/jobs")
        time.sleep(1)
        source = driver.page_source
        driver.save_screenshot(str(ARTIFACTS / "dashboard-no-credentials.png"))
    finally:
        driver.quit()
    for job in [failed, *ids]:
        assert job not in source
    assert "jobs-body" not in source and "lantern" not in source
