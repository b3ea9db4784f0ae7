"""One regression test per reliability hole fixed by 74ad87e (found at d11bef6).

Step-level: a JobService / TrainingService / Sweeper / CallbackService against a real redis-server on
a free port, a fake clock, and ``responses`` for the upstream; the actions each step returns are run
in-process by :class:`Rig` (what ``tasks.jobs.dispatch`` would send). Where a hole needs a real socket
(dripping peers, a dead broker) or a process with a skewed wall clock, the test makes exactly that.
Calls pass a step generation only where the code under test takes one, so each test shows its hole
by behaviour on the code before the fix, not by a missing argument.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import requests
import responses
from pydantic import SecretStr

from config.celeryconf import celery_config
from config.settings import Settings, load_settings
from genq import control, intake, keys
from genq.actions import (
    Admit,
    Download,
    Finalize,
    Notify,
    PollLater,
    PollModelLater,
    SubmitLater,
    TrainLater,
)
from genq.api import UpstreamClient
from genq.callbacks import CallbackService, callback_policy
from genq.embedded import EmbeddedRedis
from genq.errors import UpstreamUnavailable
from genq.jobs import JobService
from genq.ledger import Ledger
from genq.limits import Limits, UpstreamLimiter
from genq.model_ledger import ModelLedger
from genq.netguard import guarded_session
from genq.producer import Producer
from genq.schemas import ImageRequest, JobKind, JobState, ModelState, WorkflowRequest
from genq.services import redis_client
from genq.sweeper import Sweeper
from genq.training import TrainingService
from genq.workflows import WorkflowService
from tests.conftest import environment

pytestmark = pytest.mark.integration
API = "https://api.test"
HOOK = "http://127.0.0.1:9/hook"
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32
ROOT = Path(__file__).parents[2]
GRACE = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _env(redis_server: EmbeddedRedis, tmp_path: Path) -> dict[str, str]:
    return {
        "GENQ_REDIS_URL": redis_server.url,
        "GENQ_API_BASE_URL": API,
        "GENQ_API_KEY": "k",
        "GENQ_DOWNLOAD_DIR": str(tmp_path / "dl"),
        "GENQ_POLL_IMAGE": json.dumps(
            {"first_delay": 2, "interval": 2, "max_interval": 4, "deadline": 7200, "jitter": 0}
        ),
        "GENQ_POLL_UPSCALE": json.dumps(
            {"first_delay": 2, "interval": 2, "max_interval": 4, "deadline": 7200, "jitter": 0}
        ),
        "GENQ_POLL_MODEL": json.dumps(
            {"first_delay": 1, "interval": 1, "max_interval": 1, "deadline": 3600, "jitter": 0}
        ),
        "GENQ_POLL_MAX_ERRORS": "3",
        "GENQ_WORKER_SWEEP_GRACE": str(GRACE),
        "GENQ_CALLBACKS_SECRET": "whsec-holes",
        "GENQ_CALLBACKS_ALLOW_HTTP": "true",
        "GENQ_CALLBACKS_ALLOWED_NETWORKS": "127.0.0.0/8",
        "GENQ_CALLBACKS_TIMEOUT": "1",
    }


@pytest.fixture
def env(redis_server: EmbeddedRedis, tmp_path: Path) -> dict[str, str]:
    return _env(redis_server, tmp_path)


def _settings(env: dict[str, str], **extra: str) -> Settings:
    with environment({**env, **extra}):
        return load_settings()


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return _settings(env)


def _takes_gen(fn: Callable[..., Any]) -> bool:
    return "gen" in inspect.signature(fn).parameters


def _train_msg(training: TrainingService, model_id: str, gen: int) -> TrainLater:
    """The train message; the old TrainLater (and train task) had no generation."""
    make: Any = TrainLater
    return make(model_id, 0.0, *([gen] if _takes_gen(training.train) else []))  # type: ignore[no-any-return]


def _submit_msg(job_id: str, gen: int = 0) -> SubmitLater:
    """The message a producer (gen 0) or a resubmit sends; the old SubmitLater had no generation."""
    try:
        make: Any = SubmitLater
        return make(job_id, 0.0, gen)  # type: ignore[no-any-return]
    except TypeError:
        return SubmitLater(job_id, 0.0)


@dataclass
class Rig:
    settings: Settings
    clock: Clock
    ledger: Ledger
    jobs: JobService
    models: ModelLedger
    training: TrainingService
    sweeper: Sweeper
    callbacks: CallbackService
    errors: list[BaseException]

    def step(self, action: Any) -> list[Any]:
        """Run one message as a worker would: an exception fails the task (Celery acks it)."""
        try:
            match action:
                case SubmitLater():
                    if _takes_gen(self.jobs.submit):
                        return self.jobs.submit(action.job_id, getattr(action, "gen", 0))
                    return self.jobs.submit(action.job_id)
                case PollLater(job_id, gen, _):
                    return self.jobs.poll(job_id, gen)
                case Download(job_id, index, attempt, _):
                    return self.jobs.download(job_id, index, attempt)
                case Finalize(job_id):
                    return self.jobs.finalize(job_id)
                case Notify():
                    return self.callbacks.deliver(action.job_id, lambda *a: None)
                case TrainLater():
                    if _takes_gen(self.training.train):
                        return self.training.train(action.model_id, getattr(action, "gen", 0))
                    return self.training.train(action.model_id)
                case PollModelLater(model_id, gen, _):
                    return self.training.poll(model_id, gen)
                case Admit(family, token, _):
                    return self.jobs.admit(family, token)
        except Exception as exc:  # a task failure: recorded, the message is gone
            self.errors.append(exc)
            return []
        raise AssertionError(f"unknown action {action!r}")

    def run(self, actions: list[Any], max_steps: int = 30) -> list[Any]:
        """Run messages and what they lead to, first in first out; returns what is left."""
        queue = list(actions)
        for _ in range(max_steps):
            if not queue:
                break
            queue += self.step(queue.pop(0))
        return queue

    def sweep(self, after: float = GRACE + 1) -> list[Any]:
        self.clock.now += after
        actions, _ = self.sweeper.sweep()
        return actions

    def state(self, job_id: str) -> JobState:
        rec = self.ledger.get(job_id)
        assert rec is not None
        return rec.state


def _rig(settings: Settings, clock: Clock, job_ttl: int | None = None) -> Rig:
    client = redis_client(settings)
    ledger = Ledger(client, clock=clock, job_ttl=job_ttl or settings.worker.job_ttl, grace=GRACE)
    api = UpstreamClient(API, settings.api.key, session=requests.Session())
    rng = random.Random(1)
    jobs = JobService(settings, ledger, api, requests.Session(), clock, rng, WorkflowService(ledger))
    models = ModelLedger(client, grace=GRACE, clock=clock)
    training = TrainingService(settings, models, api, jobs, clock, rng)
    sweeper = Sweeper(ledger, models, jobs, clock)
    callbacks = CallbackService(settings, ledger, requests.Session(), clock, rng)
    return Rig(settings, clock, ledger, jobs, models, training, sweeper, callbacks, [])


@pytest.fixture
def rig(settings: Settings) -> Rig:
    return _rig(settings, Clock())


@pytest.fixture
def upstream() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


class Throttle:
    """A limiter that always says wait ``wait`` seconds (nothing is ever sent)."""

    def __init__(self, wait: float) -> None:
        self.wait = wait

    def admit(
        self, family: str, lane: str = "", caller: str = "", queue: bool = False
    ) -> tuple[None, float, bool]:
        return None, self.wait, False

    def queues(self, family: str) -> bool:
        return False

    def release(self, permit: object) -> None:
        pass

    def block(self, seconds: float) -> None:
        pass


def _image(rig: Rig, job_id: str = "j1", outputs: int = 1, callback: dict[str, Any] | None = None) -> str:
    rig.ledger.create(job_id, JobKind.IMAGE, {"prompt": "p"}, expected_outputs=outputs, callback=callback)
    return job_id


def _workflow(rig: Rig, key: str = "wf-key") -> tuple[str, str]:
    """A running workflow and its generate step (pending)."""
    accepted = intake.accept(
        rig.ledger, WorkflowRequest(generate=ImageRequest(prompt="a boat", num_images=2)), idempotency_key=key
    )
    wf = rig.ledger.get(accepted.id)
    assert wf is not None and wf.state is JobState.RUNNING and len(wf.children) == 1
    return wf.id, wf.children[0]


def _posts(upstream: responses.RequestsMock) -> list[Any]:
    return [c for c in upstream.calls if c.request.method == "POST" and (c.request.url or "").startswith(API)]


def _trigger_ok(upstream: responses.RequestsMock, upstream_id: str = "up1") -> None:
    upstream.post(re.compile(re.escape(API) + r"/.*"), json={"result": {"jobId": upstream_id}})


def _upstream_success(upstream: responses.RequestsMock, upstream_id: str = "up1", images: int = 1) -> None:
    found = [{"id": f"i{i}", "url": f"https://files.test/{upstream_id}/{i}.png"} for i in range(images)]
    upstream.get(
        f"{API}/jobs/{upstream_id}",
        json={"result": {"jobId": upstream_id, "status": "success", "images": found}},
    )
    for i in range(images):
        upstream.get(f"https://files.test/{upstream_id}/{i}.png", body=PNG, content_type="image/png")


# ---------------------------------------------------------------------------------------- 1


def test_hole01_sweeper_resumes_a_running_workflow_whose_step_hook_was_lost(
    rig: Rig, upstream: responses.RequestsMock
) -> None:
    """Hole 1: the sweeper treated a running workflow as a polled job (a genq.poll that did nothing).
    Invariant: a workflow whose generate step ended without its step-ended hook (the worker died right
    after the ending) is re-driven by the sweeper: its upscales are created and submitted."""
    wf_id, step_id = _workflow(rig)
    # The step's ending as the ledger saw it; the hook that would start the upscales never ran.
    assert rig.ledger.transition(step_id, [JobState.PENDING], JobState.SUCCEEDED, remote_ids=["i0", "i1"]).ok
    _trigger_ok(upstream, "up-upscale")
    upstream.get(f"{API}/jobs/up-upscale", json={"result": {"jobId": "up-upscale", "status": "running"}})

    for _ in range(2):
        rig.run(rig.sweep())

    wf = rig.ledger.get(wf_id)
    assert wf is not None and wf.state is JobState.RUNNING
    assert len(wf.children) == 3, f"no upscale step was created: children {wf.children}"
    assert [c.request.url for c in _posts(upstream)] == [f"{API}/images/upscaling"] * 2
    assert not rig.errors


# ---------------------------------------------------------------------------------------- 2


def _downloading(rig: Rig, upstream: responses.RequestsMock) -> str:
    _trigger_ok(upstream)
    _upstream_success(upstream)
    job_id = _image(rig)
    (poll,) = rig.run([_submit_msg(job_id)], max_steps=1)
    assert isinstance(poll, PollLater)
    downloads = rig.step(poll)
    assert [type(a) for a in downloads] == [Download] and rig.state(job_id) is JobState.DOWNLOADING
    return job_id


def _run_downloads_and_sweeps(rig: Rig, job_id: str, rounds: int = 12) -> None:
    queue: list[Any] = [Download(job_id, 0)]
    for _ in range(rounds):
        queue = rig.run(queue, max_steps=10)
        if rig.state(job_id).terminal:
            return
        queue += rig.sweep()


def test_hole02_local_io_error_on_the_file_ends_the_job_failed_within_max_attempts(
    rig: Rig, upstream: responses.RequestsMock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hole 2: a raw OSError of our own disk escaped JobService.download, so the job stayed
    ``downloading`` for ever (each re-drive failed the same way). Invariant: a local I/O error is a
    counted transient error; after ``download.max_attempts`` tries the job ends ``failed`` with the
    reason."""
    job_id = _downloading(rig, upstream)
    tries = []

    def no_space(src: Any, dst: Any) -> None:
        tries.append(dst)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    _run_downloads_and_sweeps(rig, job_id)

    rec = rig.ledger.get(job_id)
    assert rec is not None and rec.state is JobState.FAILED, (rec and rec.state, rig.errors[:2])
    assert "No space left" in (rec.error or "")
    assert 1 <= len(tries) <= rig.settings.download.max_attempts


def test_hole02b_unusable_download_dir_ends_the_job_failed_within_max_attempts(
    rig: Rig, upstream: responses.RequestsMock, tmp_path: Path
) -> None:
    """Hole 2 (the download dir itself): GENQ_DOWNLOAD_DIR under a regular file, so mkdir raises.
    Invariant: as above, the job ends ``failed`` after at most ``download.max_attempts`` tries."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    download = rig.settings.download.model_copy(update={"dir": blocker / "dl"})
    rig.jobs.settings = rig.settings.model_copy(update={"download": download})
    job_id = _downloading(rig, upstream)

    _run_downloads_and_sweeps(rig, job_id)

    assert rig.state(job_id) is JobState.FAILED


# ---------------------------------------------------------------------------------------- 3


def test_hole03_throttled_submits_re_driven_by_the_sweeper_keep_one_chain(
    rig: Rig, upstream: responses.RequestsMock
) -> None:
    """Hole 3: a throttled submit re-enqueued itself with no generation, so every sweeper re-drive of a
    job whose messages were late became one more permanent submit chain. Invariant: however many
    sweeps run while the limiter holds the job back, at most one live submit message exists for it."""
    _trigger_ok(upstream)
    job_id = _image(rig)
    rig.jobs.api.limiter = Throttle(5.0)  # type: ignore[assignment]
    queue: list[Any] = [_submit_msg(job_id)]
    chains = []
    for _ in range(5):
        # The queue is slow: every message is delivered only after the sweeper ran again.
        queue += [a for a in rig.sweep(3 * GRACE) if isinstance(a, SubmitLater)]
        delivered, queue = queue, []
        for message in delivered:
            queue += rig.step(message)
        assert all(isinstance(a, SubmitLater) for a in queue)
        chains.append(len(queue))

    assert max(chains) <= 1, f"live submit chains per round: {chains}"
    assert rig.state(job_id) is JobState.PENDING and not _posts(upstream) and not rig.errors


def test_hole03b_a_submit_queued_by_the_rate_limit_has_no_message_until_its_turn(
    rig: Rig, upstream: responses.RequestsMock
) -> None:
    """Hole 3 for the admission queue: a submit the rate limit refuses waits in Redis for its turn.
    Invariant: while it waits no sweep re-drives it and no submit message exists for it (only the
    tick's); at its turn it is sent once and POSTed once."""
    _trigger_ok(upstream)
    limiter = UpstreamLimiter(rig.ledger.redis, Limits(rates={"trigger": 0.001}))  # one call per 1,050 s
    rig.jobs.api.limiter = limiter
    assert limiter.admit("trigger", caller="another-job", queue=True)[0] is not None  # the window's call
    job_id = _image(rig)

    (tick,) = rig.step(_submit_msg(job_id))

    assert isinstance(tick, Admit)
    for _ in range(5):
        assert [a for a in rig.sweep(3 * GRACE) if getattr(a, "job_id", None) == job_id] == []
    assert rig.state(job_id) is JobState.PENDING and not _posts(upstream)
    (later,) = rig.step(tick)
    assert isinstance(later, Admit)
    assert later == Admit("trigger", later.token, pytest.approx(1050, abs=5))  # no room yet
    rig.ledger.redis.delete(keys.limit_window("trigger"))  # the window's call aged out
    (sent,) = rig.step(later)
    assert isinstance(sent, SubmitLater) and sent.job_id == job_id
    rig.run([sent], max_steps=1)
    assert len(_posts(upstream)) == 1 and rig.state(job_id) is JobState.SUBMITTED and not rig.errors


# ---------------------------------------------------------------------------------------- 4


def test_hole04_a_long_throttled_poll_is_held_and_not_re_driven_before_its_wait(
    rig: Rig, upstream: responses.RequestsMock
) -> None:
    """Hole 4: the limiter's wait (up to 3600 s after a 429) was sent as a countdown, past
    ``poll.countdown_max``, without moving the due time, so the sweeper re-drove the job meanwhile and
    the waits multiplied. Invariant: a throttled poll records its wait; a long one is held in Redis (no
    countdown message) and the sweeper dispatches the job only once the wait is over."""
    _trigger_ok(upstream)
    upstream.get(f"{API}/jobs/up1", json={"result": {"jobId": "up1", "status": "running"}})
    job_id = _image(rig)
    (poll,) = rig.step(_submit_msg(job_id))
    rig.jobs.api.limiter = Throttle(3600.0)  # type: ignore[assignment]

    after_throttle = rig.step(poll)

    countdown_max = rig.settings.poll.countdown_max
    assert not [a for a in after_throttle if getattr(a, "delay", 0) > countdown_max], after_throttle
    assert [a for a in rig.sweep(120) if getattr(a, "job_id", None) == job_id] == []
    assert [a for a in rig.sweep(1200) if getattr(a, "job_id", None) == job_id] == []
    rig.jobs.api.limiter = None
    (resumed,) = [a for a in rig.sweep(3600 - 1320 + 1) if getattr(a, "job_id", None) == job_id]
    assert isinstance(resumed, PollLater)
    assert rig.step(resumed) and rig.state(job_id) is JobState.RUNNING


# ---------------------------------------------------------------------------------------- 5


def test_hole05_sweeps_do_not_expire_when_late_and_a_backlog_of_them_is_cheap(
    settings: Settings, rig: Rig
) -> None:
    """Hole 5: sweep messages expired after two sweep intervals, so on a busy poll queue every sweep
    was dropped just when held waits and lost messages needed one. Invariant: a late sweep still runs
    (expires >= 900 s) and sweeps that come together cost nothing after the first."""
    options = celery_config(settings)["beat_schedule"]["genq-sweep"]["options"]
    assert options["expires"] >= 900, options

    _image(rig, "a")
    rig.clock.now += GRACE + 1
    first, _ = rig.sweeper.sweep(min_gap=1)
    _image(rig, "b")
    rig.clock.now += GRACE + 1
    second, seen = rig.sweeper.sweep(min_gap=1)
    assert [getattr(a, "job_id", None) for a in first] == ["a"]
    assert second == [] and not seen
    time.sleep(1.05)
    third, _ = rig.sweeper.sweep(min_gap=1)
    assert {getattr(a, "job_id", None) for a in third} == {"a", "b"}


# ---------------------------------------------------------------------------------------- 6


def test_hole06_a_train_call_that_timed_out_is_never_made_again(
    rig: Rig, upstream: responses.RequestsMock
) -> None:
    """Hole 6: no compare-and-set guarded the train call: a read timeout (the upstream may have
    started training) led to a second train call. Invariant: one train call per request; an ambiguous
    answer goes on to readiness checks."""
    train = upstream.get(f"{API}/models/m1/train", body=requests.ReadTimeout("slow"))
    upstream.get(f"{API}/models/m1", json={"result": {"modelId": "m1", "status": "training"}})
    gen = int(rig.training.request("m1"))

    rig.run([_train_msg(rig.training, "m1", gen)])
    for _ in range(3):
        rig.run(rig.sweep(), max_steps=10)

    assert train.call_count == 1
    model = rig.models.get("m1")
    assert model is not None and model.state is ModelState.TRAINING


def test_hole06b_a_duplicate_train_delivery_during_the_call_makes_no_second_call(
    rig: Rig, upstream: responses.RequestsMock
) -> None:
    """Hole 6 (duplicates): a second delivery of the same train message while the first call is in
    flight (a broker redelivery) must not call the upstream again."""
    gen = int(rig.training.request("m1"))
    nested: list[Any] = []

    def answer(request: Any) -> tuple[int, dict[str, str], str]:
        if not nested:
            nested.append("running")
            nested.append(rig.step(_train_msg(rig.training, "m1", gen)))
        return 200, {"Content-Type": "text/plain"}, "training started"

    train = upstream.add_callback(responses.GET, f"{API}/models/m1/train", callback=answer)

    rig.step(_train_msg(rig.training, "m1", gen))

    assert nested and train.call_count == 1
    model = rig.models.get("m1")
    assert model is not None and model.state is ModelState.TRAINING


# ---------------------------------------------------------------------------------------- 7


def test_hole07_a_resubmitted_job_reports_its_real_ending_with_a_new_delivery_id(
    rig: Rig, upstream: responses.RequestsMock
) -> None:
    """Hole 7: after ``resubmit`` the callback stayed ``delivered`` (for the submit_unknown ending), so
    the producer never heard of the real ending. Invariant: the real ending is delivered too, with a
    different delivery id; a delivery message for the old ending does nothing while the job runs."""
    upstream.post(f"{API}/images/generation", body=requests.ReadTimeout("slow"))
    hook = upstream.post(HOOK, status=200)
    job_id = _image(rig, callback={"url": HOOK})
    rig.run([_submit_msg(job_id)])
    assert rig.state(job_id) is JobState.SUBMIT_UNKNOWN and hook.call_count == 1

    gen = control.resubmit(rig.ledger, job_id)
    assert gen not in (None, False)
    assert rig.step(Notify(job_id)) == [] and hook.call_count == 1  # stale: the job is live again
    upstream.replace(responses.POST, f"{API}/images/generation", json={"result": {"jobId": "up2"}})
    _upstream_success(upstream, "up2")
    rig.run([_submit_msg(job_id, int(gen))])

    assert rig.state(job_id) is JobState.SUCCEEDED and len(_posts(upstream)) == 2
    assert hook.call_count == 2, "the real ending was never reported"
    bodies = [json.loads(c.request.body or b"") for c in upstream.calls if c.request.url == HOOK]
    deliveries = [c.request.headers["Genq-Delivery"] for c in upstream.calls if c.request.url == HOOK]
    assert [b["state"] for b in bodies] == ["submit_unknown", "succeeded"]
    assert deliveries[0] != deliveries[1]


# ---------------------------------------------------------------------------------------- 8


def test_hole08a_pending_job_with_an_upstream_id_is_adopted_not_posted_again(
    rig: Rig, upstream: responses.RequestsMock
) -> None:
    """Hole 8a: a job ``pending`` with an upstream id (the POST went through, the move to submitting
    was lost) was POSTed again. Invariant: it is polled as that upstream job; no second paid POST."""
    _trigger_ok(upstream, "up2")
    upstream.get(f"{API}/jobs/up1", json={"result": {"jobId": "up1", "status": "running"}})
    job_id = _image(rig)
    rig.ledger.set_fields(job_id, upstream_id="up1")

    rig.run([_submit_msg(job_id)], max_steps=3)

    assert _posts(upstream) == []
    rec = rig.ledger.get(job_id)
    assert rec is not None and rec.upstream_id == "up1" and rec.state is JobState.RUNNING


@pytest.mark.parametrize("status", [502, 504])
def test_hole08b_gateway_errors_on_submit_are_ambiguous_and_never_retried(
    rig: Rig, upstream: responses.RequestsMock, status: int
) -> None:
    """Hole 8b: 502/504 were retried, though the gateway had passed the paid POST on. Invariant: the
    job ends ``submit_unknown`` after one POST."""
    upstream.post(f"{API}/images/generation", status=status, body="bad gateway")
    job_id = _image(rig)

    rig.run([_submit_msg(job_id)], max_steps=10)

    assert len(_posts(upstream)) == 1
    assert rig.state(job_id) is JobState.SUBMIT_UNKNOWN


def test_hole08c_an_unreadable_2xx_submit_answer_is_submit_unknown_not_failed(
    rig: Rig, upstream: responses.RequestsMock
) -> None:
    """Hole 8c: a 2xx trigger answer that did not parse failed the job, although the upstream had
    accepted (and may bill) it; resubmitting a failed job is not offered, so nothing says "check".
    Invariant: it ends ``submit_unknown``."""
    upstream.post(f"{API}/images/generation", status=200, body="<html>ok</html>", content_type="text/html")
    job_id = _image(rig)

    rig.run([_submit_msg(job_id)], max_steps=10)

    assert len(_posts(upstream)) == 1
    assert rig.state(job_id) is JobState.SUBMIT_UNKNOWN


# ---------------------------------------------------------------------------------------- 9


def test_hole09_a_cancel_racing_the_workflow_fan_out_leaves_no_upscale_posted(
    rig: Rig, upstream: responses.RequestsMock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hole 9: a cancel landing while the fan-out created the upscale steps (after it read the
    workflow, before it recorded the steps) missed them, and their submits POSTed for a cancelled
    workflow. Invariant: a step of a workflow that has ended is cancelled at submit, with no POST."""
    wf_id, step_id = _workflow(rig)
    assert rig.ledger.transition(step_id, [JobState.PENDING], JobState.SUCCEEDED, remote_ids=["i0", "i1"]).ok
    _trigger_ok(upstream, "up-upscale")
    real_set_fields = rig.ledger.set_fields

    def cancel_first(job_id: str, **fields: Any) -> None:
        if job_id == wf_id and "children" in fields:
            assert control.cancel(rig.ledger, wf_id)  # the operator's cancel, just before the write
        real_set_fields(job_id, **fields)

    monkeypatch.setattr(rig.ledger, "set_fields", cancel_first)
    step = rig.ledger.get(step_id)
    assert step is not None
    submits = [a for a in rig.jobs.workflows.step_ended(step) if isinstance(a, SubmitLater)]
    assert len(submits) == 2

    rig.run(submits)

    assert _posts(upstream) == []
    assert rig.state(wf_id) is JobState.CANCELLED
    assert {rig.state(a.job_id) for a in submits} == {JobState.CANCELLED}


# ---------------------------------------------------------------------------------------- 10


def _half_created_workflow(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> str:
    real_create = rig.ledger.create
    failed: list[bool] = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("parent_id") and not failed:
            failed.append(True)
            raise redis.ConnectionError("Redis went away")
        return real_create(*args, **kwargs)

    monkeypatch.setattr(rig.ledger, "create", flaky)
    with pytest.raises(redis.ConnectionError):
        intake.accept(
            rig.ledger,
            WorkflowRequest(generate=ImageRequest(prompt="a boat", num_images=2)),
            idempotency_key="half",
        )
    (wf_id,) = [str(i, "utf-8") for i in cast(list[bytes], rig.ledger.redis.zrange(keys.JOBS, 0, -1))]
    assert rig.state(wf_id) is JobState.PENDING
    return wf_id


def test_hole10_a_retried_accept_finishes_a_half_created_workflow(
    rig: Rig, upstream: responses.RequestsMock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hole 10 (retry): Redis failed between writing the workflow and its first step; the retry with
    the same key returned the workflow, which stayed ``pending`` for ever. Invariant: the retry starts
    it (one generate step, submitted)."""
    wf_id = _half_created_workflow(rig, monkeypatch)
    _trigger_ok(upstream)

    again = intake.accept(
        rig.ledger,
        WorkflowRequest(generate=ImageRequest(prompt="a boat", num_images=2)),
        idempotency_key="half",
    )
    rig.run([_submit_msg(j) for j in again.to_submit], max_steps=1)

    assert again.id == wf_id
    wf = rig.ledger.get(wf_id)
    assert wf is not None and wf.state is JobState.RUNNING and len(wf.children) == 1
    assert len(_posts(upstream)) == 1


def test_hole10b_the_sweeper_finishes_a_half_created_workflow(
    rig: Rig, upstream: responses.RequestsMock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hole 10 (no retry): nobody retries the accept; the sweeper starts the pending workflow."""
    wf_id = _half_created_workflow(rig, monkeypatch)
    _trigger_ok(upstream)

    for _ in range(2):
        rig.run(rig.sweep(), max_steps=3)

    wf = rig.ledger.get(wf_id)
    assert wf is not None and wf.state is JobState.RUNNING and len(wf.children) == 1
    assert len(_posts(upstream)) == 1


# ---------------------------------------------------------------------------------------- 11


def test_hole11_expired_jobs_are_trimmed_from_every_index(settings: Settings) -> None:
    """Hole 11: ``genq:jobs`` (and the due indexes) kept the ids of expired records for ever.
    Invariant: once an ended job's record expires, a sweep drops its id from every index."""
    rig = _rig(settings, Clock(), job_ttl=1)
    job_id = _image(rig, callback={"url": HOOK})
    assert rig.ledger.transition(job_id, [JobState.PENDING], JobState.FAILED, error="x").ok
    # Its callback settled (the record lives on while one is due), so its TTL runs.
    rig.ledger.callback_attempted(job_id, state="delivered", attempts=1, error=None, retry_at=None)
    r = rig.ledger.redis
    assert r.zscore(keys.JOBS, job_id) is not None
    deadline = time.monotonic() + 5
    while r.exists(keys.job(job_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not r.exists(keys.job(job_id))

    rig.sweep(5)

    for index in (keys.JOBS, keys.DUE, keys.CALLBACKS_DUE):
        assert r.zscore(index, job_id) is None, index


# ---------------------------------------------------------------------------------------- 12

_SKEWED_PRODUCER = """
import json, sys, time
_real = time.time
time.time = lambda: _real() + float(sys.argv[1])  # this host's wall clock is off
from config.settings import load_settings
from genq.producer import Producer
p = Producer(load_settings())
job = p.submit_image("a skewed clock")
rec = p.status(job.id)
p.train_model("skewed-model")
model = p.model_status("skewed-model")
s, us = p.redis.time()
print(json.dumps({"created_at": rec.created_at, "redis_now": s + us / 1e6,
                  "requested_at": model.requested_at, "gen": model.poll_gen}))
p.close()
"""


def _skewed_producer(env: dict[str, str], skew: float) -> dict[str, Any]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    out = subprocess.run(
        [sys.executable, "-c", _SKEWED_PRODUCER, str(skew)],
        env={**clean, **env, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    got: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return got


def test_hole12_a_producer_with_a_skewed_wall_clock_records_redis_time(
    env: dict[str, str], settings: Settings, upstream: responses.RequestsMock
) -> None:
    """Hole 12: due times and deadlines came from each producer's and worker's wall clock. Invariant:
    timestamps agree with Redis TIME whatever the host's clock says, and a model requested from a
    producer two hours behind is not timed out at its first readiness check."""
    got = _skewed_producer(env, -7200.0)
    assert abs(got["created_at"] - got["redis_now"]) < 1.0, got
    assert abs(got["requested_at"] - got["redis_now"]) < 1.0, got

    # A worker with a correct clock takes the train message and makes the first check.
    client = redis_client(settings)
    models = ModelLedger(client, grace=GRACE, clock=time.time)
    ledger = Ledger(client, clock=time.time, grace=GRACE)
    api = UpstreamClient(API, settings.api.key, session=requests.Session())
    jobs = JobService(
        settings, ledger, api, requests.Session(), time.time, random.Random(1), WorkflowService(ledger)
    )
    training = TrainingService(settings, models, api, jobs, time.time, random.Random(1))
    upstream.get(f"{API}/models/skewed-model/train", body="started", content_type="text/plain")
    upstream.get(f"{API}/models/skewed-model", json={"result": {"status": "training"}})
    if _takes_gen(training.train):
        training.train("skewed-model", got["gen"])
    else:
        training.train("skewed-model")
    model = models.get("skewed-model")
    assert model is not None
    training.poll("skewed-model", model.poll_gen)

    checked = models.get("skewed-model")
    assert checked is not None
    assert checked.state is ModelState.TRAINING, (checked.state, checked.error)


# ---------------------------------------------------------------------------------------- 13


def _admitted(limiter: UpstreamLimiter, family: str, seconds: float) -> int:
    admitted = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        permit, _ = limiter.acquire(family)
        if permit is not None:
            admitted += 1
            limiter.release(permit)
        time.sleep(0.01)
    return admitted


def test_hole13_fractional_rate_limits_are_enforced(settings: Settings) -> None:
    """Hole 13: a rate below one (or fractional) was compared with a count per second, so 0.2/s
    admitted about 1/s. Invariant: rate r admits ceil(r) calls per ceil(r)/r seconds."""
    limiter = UpstreamLimiter(redis_client(settings), Limits(rates={"slow": 0.2, "mid": 2.5}))
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(_admitted, limiter, "slow", 6.0)
        mid = pool.submit(_admitted, limiter, "mid", 3.5)
        slow_n, mid_n = slow.result(), mid.result()

    assert 1 <= slow_n <= 2, f"0.2/s admitted {slow_n} in 6 s"
    assert 8 <= mid_n <= int(2.5 * 3.5 + 3), f"2.5/s admitted {mid_n} in 3.5 s"


def test_a_429_closes_an_unlimited_upstream_for_every_worker_until_its_retry_after(
    settings: Settings,
) -> None:
    """Without a rate or a cap the limiter reads only the closure's TTL: still shared, still timed by
    Redis, still ended on time."""
    client = redis_client(settings)
    limiter = UpstreamLimiter(client, Limits())
    other = UpstreamLimiter(client, Limits())  # another worker
    client.delete(keys.LIMIT_BLOCKED)
    permit, wait = limiter.acquire("status")
    assert permit is not None and wait == 0.0

    limiter.block(1.5)
    permit, wait = other.acquire("trigger")
    assert permit is None and 1.0 < wait <= 1.5
    limiter.block(0.2)  # a shorter Retry-After never shortens the closure
    permit, wait = other.acquire("status")
    assert permit is None and wait > 1.0

    client.pexpire(keys.LIMIT_BLOCKED, 1000)  # the closed period over, the key's last second left
    permit, wait = other.acquire("status")
    assert permit is not None and wait == 0.0
    client.delete(keys.LIMIT_BLOCKED)


# ---------------------------------------------------------------------------------------- 14


class DripServer:
    """Answers every request with headers, then a body of ``size`` bytes, one every ``every`` s."""

    def __init__(self, size: int = 20, every: float = 0.3) -> None:
        self.size, self.every = size, every
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                conn.sendall(f"{head}Content-Length: {self.size}\r\n\r\n".encode())
                for _ in range(self.size):
                    if self.stopped.wait(self.every):
                        return
                    conn.sendall(b" ")
            except OSError:
                return

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()


@pytest.fixture
def drip() -> Iterator[DripServer]:
    server = DripServer()
    yield server
    server.close()


def test_hole14a_callbacks_timeout_bounds_a_whole_delivery(
    settings: Settings, rig: Rig, drip: DripServer
) -> None:
    """Hole 14 (callbacks): GENQ_CALLBACKS_TIMEOUT bounded each socket read, not the delivery: a
    receiver dripping its answer held the thread 18 s against 3 s. Invariant: an attempt ends (failed)
    within about the timeout."""
    url = f"http://127.0.0.1:{drip.port}/hook"
    callbacks = CallbackService(
        settings, rig.ledger, guarded_session(callback_policy(settings)), rig.clock, random.Random(1)
    )
    job_id = _image(rig, callback={"url": url})
    assert rig.ledger.transition(job_id, [JobState.PENDING], JobState.FAILED, error="x").ok

    started = time.monotonic()
    callbacks.deliver(job_id, lambda *a: None)
    elapsed = time.monotonic() - started

    assert elapsed < settings.callbacks.timeout + 1.0, f"delivery took {elapsed:.1f}s"
    rec = rig.ledger.get(job_id)
    assert rec is not None and rec.callback_state == "pending" and rec.callback_attempts == 1


def test_hole14b_an_upstream_call_to_a_dripping_peer_is_bounded_and_ambiguous(drip: DripServer) -> None:
    """Hole 14 (upstream): a dripping upstream held a worker past connect + read timeout. Invariant:
    the call fails within connect + read timeout (+1 s) with ``UpstreamUnavailable(ambiguous=True)``:
    the request went out, so a trigger may have been acted on."""
    api = UpstreamClient(
        f"http://127.0.0.1:{drip.port}", SecretStr("k"), connect_timeout=1.0, read_timeout=1.0
    )

    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable) as caught:
        api.trigger(JobKind.IMAGE, {"prompt": "p"})
    elapsed = time.monotonic() - started

    assert elapsed < 2.0 + 1.0, f"call took {elapsed:.1f}s"
    assert caught.value.ambiguous


# ---------------------------------------------------------------------------------------- 15


def test_hole15_a_broker_blip_leaves_the_job_pending_for_the_sweeper(env: dict[str, str]) -> None:
    """Hole 15: a producer whose broker refused the submit message marked the (recorded) job
    ``failed``, and its idempotency key then named a failed job. Invariant: submit returns a handle,
    the job stays ``pending`` (the sweeper sends it), and the same key returns the same job."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed once the block ends: nothing listens there
    producer = Producer(_settings(env, GENQ_REDIS_BROKER_URL=f"redis://127.0.0.1:{port}/0"))
    producer.celery.conf.broker_connection_timeout = 0.5
    producer.celery.conf.broker_connection_retry = False
    producer.celery.conf.task_publish_retry = False
    try:
        first = producer.submit(ImageRequest(prompt="blip"), idempotency_key="blip-1")
        assert producer.status(first.id).state is JobState.PENDING
        assert producer.redis.zscore(keys.DUE, first.id) is not None  # the sweeper will send it
        again = producer.submit(ImageRequest(prompt="blip"), idempotency_key="blip-1")
        assert again.id == first.id and not again.created
        assert producer.status(first.id).state is JobState.PENDING
    finally:
        producer.close()
