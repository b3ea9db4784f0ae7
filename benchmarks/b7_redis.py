"""7. The ceiling of one Redis: Redis CPU time and commands per job, end to end.

N image jobs (one output each, the upstream answering after a short fixed time so a job is polled a
few times) run through real workers (prefork 4 on every queue), beat and the producer, on a private
redis-server. Before and after the batch the benchmark reads that server's ``INFO commandstats``
(which on Redis 7.0 counts the commands a Lua script runs as well as the EVALSHA that ran it: checked
at the start of every run, see :func:`lua_counted`), ``INFO cpu`` (the server's user + sys CPU, all
threads, and its main thread's, which runs every command) and ``INFO stats`` (bytes in and out).
An idle window of the same workers just before the batch measures what they cost with no job (BRPOP
timeouts, beat, sweeps, heartbeats), so figures are given gross and net of it.

Ceiling: Redis runs commands on one thread, so one primary carries at most 1000 / (main-thread CPU ms
per job) jobs per second; the CPU of the workers, the simulator and the producer per job (psutil,
same batch) says which resource runs out first on this host.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import psutil
import redis

from benchmarks.b2_overhead import CommandCounter
from benchmarks.context import Context, producer_for, records, wait_terminal
from benchmarks.harness import Stack, stack
from benchmarks.result import BenchResult, Row
from benchmarks.simcapacity import headroom_row
from benchmarks.stats import Goal, ratio
from genq import keys
from genq.ledger import state_counts
from genq.simulator import Duration, SimConfig

NAME = "redis"
CONCURRENCY = 4
DURATION = 0.2  # the upstream's time per job: with the policy below, about 3 polls per job
POLICY = json.dumps(
    {"first_delay": 0.05, "interval": 0.05, "backoff": 1, "max_interval": 0.05, "jitter": 0, "deadline": 600}
)
ENV = {"GENQ_POLL_IMAGE": POLICY}


def run(ctx: Context) -> BenchResult:
    n = ctx.size(60, 500)
    idle_s = ctx.size(1.0, 10.0)
    sample = ctx.size(15, 100)
    result = BenchResult(NAME, "The ceiling of one Redis: CPU and commands per job")
    result.size = {
        "jobs": n,
        "pool": f"prefork {CONCURRENCY}",
        "upstream_s": DURATION,
        "idle_window_s": idle_s,
        "monitor_sample_jobs": sample,
    }
    sim = SimConfig(api_key="bench-key", images_per_job=1, duration=Duration(kind="fixed", value=DURATION))
    with stack(sim, ctx.workdir / NAME, NAME) as s:
        lua = lua_counted(s.redis)
        ctx.log(f"{NAME}: commands inside Lua counted in commandstats: {lua}")
        (worker,) = s.workers([{"concurrency": CONCURRENCY, "env": ENV}], beat_env=ENV)
        beat = s.processes[-1]
        producer = producer_for(s, ENV)
        producer.submit_image("warm-up", num_images=1)  # imports, connections, scripts loaded
        wait_terminal(ctx, s.redis, 1, timeout=60)
        time.sleep(ctx.size(0.5, 1.0))  # the warm-up job's last writes and events settle
        procs = Procs(s, [worker.pid, beat.pid])
        ctx.log(f"{NAME}: idle window {idle_s:.0f}s")
        idle = Snapshot.take(s.redis, procs).until(Snapshot.take(s.redis, procs, after=idle_s))
        ctx.log(f"{NAME}: {n} image jobs")
        before = Snapshot.take(s.redis, procs)
        ids = [producer.submit_image(f"ceiling {i}", num_images=1).id for i in range(n)]
        ok, probes = wait_quietly(s.redis, n + 1, timeout=600)
        batch = before.until(Snapshot.take(s.redis, procs))
        # Our own probes are not the jobs' work.
        batch["by_command"]["hgetall"] = batch["by_command"].get("hgetall", 0) - probes
        batch["commands"] -= probes
        batch["client_commands"] -= probes
        recs = records(s.redis, ids)
        sim_stats = s.sim.stats(include_jobs=False)
        # commandstats cannot tell a client's command from one a script ran (total_commands_processed
        # counts both on 7.0): a small untimed batch under MONITOR splits them (b2's counter).
        ctx.log(f"{NAME}: {sample} jobs under MONITOR (untimed), for the client / inside-Lua split")
        with CommandCounter(s.redis_server.url) as counter:
            more = [producer.submit_image(f"monitored {i}", num_images=1).id for i in range(sample)]
            wait_quietly(s.redis, n + 1 + sample, timeout=300)
        split = counter.summary(len(more))
        producer.close()
    polls = sim_stats["requests"].get("GET /jobs", 0)
    succeeded = sum(r.state.value == "succeeded" for r in recs)
    figures = per_job(batch, idle, n)
    figures.update(
        {
            "jobs": n,
            "succeeded": succeeded,
            "all_terminal": ok,
            "seconds": batch["seconds"],
            "jobs_per_s": n / batch["seconds"],
            "upstream_polls_per_job": polls / n,
            "lua_commands_counted": lua,
            "monitor_split": split,
            "idle_per_s": {
                "commands": idle["commands"] / idle["seconds"],
                "redis_cpu_ms": idle["redis_cpu_s"] * 1000 / idle["seconds"],
                "redis_main_cpu_ms": idle["redis_main_cpu_s"] * 1000 / idle["seconds"],
            },
            "raw": {"batch": batch, "idle": idle},
        }
    )
    result.figures = figures
    ceiling = figures["ceiling_jobs_per_s_one_core"]
    result.check(Goal("every job succeeded", "jobs succeeded / jobs", ">=", 1.0), succeeded / n)
    busiest = figures["busiest"]
    result.rows = [
        Row("jobs/s end to end (this host)", figures["jobs_per_s"], unit="jobs/s"),
        Row("Redis commands per job (net of idle)", figures["commands_per_job_net"]),
        Row("  sent by clients (MONITOR sample, incl. idle)", split["round_trips_per_job"]),
        Row("  run inside Lua (MONITOR sample)", split["all_per_job"] - split["round_trips_per_job"]),
        Row("Redis main-thread CPU per job (net)", figures["redis_main_cpu_ms_per_job_net"], unit="ms"),
        Row("Redis CPU per job, all threads (net)", figures["redis_cpu_ms_per_job_net"], unit="ms"),
        Row("Redis time inside commands per job", figures["redis_command_usec_per_job"] / 1000, unit="ms"),
        Row("ceiling: jobs/s on one Redis core", ceiling, unit="jobs/s"),
        Row("worker CPU per job (all processes)", figures["worker_cpu_ms_per_job"], unit="ms"),
        Row(
            f"busiest here: {busiest['resource']}",
            busiest["utilization"],
            unit="cores",
        ),
        Row("Redis headroom: ceiling / rate here", ratio(ceiling, figures["jobs_per_s"]), unit="x"),
        headroom_row(ctx, sim_stats["max_rate_1s"]),
    ]
    result.notes += [
        "commandstats counts every command a Lua script runs (redis.call) and the EVALSHA that ran it "
        "(checked: lua_commands_counted), and so does total_commands_processed; monitor_split splits a "
        "smaller untimed batch into commands clients sent and commands scripts ran",
        "net = the batch minus the idle window's rate over the batch's length (idle workers still BRPOP, "
        "heartbeat and sweep)",
        "ceiling = 1000 / Redis main-thread CPU ms per job: commands run on that one thread; network I/O "
        "threads (io-threads) are off by default and not counted in it",
    ]
    return result


def wait_quietly(client: redis.Redis, n: int, timeout: float) -> tuple[bool, int]:
    """Wait until ``n`` image jobs are terminal, asking Redis five times a second with one HGETALL
    (not the benchmarks' usual 20 a second); returns (all terminal, probes sent)."""
    states = ("succeeded", "failed", "timed_out", "cancelled", "submit_unknown")
    deadline = time.monotonic() + timeout
    probes = 0
    while time.monotonic() < deadline:
        counts = state_counts(client.hgetall(keys.COUNTS))
        done = sum(counts.get(f"image:{s}", 0) for s in states)
        probes += 1
        if done >= n:
            return True, probes
        time.sleep(0.2)
    return False, probes


def lua_counted(client: redis.Redis) -> bool:
    """Whether this server counts a command run inside a Lua script in ``INFO commandstats``."""
    probe = "bench:lua-probe"
    before = _calls(client).get("cmdstat_pexpire", 0)
    client.eval("redis.call('set', KEYS[1], 1); return redis.call('pexpire', KEYS[1], 1000)", 1, probe)
    return _calls(client).get("cmdstat_pexpire", 0) == before + 1


def _calls(client: redis.Redis) -> dict[str, int]:
    return {k: int(v["calls"]) for k, v in client.info("commandstats").items()}


class Procs:
    """CPU seconds of the worker and beat process trees, the simulator and this process (the producer)."""

    def __init__(self, s: Stack, roots: list[int]) -> None:
        self.roots = [psutil.Process(pid) for pid in roots]
        self.sim = psutil.Process(s.sim.popen.pid)
        self.me = psutil.Process()

    def cpu(self) -> dict[str, float]:
        workers = 0.0
        for root in self.roots:
            for p in [root, *root.children(recursive=True)]:
                try:
                    t = p.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                workers += t.user + t.system
        sim = sum(self.sim.cpu_times()[:2])
        me = sum(self.me.cpu_times()[:2])
        return {"workers": workers, "simulator": sim, "producer_and_bench": me}


class Snapshot:
    def __init__(
        self, stats: dict[str, dict[str, Any]], info: dict[str, Any], cpu: dict[str, float], at: float
    ):
        self.stats, self.info, self.cpu, self.at = stats, info, cpu, at

    @classmethod
    def take(cls, client: redis.Redis, procs: Procs, after: float = 0.0) -> Snapshot:
        if after:
            time.sleep(after)
        info = client.info("all")
        stats = {k.removeprefix("cmdstat_"): v for k, v in client.info("commandstats").items()}
        return cls(stats, info, procs.cpu(), time.monotonic())

    def until(self, later: Snapshot) -> dict[str, Any]:
        """What happened between this snapshot and ``later``."""
        calls: Counter[str] = Counter()
        usec = 0
        for name, v in later.stats.items():
            was = self.stats.get(name, {"calls": 0, "usec": 0})
            calls[name] = int(v["calls"]) - int(was["calls"])
            usec += int(v["usec"]) - int(was["usec"])
        calls = Counter({k: v for k, v in calls.items() if v > 0 and k != "info"})  # our own INFO

        def delta(key: str) -> float:
            return float(later.info.get(key, 0)) - float(self.info.get(key, 0))

        return {
            "seconds": later.at - self.at,
            "commands": sum(calls.values()),
            "client_commands": int(delta("total_commands_processed")) - 2,  # the two INFO calls
            "by_command": dict(calls.most_common()),
            "command_usec": usec,
            "redis_cpu_s": delta("used_cpu_user") + delta("used_cpu_sys"),
            "redis_main_cpu_s": delta("used_cpu_user_main_thread") + delta("used_cpu_sys_main_thread"),
            "net_in_bytes": delta("total_net_input_bytes"),
            "net_out_bytes": delta("total_net_output_bytes"),
            "cpu_s": {k: later.cpu[k] - self.cpu[k] for k in later.cpu},
        }


def per_job(batch: dict[str, Any], idle: dict[str, Any], n: int) -> dict[str, Any]:
    scale = batch["seconds"] / idle["seconds"]  # the idle rate over the batch's length

    def net(key: str) -> float:
        return float(batch[key]) - float(idle[key]) * scale

    commands_net = net("commands")
    client_net = net("client_commands")
    main_ms = net("redis_main_cpu_s") * 1000 / n
    all_ms = net("redis_cpu_s") * 1000 / n
    idle_calls = Counter(idle["by_command"])
    by_command_net = {
        k: (v - idle_calls.get(k, 0) * scale) / n for k, v in Counter(batch["by_command"]).most_common()
    }
    top = dict(sorted(by_command_net.items(), key=lambda kv: -kv[1])[:10])
    resources = {
        "redis (main thread)": batch["redis_main_cpu_s"] / batch["seconds"],
        "workers (all processes)": batch["cpu_s"]["workers"] / batch["seconds"],
        "simulator": batch["cpu_s"]["simulator"] / batch["seconds"],
        "producer (benchmark process)": batch["cpu_s"]["producer_and_bench"] / batch["seconds"],
    }
    busiest = max(resources.items(), key=lambda kv: kv[1])
    return {
        "commands_per_job_gross": batch["commands"] / n,
        "commands_per_job_net": commands_net / n,
        "total_commands_processed_per_job_net": client_net / n,
        "top10_commands_per_job_net": top,
        "redis_cpu_ms_per_job_gross": batch["redis_cpu_s"] * 1000 / n,
        "redis_cpu_ms_per_job_net": all_ms,
        "redis_main_cpu_ms_per_job_gross": batch["redis_main_cpu_s"] * 1000 / n,
        "redis_main_cpu_ms_per_job_net": main_ms,
        "redis_command_usec_per_job": (batch["command_usec"] - idle["command_usec"] * scale) / n,
        "net_bytes_per_job": {"in": net("net_in_bytes") / n, "out": net("net_out_bytes") / n},
        "ceiling_jobs_per_s_one_core": 1000 / main_ms if main_ms > 0 else None,
        "ceiling_jobs_per_s_gross": 1000 / (batch["redis_main_cpu_s"] * 1000 / n),
        "worker_cpu_ms_per_job": batch["cpu_s"]["workers"] * 1000 / n,
        "simulator_cpu_ms_per_job": batch["cpu_s"]["simulator"] * 1000 / n,
        "producer_cpu_ms_per_job": batch["cpu_s"]["producer_and_bench"] * 1000 / n,
        "utilization_cores": resources,
        "busiest": {
            "resource": busiest[0],
            "utilization": busiest[1],
            "note": "CPU cores it used on average during the batch; the host has "
            f"{psutil.cpu_count()} shared with the rest",
        },
    }
