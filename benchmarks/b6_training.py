"""6. Training: upstream calls and detection latency of a model training of 20-25 simulated minutes.

Time compression: the simulator's ``training_duration`` is 22 simulated minutes divided by a factor
(60 in the full run: 22 s, 5-minute checks become 5 s; 360 in quick: 3.7 s and 0.83 s). genqueue's
model poll policy (``GENQ_POLL_MODEL``), ``GENQ_POLL_COUNTDOWN_MAX`` and the sweep interval are scaled
by the same factor, so the 5-minute waits are still held in Redis and dispatched by the sweeper as in
production. Baseline: the reference pattern, a task that calls train and then checks every 5 (scaled)
minutes with ``sleep``; its call count is what "polling every 5 minutes" makes. Upstream calls are the
simulator's counts (train + GET /models); detection latency is when genqueue recorded the model ready
minus when the simulator made it ready (training start + duration), reported in simulated seconds.
"""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import datetime
from typing import Any

from benchmarks import baseline_app
from benchmarks.context import Context, producer_for
from benchmarks.harness import Stack, stacks, wait_until
from benchmarks.result import BenchResult, ChartItem, Row
from benchmarks.simcapacity import headroom_row
from benchmarks.stats import Goal, ratio
from genq.settings import PollSettings
from genq.simulator import SimConfig

NAME = "training"
TRAINING_MINUTES = 22.0
INTERVAL = 300.0  # the reference: check every 5 minutes


def run(ctx: Context) -> BenchResult:
    c = ctx.size(360.0, 60.0)
    training = TRAINING_MINUTES * 60 / c
    model = PollSettings().model.model_dump()
    for key in ("first_delay", "interval", "max_interval", "deadline"):
        model[key] = model[key] / c
    env = {
        "GENQ_POLL_MODEL": json.dumps(model),
        "GENQ_POLL_COUNTDOWN_MAX": str(60.0 / c),
        "GENQ_WORKER_SWEEP_INTERVAL": str(max(0.05, 2.0 / c * 4)),
        "GENQ_WORKER_SWEEP_GRACE": str(max(1.0, 30.0 / c)),
    }
    result = BenchResult(NAME, "Training: calls and detection vs checking every 5 minutes")
    result.size = {
        "training_simulated_s": TRAINING_MINUTES * 60,
        "compression": c,
        "training_s": training,
        "policy": model,
        "env": env,
    }
    sim = SimConfig(api_key="bench-key", training_duration=training)
    # Side by side: each on its own Redis and simulator, so each one's upstream calls are its own.
    with stacks((sim, ctx.workdir / f"{NAME}-base", "base"), (sim, ctx.workdir / NAME, NAME)) as (sb, s):
        ctx.log(
            f"{NAME}: baseline (train + a check every {INTERVAL / c:.2f}s with sleep) and genqueue "
            f"(training {training:.1f}s, model policy / {c:g}), side by side"
        )
        out: dict[str, dict[str, Any]] = {}

        def side(name: str) -> None:
            try:
                out[name] = _baseline(sb, c, training) if name == "base" else _genqueue(s, env, c, training)
            except Exception as exc:
                out[name] = {"error": repr(exc)}

        threads = [threading.Thread(target=side, args=(n,)) for n in ("base", "gq")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for name, value in out.items():
            if "error" in value:
                raise RuntimeError(f"training {name} run failed: {value['error']}")
        base, gq = out["base"], out["gq"]
    limit = INTERVAL  # simulated seconds: detection within one interval
    m1 = result.check(
        Goal("no more upstream calls than polling every 5 minutes", "calls ratio", "<=", 1.0),
        ratio(gq["calls"], base["calls"]),
        f"genqueue made {gq['calls']} calls, the 5-minute loop {base['calls']}",
    )
    m2 = result.check(
        Goal("detection within one interval (300 simulated s)", "detection latency", "<=", limit),
        gq["detection_s"],
    )
    result.figures = gq
    result.baseline = base
    result.ratios = {
        "calls": ratio(gq["calls"], base["calls"]),
        "detection": ratio(gq["detection_s"], base["detection_s"]),
        "slot_seconds": ratio(gq["slot_s"], base["slot_s"]),
    }
    result.rows = [
        Row(
            "upstream calls (train + checks)",
            gq["calls"],
            base["calls"],
            result.ratios["calls"],
            "",
            "<= 1x",
            m1,
        ),
        Row(
            "detection latency (simulated)",
            gq["detection_s"],
            base["detection_s"],
            result.ratios["detection"],
            "s",
            "<= 300 s",
            m2,
        ),
        Row(
            "worker slot-seconds held per model",
            gq["slot_s"],
            base["slot_s"],
            result.ratios["slot_seconds"],
            "s",
        ),
        headroom_row(ctx, max(gq["sim_peak_rate_1s"], base["sim_peak_rate_1s"])),
    ]
    result.chart = [
        ChartItem(
            "latency", "6 training: detection (simulated s)", gq["detection_s"], base["detection_s"], "s"
        )
    ]
    result.notes.append(
        "slot-seconds: the baseline holds a worker slot from its train call to the check that sees the "
        "model ready (simulated seconds: what production would hold); genqueue's are the run times of its "
        "train and check tasks from the worker log (real seconds: its calls are not compressed); the "
        "sweeper's runs, shared by every job in flight, are in figures.task_seconds"
    )
    result.notes.append(f"time compressed by {c:g}: latencies are reported in simulated seconds (x{c:g})")
    return result


MODEL_TASK_NAMES = ("genq.train", "genq.poll_model")
_SUCCEEDED = re.compile(r"Task (genq\.\w+)\[[^\]]+\] (?:succeeded|retry|raised)[^\n]*? in ([0-9.e-]+)s")


def _task_seconds(log: str) -> dict[str, float]:
    """Seconds spent in each task (by name), from the worker log's ``succeeded in Xs`` lines."""
    out: dict[str, float] = {}
    for m in _SUCCEEDED.finditer(log):
        out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def _ready_at(s: Stack, model_id: str, training: float) -> float | None:
    """When the simulator made the model ready (epoch seconds): its training start + duration."""
    import requests

    got = requests.get(f"{s.sim.url}/models/{model_id}", headers=s.sim.headers, timeout=10).json()["result"]
    started = got.get("trainingStartedAt")
    if not started:
        return None
    return datetime.fromisoformat(started.replace("Z", "+00:00")).timestamp() + training


def _calls(s: Stack) -> tuple[int, int]:
    stats = s.sim.stats(include_jobs=False)
    req = stats["requests"]
    return req.get("GET /models/train", 0) + req.get("GET /models", 0), stats["max_rate_1s"]


def _baseline(s: Stack, c: float, training: float) -> dict[str, Any]:
    s.worker(app="benchmarks.baseline_app", concurrency=1, queues=["training"])
    client = baseline_app.make_app(s.redis_server.url, main=False)
    baseline_app.send(client, "bench.train_blocking", "base-model", INTERVAL / c)
    wait_until(lambda: s.redis.zcard(baseline_app.DONE) >= 1, timeout=training * 3 + 60, interval=0.05)
    client.close()
    calls, peak = _calls(s)
    info = {k.decode(): v.decode() for k, v in s.redis.hgetall("bench:train").items()}
    ready = _ready_at(s, "base-model", training)
    seen = float(info.get("seen_at", 0)) or None
    began = float(info.get("started_at", 0)) or None
    s.stop_processes()
    return {
        "calls": calls,
        # The blocking task holds its slot for the whole training: in production, 22 minutes.
        "slot_s": (seen - began) * c if seen and began else None,
        "status": info.get("status"),
        "detection_s": (seen - ready) * c if seen and ready else None,
        "sim_peak_rate_1s": peak,
    }


def _genqueue(s: Stack, env: dict[str, str], c: float, training: float) -> dict[str, Any]:
    s.workers([{"queues": ["training", "poll", "submit"], "concurrency": 2, "env": env}], beat_env=env)
    producer = producer_for(s, env)
    producer.train_model("bench-model")
    wait_until(
        lambda: producer.model_status("bench-model").state.value in ("ready", "failed", "timed_out"),
        timeout=training * 3 + 60,
        interval=0.05,
    )
    rec = producer.model_status("bench-model")
    producer.close()
    time.sleep(0.2)
    calls, peak = _calls(s)
    ready = _ready_at(s, "bench-model", training)
    logs = [p.log_path for p in s.processes]
    s.stop_processes()
    held = _task_seconds("\n".join(p.read_text(errors="replace") for p in logs))
    return {
        "calls": calls,
        # genqueue holds a slot only while a task runs: the train call and each check. Task run times
        # are real seconds (the calls are not compressed), so they are what production would see.
        "slot_s": sum(v for k, v in held.items() if k in MODEL_TASK_NAMES),
        "task_seconds": held,
        "state": rec.state.value,
        "checks": rec.checks,
        "detection_s": (rec.ready_at - ready) * c if rec.ready_at and ready else None,
        "sim_peak_rate_1s": peak,
    }
