"""Run the benchmarks: ``python -m benchmarks [--quick] [--only NAME[,NAME]] [--out PATH]``.

Each benchmark measures genqueue and its baseline side by side in the same run, on a private Redis,
the simulator and real worker processes, and reports ratios (never absolute times as goals). Prints a
table, writes one JSON document (one key per benchmark) and a PNG chart beside it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import harness
from benchmarks.context import Context
from benchmarks.result import BenchResult, chart, document, table, timings, write_json

Runner = Callable[[Context], BenchResult]


def registry() -> dict[str, Runner]:
    from benchmarks import (
        b1_slots,
        b2_overhead,
        b3_capacity,
        b4_polling,
        b5_downloads,
        b6_training,
        b7_redis,
        b8_dashboard,
        b9_lanes,
        b10_fairness,
        simcapacity,
    )

    return {
        simcapacity.NAME: simcapacity.run,
        b1_slots.NAME: b1_slots.run,
        b2_overhead.NAME: b2_overhead.run,
        b3_capacity.NAME: b3_capacity.run,
        b4_polling.NAME: b4_polling.run,
        b5_downloads.NAME: b5_downloads.run,
        b6_training.NAME: b6_training.run,
        b7_redis.NAME: b7_redis.run,
        b8_dashboard.NAME: b8_dashboard.run,
        b9_lanes.NAME: b9_lanes.run,
        b10_fairness.NAME: b10_fairness.run,
    }


def default_out(quick: bool) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return harness.ROOT / "bench-results" / f"bench-{'quick' if quick else 'full'}-{stamp}.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark at a small size")
    parser.add_argument("--only", default="", help="comma-separated benchmark names (see --list)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench-results/...)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs and downloads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runners = registry()
    if args.list:
        print("\n".join(runners))
        return 0
    chosen = [n.strip() for n in args.only.split(",") if n.strip()] or list(runners)
    unknown = [n for n in chosen if n not in runners]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; one of {list(runners)}", file=sys.stderr)
        return 2
    if "simulator" not in chosen:
        chosen.insert(0, "simulator")  # its own rate is the reference for "never the bottleneck"
    out = args.out or default_out(args.quick)
    harness.install_cleanup()
    workdir = Path(tempfile.mkdtemp(prefix="genq-bench-"))
    ctx = Context(quick=args.quick, workdir=workdir)
    results: list[BenchResult] = []
    started = time.monotonic()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    interrupted = False
    try:
        for name in chosen:
            ctx.log(f"=== {name} ({'quick' if args.quick else 'full'})")
            t0 = time.monotonic()
            try:
                result = runners[name](ctx)
            except KeyboardInterrupt:
                interrupted = True
                result = BenchResult(name, name, error="interrupted")
            except Exception:  # a benchmark that breaks is reported; the others still run
                result = BenchResult(name, name, error=traceback.format_exc())
                ctx.log(f"{name} failed:\n{result.error}")
            finally:
                harness.stop_all()
            result.seconds = time.monotonic() - t0
            if name == "simulator":
                ctx.sim_capacity = result.figures
            results.append(result)
            ctx.log(f"=== {name} done in {result.seconds:.0f}s: met={result.met}")
            if interrupted:
                break
    finally:
        harness.stop_all()
        meta = {
            "mode": "quick" if args.quick else "full",
            "started": started_at,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": time.monotonic() - started,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "benchmarks": chosen,
            "seconds_by_benchmark": {r.name: r.seconds for r in results},
            "interrupted": interrupted,
        }
        doc = document(results, meta)
        write_json(doc, out)
        png = chart(results, out.with_suffix(".png"), f"genqueue benchmarks ({meta['mode']}) vs baselines")
        print(table(results))
        print(f"\n{timings(results)}")
        print(f"\nJSON: {out}")
        print(
            f"chart: {png}" if png else "chart: skipped (matplotlib not installed: pip install -e '.[bench]')"
        )
        if not args.keep_workdir:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"workdir: {workdir}")
    if interrupted:
        return 130
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
