"""5. Downloads: N files of S MB from the simulator with the download pool's concurrency (threads 8).

genqueue: the jobs are first brought to ``downloading`` (submit + poll workers only), then the download
worker (``-Q download -P threads -c 8``, the project's default pool) starts and streams every file with
all safety checks on (scheme and address checks, content type, byte cap, wall-clock limit, sha256,
fsync, atomic rename). Timed from the first download task received (worker log) to the last job
finished; the worker's RSS is sampled every 50 ms. Baseline: plain ``requests`` streaming the same
files with 8 threads to disk in its own process (256 KiB chunks, no checks, no hash, no fsync).
Rounds alternate baseline, genqueue; the ratio is the median of per-round throughput ratios.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from typing import Any

from benchmarks.context import Context, counts, producer_for, records
from benchmarks.harness import ROOT, RssSampler, Stack, process_rss, stack, wait_until
from benchmarks.result import BenchResult, ChartItem, Row
from benchmarks.simcapacity import headroom_row
from benchmarks.stats import Goal, fmt, median, ratio
from genq.simulator import Duration, SimConfig

NAME = "downloads"
THREADS = 8
FAST = json.dumps(
    {"first_delay": 0.05, "interval": 0.05, "backoff": 1, "max_interval": 0.05, "jitter": 0, "deadline": 600}
)
ENV = {"GENQ_POLL_VIDEO": FAST}
_RECEIVED = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): INFO/MainProcess\] Task genq\.download\[")


def run(ctx: Context) -> BenchResult:
    files = ctx.size(8, 40)
    size_mb = ctx.size(20, 50)
    rounds = ctx.size(1, 2)
    result = BenchResult(NAME, "Downloads vs plain requests")
    result.size = {
        "files": files,
        "mb_each": size_mb,
        "threads": THREADS,
        "rounds": rounds,
        "chunk_bytes": 256 * 1024,
    }
    sim = SimConfig(
        api_key="bench-key", video_bytes=size_mb * 1_000_000, video_duration=Duration(kind="fixed", value=0.0)
    )
    gq_runs: list[dict[str, Any]] = []
    base_runs: list[dict[str, Any]] = []
    with stack(sim, ctx.workdir / NAME, NAME) as s:
        for r in range(rounds):
            ctx.log(f"{NAME}: round {r + 1}/{rounds}: genqueue, {files} x {size_mb} MB")
            gq = _genqueue(ctx, s, files)
            ctx.log(f"{NAME}: round {r + 1}/{rounds}: plain requests, same files")
            base_runs.append(_plain(s, gq.pop("urls")))
            gq_runs.append(gq)
            s.reset()
        ablations: dict[str, Any] = {}
        variants: list[tuple[str, str, str]] = []
        if not ctx.quick:
            variants = [
                ("prefork_8", "", "prefork"),
                ("without_fsync", "fsync", "threads"),
                ("without_sha256", "sha256", "threads"),
            ]
        for label, what, pool in variants:
            ctx.log(f"{NAME}: genqueue variant {label}, then plain requests")
            run_ = _genqueue(ctx, s, files, app="benchmarks.ablation_app", ablate=what, pool=pool)
            plain = _plain(s, run_.pop("urls"))
            s.reset()
            ablations[label] = {
                "mb_per_s": run_["mb_per_s"],
                "plain_mb_per_s": plain["mb_per_s"],
                "ratio": ratio(run_["mb_per_s"], plain["mb_per_s"]),
            }
        peak = max([r["sim_peak_rate_1s"] for r in gq_runs] or [0])
    per_round = [ratio(g["mb_per_s"], b["mb_per_s"]) for g, b in zip(gq_runs, base_runs, strict=True)]
    rel = median([x for x in per_round if x is not None] or [0.0])
    gq_tp = median([g["mb_per_s"] for g in gq_runs if g["mb_per_s"]] or [0.0])
    base_tp = median([b["mb_per_s"] for b in base_runs if b["mb_per_s"]] or [0.0])
    gq_peak = max(g["rss_peak"] for g in gq_runs)
    base_peak = max(b["rss_peak"] for b in base_runs)
    gq_growth = max(g["rss_peak"] - g["rss_idle"] for g in gq_runs)
    base_growth = max(b["rss_peak"] - b["rss_before"] for b in base_runs)
    result.figures = {
        "runs": gq_runs,
        "mb_per_s": gq_tp,
        "rss_peak": gq_peak,
        "rss_growth": gq_growth,
        "ablations": ablations,
    }
    result.baseline = {
        "runs": base_runs,
        "mb_per_s": base_tp,
        "rss_peak": base_peak,
        "rss_growth": base_growth,
    }
    result.ratios = {"throughput": rel, "per_round": per_round, "rss_growth": ratio(gq_growth, base_growth)}
    bad = [g for g in gq_runs if g["succeeded"] < files or not g["sha_ok"]]
    why = f"{files - bad[0]['succeeded']} downloads failed or a sha256 mismatched" if bad else ""
    if not why and rel is not None and rel < 0.8:
        why = "genqueue hashes (sha256) and fsyncs every file" + "".join(
            f"; {k.replace('_', ' ')}: {fmt(v['ratio'])}x plain" for k, v in ablations.items()
        )
    met = result.check(
        Goal("download throughput >= 0.8x plain requests", "throughput ratio", ">=", 0.8), rel, why
    )
    bound = 64 * 1024 * 1024
    met_mem = result.check(
        Goal(
            "bounded worker memory: peak growth <= 64 MB with 8 downloads in flight",
            "RSS growth",
            "<=",
            bound,
        ),
        float(gq_growth),
    )
    result.rows = [
        Row("MB/s (median of rounds)", gq_tp, base_tp, rel, "MB/s", ">= 0.8x", met),
        *[
            Row(f"variant: {k.replace('_', ' ')}", v["mb_per_s"], v["plain_mb_per_s"], v["ratio"], "MB/s")
            for k, v in ablations.items()
        ],
        Row("peak RSS (download worker / plain process)", gq_peak / 1e6, base_peak / 1e6, unit="MB"),
        Row(
            "RSS growth while downloading",
            gq_growth / 1e6,
            base_growth / 1e6,
            result.ratios["rss_growth"],
            "MB",
            "<= 64 MB",
            met_mem,
        ),
        headroom_row(ctx, peak),
    ]
    result.chart = [
        ChartItem(
            "throughput", f"5 downloads: MB/s ({files} x {size_mb} MB, 8 threads)", gq_tp, base_tp, "MB/s"
        )
    ]
    return result


def _genqueue(
    ctx: Context, s: Stack, files: int, app: str = "genq.worker", ablate: str = "", pool: str = "threads"
) -> dict[str, Any]:
    s.worker(queues=["submit", "poll"], concurrency=2, env=ENV)
    producer = producer_for(s, ENV)
    ids = [producer.submit_video(f"download {i}", duration=5).id for i in range(files)]
    producer.close()
    staged = wait_until(lambda: counts(s.redis).get("video:downloading", 0) >= files, timeout=60)
    if not staged:
        ctx.log(f"{NAME}: only {counts(s.redis)} after 60 s")
    worker = s.worker(
        queues=["download"],
        pool=pool,
        concurrency=THREADS,
        env={**ENV, "BENCH_ABLATE": ablate},
        app=app,
        start=False,
    )
    started = time.time()
    worker.start()
    idle = process_rss(worker.pid)
    with RssSampler([worker.pid]) as sampler:
        done = wait_until(
            lambda: counts(s.redis).get("video:succeeded", 0) >= files, timeout=600, interval=0.05
        )
    recs = records(s.redis, ids)
    ok = [r for r in recs if r.state.value == "succeeded"]
    first = _first_received(worker.log_path.read_text(errors="replace")) or started
    last = max((r.finished_at or 0) for r in ok) if ok else None
    total = sum(o.bytes for r in ok for o in r.outputs)
    seconds = (last - first) if last else None
    sha_ok = _check_sha(s, ok[:2])
    urls = [f"{s.sim.url}/files/{r.upstream_id}/0.mp4?token={s.sim.config.file_token}" for r in recs]
    peak_rate = s.sim.stats(include_jobs=False)["max_rate_1s"]
    s.stop_processes()
    shutil.rmtree(s.download_dir, ignore_errors=True)
    return {
        "files": files,
        "succeeded": len(ok),
        "all_succeeded": done,
        "bytes": total,
        "seconds": seconds,
        "mb_per_s": total / 1e6 / seconds if seconds else None,
        "rss_idle": idle,
        "rss_peak": max(sampler.peak, idle),
        "rss_samples": sampler.samples,
        "sha_ok": sha_ok,
        "sim_peak_rate_1s": peak_rate,
        "urls": urls,
    }


def _first_received(log: str) -> float | None:
    m = _RECEIVED.search(log)
    if not m:
        return None
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _check_sha(s: Stack, recs: list[Any]) -> bool:
    for rec in recs:
        truth = s.sim.job(rec.upstream_id)
        want = {o["index"]: o["sha256"] for o in truth["outputs"]}
        if any(want.get(o.index) != o.sha256 for o in rec.outputs):
            return False
    return True


def _plain(s: Stack, urls: list[str]) -> dict[str, Any]:
    out_dir = s.workdir / "plain"
    urls_file = s.workdir / "urls.json"
    urls_file.write_text(json.dumps(urls))
    answer = subprocess.run(
        [sys.executable, "-m", "benchmarks.plain_download", str(urls_file), str(out_dir), str(THREADS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    data: dict[str, Any] = json.loads(answer.stdout.strip().splitlines()[-1])
    data["mb_per_s"] = data["bytes"] / 1e6 / data["seconds"] if data["seconds"] else None
    return data
