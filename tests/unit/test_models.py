"""``genq.schemas``: producer request validation, upstream payload parsing, the ledger's job record."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from genq.errors import InvalidRequest, ProtocolError
from genq.intake import validate
from genq.schemas import (
    POLLING_STATES,
    TERMINAL_STATES,
    ImageRequest,
    JobKind,
    JobRecord,
    JobState,
    OutputFile,
    UpstreamJob,
    UpstreamStatus,
)

# ------------------------------------------------------------------ ImageRequest


def test_image_request_defaults() -> None:
    req = ImageRequest(prompt="  a red fox in snow \n")
    assert req.prompt == "a red fox in snow"  # stripped
    assert (req.num_images, req.width, req.height) == (1, 1024, 1024)
    assert req.seed is None
    assert req.negative_prompt is None
    assert req.model_id is None
    assert req.kind is JobKind.IMAGE
    assert req.expected_outputs == 1


def test_image_request_accepts_the_limits() -> None:
    req = ImageRequest(
        prompt="x" * 4000,
        num_images=8,
        width=64,
        height=2048,
        seed=2**32 - 1,
        negative_prompt="n" * 4000,
        model_id="sdxl-1.0:ft_v2",
    )
    assert req.expected_outputs == 8
    assert (req.width, req.height, req.seed) == (64, 2048, 2**32 - 1)
    assert ImageRequest(prompt="p", seed=0, num_images=1).seed == 0


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   \t\n "}, "prompt"),
        ({"prompt": "x" * 4001}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": "p", "num_images": 0}, "num_images"),
        ({"prompt": "p", "num_images": 9}, "num_images"),
        ({"prompt": "p", "num_images": 2.5}, "num_images"),
        ({"prompt": "p", "width": 1020}, "width"),
        ({"prompt": "p", "width": 1001}, "width"),
        ({"prompt": "p", "width": 56}, "width"),
        ({"prompt": "p", "height": 2056}, "height"),
        ({"prompt": "p", "height": "tall"}, "height"),
        ({"prompt": "p", "seed": -1}, "seed"),
        ({"prompt": "p", "seed": 2**32}, "seed"),
        ({"prompt": "p", "negative_prompt": "n" * 4001}, "negative_prompt"),
        ({"prompt": "p", "model_id": ""}, "model_id"),
        ({"prompt": "p", "model_id": "bad id"}, "model_id"),
        ({"prompt": "p", "model_id": "-leading-dash"}, "model_id"),
        ({"prompt": "p", "model_id": "../../etc/passwd"}, "model_id"),
        ({"prompt": "p", "model_id": "m" * 129}, "model_id"),
        ({"prompt": "p", "steps": 30}, "steps"),
        ({"prompt": "p", "kind": "video"}, "kind"),
        ({}, "prompt"),
    ],
)
def test_image_request_rejects(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        ImageRequest.model_validate(fields)
    assert [err["loc"][0] for err in info.value.errors()] == [field]


def test_image_request_is_frozen() -> None:
    req = ImageRequest(prompt="p")
    with pytest.raises(ValidationError):
        req.num_images = 3  # type: ignore[misc]


def test_upstream_body_excludes_none_and_kind() -> None:
    body = ImageRequest(prompt=" fox ", num_images=2).upstream_body()
    assert body == {"prompt": "fox", "num_images": 2, "width": 1024, "height": 1024}


def test_upstream_body_keeps_falsy_values_that_are_set() -> None:
    body = ImageRequest(prompt="fox", seed=0, negative_prompt="", model_id="m1").upstream_body()
    assert body == {
        "prompt": "fox",
        "num_images": 1,
        "width": 1024,
        "height": 1024,
        "seed": 0,
        "negative_prompt": "",
        "model_id": "m1",
    }
    assert "kind" not in body
    json.dumps(body)  # JSON-serialisable as is


# ------------------------------------------------------------------ intake.validate (the producer's entry)
# The producer validates every request dict through ``genq.intake.validate`` before anything is
# written or sent (it replaced ``genq.producer._validated`` when more request kinds were added).


def test_validate_returns_the_request() -> None:
    req = validate({"kind": "image", "prompt": "fox", "num_images": 3})
    assert isinstance(req, ImageRequest)
    assert req.num_images == 3
    assert req.prompt == "fox"


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"prompt": "p", "num_images": 9}, ["num_images: ", "less than or equal to 8"]),
        ({"prompt": "  "}, ["prompt: ", "at least 1 character"]),
        ({"prompt": "p", "width": 1001}, ["width: ", "multiple of 8"]),
        ({"prompt": "p", "colour": "red"}, ["colour: ", "Extra inputs are not permitted"]),
        ({"prompt": "p", "seed": -1}, ["seed: ", "greater than or equal to 0"]),
        ({"prompt": "p", "model_id": "a b"}, ["model_id: ", "pattern"]),
    ],
)
def test_validate_raises_invalid_request_naming_the_field(data: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate({"kind": "image", **data})
    message = str(info.value)
    assert message.startswith("invalid request: ")
    for fragment in fragments:
        assert fragment in message
    assert "image." not in message  # the union's discriminator tag is not shown
    assert isinstance(info.value, ValueError)
    assert info.value.__cause__ is None  # pydantic's long report is not chained


def test_validate_lists_every_problem() -> None:
    with pytest.raises(InvalidRequest) as info:
        validate({"kind": "image", "prompt": "", "num_images": 0, "height": 7})
    problems = str(info.value).removeprefix("invalid request: ").split("; ")
    assert [p.split(":")[0] for p in problems] == ["prompt", "num_images", "height"]


@pytest.mark.parametrize(
    ("data", "kind", "outputs"),
    [
        ({"kind": "upscale", "image_id": "img-1"}, JobKind.UPSCALE, 1),
        ({"kind": "upscale", "image_url": "https://cdn.test/a.png", "factor": 4}, JobKind.UPSCALE, 1),
        ({"kind": "video", "prompt": "waves"}, JobKind.VIDEO, 1),
        ({"kind": "video", "image_id": "img-1", "duration": 60}, JobKind.VIDEO, 1),
        ({"kind": "workflow", "generate": {"prompt": "fox", "num_images": 3}}, JobKind.WORKFLOW, 3),
    ],
)
def test_validate_other_kinds(data: dict[str, Any], kind: JobKind, outputs: int) -> None:
    req = validate(data)
    assert req.kind is kind
    assert req.expected_outputs == outputs


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"kind": "upscale"}, "exactly one of image_id or image_url"),
        ({"kind": "upscale", "image_id": "a", "image_url": "https://x.test/a"}, "exactly one"),
        ({"kind": "upscale", "image_id": "a", "factor": 3}, "factor"),
        ({"kind": "upscale", "image_url": "ftp://x.test/a.png"}, "image_url"),
        ({"kind": "upscale", "image_id": "../etc/passwd"}, "image_id"),
        ({"kind": "video"}, "give a prompt, a source image, or both"),
        ({"kind": "video", "prompt": "p", "duration": 61}, "duration"),
        ({"kind": "workflow", "generate": {"prompt": "p", "num_images": 9}}, "generate.num_images"),
    ],
)
def test_validate_other_kinds_rejects(data: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate(data)
    assert str(info.value).startswith("invalid request: ")
    assert fragment in str(info.value)


@pytest.mark.parametrize("data", [{"prompt": "p"}, {"kind": "painting", "prompt": "p"}, {"kind": None}])
def test_validate_requires_a_known_kind(data: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest, match="invalid request: "):
        validate(data)


_KINDS = [k.value for k in JobKind]
_FIELDS = [
    "prompt",
    "num_images",
    "width",
    "height",
    "seed",
    "negative_prompt",
    "model_id",
    "image_id",
    "image_url",
    "factor",
    "duration",
    "generate",
    "upscale_factor",
]
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=50),
    st.floats(allow_nan=True, allow_infinity=True),
)
_VALUES = st.one_of(
    _SCALARS,
    st.lists(_SCALARS, max_size=3),
    st.dictionaries(st.one_of(st.sampled_from(_FIELDS), st.text(max_size=8)), _SCALARS, max_size=4),
)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.dictionaries(st.one_of(st.sampled_from(_FIELDS), st.text(max_size=12)), _VALUES, max_size=8),
    kind=st.one_of(st.sampled_from(_KINDS), _VALUES),
    with_kind=st.booleans(),
    prompt=st.one_of(st.none(), st.text(max_size=5000), st.integers(), st.floats()),
    with_prompt=st.booleans(),
)
def test_validate_only_returns_or_raises_invalid_request(
    data: dict[str, Any], kind: Any, with_kind: bool, prompt: Any, with_prompt: bool
) -> None:
    if with_prompt:
        data = {**data, "prompt": prompt}
    if with_kind:
        data = {**data, "kind": kind}
    try:
        req = validate(data)
    except InvalidRequest as exc:
        assert str(exc).startswith("invalid request: ")
    else:
        assert req.kind in _KINDS
        assert req.expected_outputs >= 1
        json.dumps(req.model_dump(mode="json"))
        if isinstance(req, ImageRequest):
            assert 1 <= len(req.prompt) <= 4000
            assert req.prompt == req.prompt.strip()
            assert 1 <= req.num_images <= 8
            assert req.width % 8 == 0 and req.height % 8 == 0
            json.dumps(req.upstream_body())


# ------------------------------------------------------------------ UpstreamJob.from_payload


def test_from_payload_wrapped_and_bare_agree() -> None:
    inner = {"jobId": "j-1", "status": "Running", "images": [{"id": "a", "url": "https://cdn/a"}]}
    wrapped = UpstreamJob.from_payload({"result": inner})
    bare = UpstreamJob.from_payload(inner)
    assert wrapped == bare
    assert wrapped.job_id == "j-1"
    assert wrapped.status is UpstreamStatus.RUNNING
    assert wrapped.status.working


def test_from_payload_result_wins_over_outer_fields() -> None:
    job = UpstreamJob.from_payload({"jobId": "outer", "result": {"jobId": "inner", "status": "queued"}})
    assert job.job_id == "inner"


def test_from_payload_defaults_and_extras() -> None:
    job = UpstreamJob.from_payload({"jobId": "j", "surprise": {"nested": True}})
    assert job.status is UpstreamStatus.CREATED
    assert job.images == [] and job.videos == [] and job.outputs == []
    assert job.error is None and job.model_id is None and job.created_at is None


@pytest.mark.parametrize(
    "payload",
    [
        None,
        [],
        "jobId",
        42,
        {"result": None},
        {"result": []},
        {"result": "ok"},
        {},
        {"jobId": ""},
        {"jobId": "j" * 257},
        {"jobId": None},
        {"jobId": "j", "status": "done"},
        {"jobId": "j", "status": 3},
        {"jobId": "j", "images": "https://cdn/a.png"},
        {"jobId": "j", "images": [{"url": "https://cdn/a.png"}]},
        {"jobId": "j", "videos": [{"id": "v", "url": "https://cdn/" + "x" * 8200}]},
        {"jobId": "j", "images": [{"id": "i" * 513, "url": "https://cdn/a"}]},
    ],
)
def test_from_payload_protocol_errors(payload: Any) -> None:
    with pytest.raises(ProtocolError):
        UpstreamJob.from_payload(payload)


def test_from_payload_error_message_names_the_field() -> None:
    with pytest.raises(ProtocolError, match=r"status: .*unknown upstream status 'exploded'"):
        UpstreamJob.from_payload({"result": {"jobId": "j", "status": "EXPLODED"}})
    with pytest.raises(ProtocolError, match=r"expected a JSON object, got list"):
        UpstreamJob.from_payload({"result": [1]})


def test_upstream_status_working() -> None:
    assert {s for s in UpstreamStatus if s.working} == {
        UpstreamStatus.CREATED,
        UpstreamStatus.QUEUED,
        UpstreamStatus.RUNNING,
    }


# ------------------------------------------------------------------ JobRecord.from_hash


def _outputs() -> list[OutputFile]:
    return [
        OutputFile(index=i, remote_id=f"r{i}", path=f"/d/j/{i:02d}.png", bytes=100 + i, sha256="ab" * 32)
        for i in range(12)
    ]


def _raw(outputs: list[OutputFile], **extra: str) -> dict[str, str]:
    """A job hash as ``Ledger`` writes it: every value a string, ``""`` for None."""
    raw = {
        "id": "job-1",
        "kind": "image",
        "state": "succeeded",
        "request": json.dumps({"prompt": "fox", "num_images": 12}),
        "created_at": "1700000000.5",
        "updated_at": "1700000100.25",
        "upstream_id": "up-9",
        "upstream_status": "success",
        "error": "",
        "submit_attempts": "1",
        "polls": "4",
        "poll_gen": "5",
        "errors_in_row": "0",
        "next_poll_at": "",
        "deadline_at": "1700000900.0",
        "expected_outputs": "12",
        "remote_ids": json.dumps([f"r{i}" for i in range(12)]),
        "finished_at": "1700000100.25",
        "idempotency_key": "ignored-extra-field",
    }
    shuffled = list(outputs)
    random.Random(3).shuffle(shuffled)
    for out in shuffled:
        raw[f"out:{out.index:04d}"] = out.model_dump_json()
    raw.update(extra)
    return raw


def test_from_hash_round_trip_sorted_by_index() -> None:
    outputs = _outputs()
    rec = JobRecord.from_hash(_raw(outputs))
    assert rec.outputs == outputs
    assert [o.index for o in rec.outputs] == list(range(12))
    assert rec.kind is JobKind.IMAGE
    assert rec.state is JobState.SUCCEEDED
    assert rec.terminal
    assert rec.request == {"prompt": "fox", "num_images": 12}
    assert rec.remote_ids == [f"r{i}" for i in range(12)]
    assert (rec.created_at, rec.updated_at, rec.deadline_at) == (1700000000.5, 1700000100.25, 1700000900.0)
    assert (rec.submit_attempts, rec.polls, rec.poll_gen, rec.expected_outputs) == (1, 4, 5, 12)
    assert rec.upstream_id == "up-9"
    assert rec.error is None
    assert rec.next_poll_at is None
    # And back: the record's outputs re-serialise to what was stored.
    again = JobRecord.from_hash(_raw(rec.outputs))
    assert again == rec


def test_from_hash_sorts_numerically_not_lexically() -> None:
    outs = [OutputFile(index=i, remote_id="r", path="p", bytes=1, sha256="0" * 64) for i in (10, 2, 1)]
    raw = _raw([], expected_outputs="3")
    # Keys without zero padding would sort "out:1", "out:10", "out:2"; the index decides.
    for out in outs:
        raw[f"out:{out.index}"] = out.model_dump_json()
    assert [o.index for o in JobRecord.from_hash(raw).outputs] == [1, 2, 10]


def test_from_hash_minimal_pending_record() -> None:
    rec = JobRecord.from_hash(
        {
            "id": "j",
            "kind": "image",
            "state": "pending",
            "request": '{"prompt": "p"}',
            "created_at": "1.0",
            "updated_at": "1.0",
            "upstream_id": "",
            "upstream_status": "",
            "finished_at": "",
            "deadline_at": "",
        }
    )
    assert rec.state is JobState.PENDING
    assert not rec.terminal
    assert rec.upstream_id is None and rec.upstream_status is None
    assert rec.finished_at is None and rec.deadline_at is None
    assert rec.outputs == [] and rec.remote_ids == []
    assert (rec.polls, rec.poll_gen, rec.expected_outputs) == (0, 0, 0)


def test_from_hash_workflow_links() -> None:
    parent = JobRecord.from_hash(_raw([], kind="workflow", children=json.dumps(["c1", "c2"]), parent_id=""))
    assert parent.kind is JobKind.WORKFLOW
    assert parent.children == ["c1", "c2"]
    assert parent.parent_id is None
    child = JobRecord.from_hash(_raw([], parent_id="wf-1", model_id="m-7", children=""))
    assert child.parent_id == "wf-1"
    assert child.model_id == "m-7"
    assert child.children == []


def test_from_hash_rejects_an_unknown_state() -> None:
    raw = _raw([], state="exploded")
    with pytest.raises(ValidationError):
        JobRecord.from_hash(raw)


# ------------------------------------------------------------------ JobState


def test_terminal_states() -> None:
    assert {s for s in JobState if s.terminal} == {
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.TIMED_OUT,
        JobState.CANCELLED,
        JobState.SUBMIT_UNKNOWN,
        JobState.REJECTED,
    }
    assert frozenset(s for s in JobState if s.terminal) == TERMINAL_STATES


@pytest.mark.parametrize(
    "state",
    [
        JobState.PARKED,
        JobState.PENDING,
        JobState.SUBMITTING,
        JobState.SUBMITTED,
        JobState.RUNNING,
        JobState.DOWNLOADING,
    ],
)
def test_in_flight_states_are_not_terminal(state: JobState) -> None:
    assert state.terminal is False


def test_polling_states_are_in_flight() -> None:
    assert {JobState.SUBMITTED, JobState.RUNNING} == POLLING_STATES
    assert not POLLING_STATES & TERMINAL_STATES


def test_state_counts_add_up_the_moves_and_keep_the_older_per_state_counts() -> None:
    from genq.ledger import state_counts

    moves = {b"image:>pending": b"3", b"image:pending>submitting": b"2", b"image:submitting>failed": b"1"}
    assert state_counts(moves) == {"image:pending": 1, "image:submitting": 1, "image:failed": 1}
    # A hash written before moves were counted holds each state's own count: a move adds to it.
    older = {"video:running": "5", "video:running>downloading": "2", "video:>pending": "1"}
    assert state_counts(older) == {"video:running": 3, "video:downloading": 2, "video:pending": 1}
