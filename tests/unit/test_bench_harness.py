"""Pure parts of the benchmark harness: the command line, profile summaries, command counts."""

from __future__ import annotations

import cProfile
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.__main__ import main, parse_args, registry
from benchmarks.b2_overhead import CommandCounter, summarize_profile


def test_every_benchmark_of_the_issue_is_registered() -> None:
    assert list(registry()) == [
        "simulator",
        "slots",
        "overhead",
        "capacity",
        "polling",
        "downloads",
        "training",
        "redis",
        "dashboard",
        "lanes",
        "fairness",
    ]


def test_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args(["--quick", "--only", "slots,capacity", "--out", "x.json"])
    assert args.quick and args.only == "slots,capacity" and args.out == Path("x.json")
    assert main(["--list"]) == 0
    assert "capacity" in capsys.readouterr().out
    assert main(["--only", "nope"]) == 2


def _work() -> int:
    return sum(i * i for i in range(20_000))


def test_profile_summary_per_job(tmp_path: Path) -> None:
    prof = cProfile.Profile()
    prof.enable()
    _work()
    prof.disable()
    path = tmp_path / "child-1.prof"
    prof.dump_stats(str(path))
    out = summarize_profile([str(path)], jobs=10)
    assert out["children"] == 1
    assert set(out) >= {"breakdown_ms_per_job", "top_own_time", "ms_per_job"}
    assert out["top_own_time"] and all(t["own_ms_per_job"] >= 0 for t in out["top_own_time"])
    assert summarize_profile([], jobs=1) == {"error": "no profile dumped"}


def test_command_counts_per_job() -> None:
    counter = CommandCounter.__new__(CommandCounter)
    counter.sent = Counter({"EVALSHA": 60, "HGETALL": 40})
    counter.in_lua = Counter({"HSET": 200})
    s = counter.summary(jobs=10)
    assert s["round_trips_per_job"] == 10
    assert s["all_per_job"] == 30
    assert s["sent_by_command_per_job"]["EVALSHA"] == 6


class _Proc:
    def __init__(self) -> None:
        self.ended_by: str | None = None

    def stop(self, timeout: float = 30.0) -> None:
        self.ended_by = "stop"

    def kill(self) -> None:
        self.ended_by = "kill"


def test_a_stack_kills_its_processes_unless_asked_for_a_warm_shutdown() -> None:
    from benchmarks.harness import Stack

    s = Stack.__new__(Stack)
    killed, stopped = [_Proc(), _Proc()], [_Proc()]
    s.processes = list(killed)  # type: ignore[arg-type]
    s.stop_processes()
    assert [p.ended_by for p in killed] == ["kill", "kill"] and s.processes == []
    s.processes = list(stopped)  # type: ignore[arg-type]
    s.stop_processes(graceful=True)
    assert stopped[0].ended_by == "stop"


def test_a_run_reports_each_benchmarks_wall_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import benchmarks.__main__ as entry
    from benchmarks.result import BenchResult

    def fake(name: str):  # type: ignore[no-untyped-def]
        return lambda ctx: BenchResult(name, name)

    monkeypatch.setattr(entry.harness, "install_cleanup", lambda: None)  # pytest keeps its signals
    monkeypatch.setattr(entry, "registry", lambda: {"simulator": fake("simulator"), "slots": fake("slots")})
    out = tmp_path / "run.json"
    assert main(["--quick", "--out", str(out)]) == 0
    meta = json.loads(out.read_text())["_meta"]
    assert set(meta["seconds_by_benchmark"]) == {"simulator", "slots"}
    assert "wall time per benchmark: simulator" in capsys.readouterr().out
