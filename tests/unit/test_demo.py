"""``genq demo``'s final table fits an 80-column terminal; ``--json`` has every record in full."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest
from rich.console import Console

from genq.demo import reasons, report, table
from genq.schemas import JobKind, JobRecord, JobState, OutputFile


def _record(
    kind: JobKind, state: JobState, files: int = 0, step: str | None = None, **fields: object
) -> JobRecord:
    """A record with ``files`` outputs, under its own directory or (a workflow's) under ``step``'s."""
    job_id = uuid.uuid4().hex
    outputs = [
        OutputFile(
            index=i,
            remote_id=uuid.uuid4().hex,
            path=f"/home/someone/projects/genqueue/downloads/{step or job_id}/{i:02d}.png",
            bytes=123_456,
            sha256=hashlib.sha256(f"{job_id}{i}".encode()).hexdigest(),
        )
        for i in range(files)
    ]
    return JobRecord.model_validate(
        {"id": job_id, "kind": kind, "state": state, "request": {"prompt": "a fox"}, "created_at": 1.0,
         "updated_at": 2.0, "outputs": outputs, **fields}
    )  # fmt: skip


@pytest.fixture
def records() -> list[JobRecord]:
    return [
        _record(JobKind.IMAGE, JobState.SUCCEEDED, files=2, upstream_id=uuid.uuid4().hex),
        _record(JobKind.VIDEO, JobState.SUCCEEDED, files=1, upstream_id=uuid.uuid4().hex),
        _record(JobKind.WORKFLOW, JobState.SUCCEEDED, files=2, step="5" * 32, children=["5" * 32] * 3),
        _record(JobKind.IMAGE, JobState.SUBMIT_UNKNOWN, error="the POST timed out after it was sent " * 4),
        _record(JobKind.UPSCALE, JobState.TIMED_OUT, upstream_id=uuid.uuid4().hex),
    ]


@pytest.mark.parametrize("checked", [True, False])
def test_every_row_of_the_table_is_one_line_at_80_columns(records: list[JobRecord], checked: bool) -> None:
    truth = {out.sha256 for r in records for out in r.outputs} if checked else None
    console = Console(width=80, record=True, color_system=None)
    console.print(table(records, truth))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    # Title, header, rule, then one line per file or file-less job (2 + 1 + 2 + 1 + 1), then the caption.
    lines = [line for line in lines if line.strip()]
    assert len(lines) == 3 + 7 + 1
    assert [line[:8].strip() for line in lines[3:10]] == [
        records[0].id[:8], "", records[1].id[:8], records[2].id[:8], "", records[3].id[:8], records[4].id[:8]
    ]  # fmt: skip
    assert " 00.png " in lines[3] and " 55555555/01.png " in lines[7]
    assert " submit_unknown " in lines[8] and " the POST timed… " in lines[8]
    for record in records:
        assert record.id[:8] in text and record.id not in text
        for out in record.outputs:
            assert out.sha256[:12] in text and out.sha256 not in text
    if checked:
        assert text.count(" yes ") == 5 and " NO " not in text


def test_json_report_keeps_every_record_in_full(records: list[JobRecord]) -> None:
    truth = {records[0].outputs[0].sha256}
    summary = json.loads(json.dumps(report(records, truth, elapsed=12.34567)))
    assert summary["succeeded"] == 3 and summary["jobs_total"] == 5 and summary["files"] == 5
    assert summary["elapsed_seconds"] == 12.346
    assert [job["id"] for job in summary["jobs"]] == [r.id for r in records]
    first = summary["jobs"][0]
    assert first["upstream_id"] == records[0].upstream_id
    assert first["outputs"][0]["sha256"] == records[0].outputs[0].sha256
    assert first["outputs"][0]["path"] == records[0].outputs[0].path
    assert [out["matches_upstream"] for out in first["outputs"]] == [True, False]
    assert summary["jobs"][3]["error"] == records[3].error
    unchecked = report(records, None, elapsed=1.0)
    assert unchecked["jobs"][0]["outputs"][0]["matches_upstream"] is None
    assert Path(first["outputs"][1]["path"]).name == "01.png"


def test_reasons_list_every_unsuccessful_job_whole(records: list[JobRecord]) -> None:
    assert reasons(records) == [
        f"{records[3].id[:8]} submit_unknown: {records[3].error}",
        f"{records[4].id[:8]} timed_out: no reason recorded",
    ]
