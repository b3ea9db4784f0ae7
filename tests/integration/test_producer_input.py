"""Arbitrary input thrown at every producer entry point: each call succeeds or raises the one
documented error, and a rejected call leaves nothing in Redis: no record, no queued message."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genq.embedded import EmbeddedRedis
from genq.errors import InvalidRequest
from genq.producer import Producer
from tests.helpers import environment

pytestmark = pytest.mark.integration

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=50),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
options = st.dictionaries(
    st.sampled_from(
        ["num_images", "width", "height", "seed", "negative_prompt", "model_id", "factor", "duration",
         "image_id", "image_url", "prompt", "kind", "upscale_factor", "generate", "bogus"]
    ),
    values,
    max_size=4,
)  # fmt: skip
prompts = st.one_of(st.text(max_size=60), st.just(""), st.just("   "), st.text(min_size=4001, max_size=4100))


@pytest.fixture(scope="module")
def producer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Producer]:
    with EmbeddedRedis(data_dir=tmp_path_factory.mktemp("redis")) as server:
        with environment({"GENQ_REDIS_URL": server.url}):
            from genq.settings import load_settings

            producer = Producer(load_settings())
        yield producer
        producer.close()


def _without(opts: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in opts.items() if k != name}


ENTRY_POINTS: dict[str, Callable[[Producer, Any, dict[str, Any]], object]] = {
    # Options never repeat a parameter given by name: Python itself refuses that call.
    "submit_image": lambda p, text, opts: p.submit_image(text, **_without(opts, "prompt")),
    "submit_upscale": lambda p, text, opts: p.submit_upscale(image_id=text, **_without(opts, "image_id")),
    "submit_video": lambda p, text, opts: p.submit_video(text, **_without(opts, "prompt")),
    "submit_workflow": lambda p, text, opts: p.submit_workflow(text, **_without(opts, "prompt")),
    "submit": lambda p, text, opts: p.submit({"kind": text, **opts}),
    "train_model": lambda p, text, opts: p.train_model(text),
}


def _footprint(client: redis.Redis) -> tuple[int, int]:
    return client.dbsize(), client.llen("submit") + client.llen("training")


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_entry_point_accepts_or_rejects_cleanly(producer: Producer, entry: str) -> None:
    call = ENTRY_POINTS[entry]
    outcomes = {"accepted": 0, "rejected": 0}

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(text=prompts, opts=options)
    def run(text: str, opts: dict[str, Any]) -> None:
        before = _footprint(producer.redis)
        try:
            call(producer, text, opts)
        except InvalidRequest as exc:
            assert str(exc).startswith("invalid request"), str(exc)
            assert _footprint(producer.redis) == before, f"rejected call left state behind: {exc}"
            outcomes["rejected"] += 1
            return
        outcomes["accepted"] += 1

    run()
    assert outcomes["rejected"] > 0  # the strategy really reaches the validation
