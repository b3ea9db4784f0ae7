"""``docker-compose.yml`` without Docker: ``docker-compose config`` validates it, and every service's
command, environment and healthcheck, read from the file itself with ``deploy/dev.env`` (the dev profile),
runs as a local process; a batch of jobs goes through them and every one succeeds.

What must differ between a container and this host is translated, and only that (:class:`Host`): a
service's name as a host becomes 127.0.0.1, each exposed container port a free local port, 0.0.0.0 the
loopback, and container paths (named volumes, /tmp) directories under the test's tmp dir.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from genq.embedded import find_redis_server, free_port
from genq.producer import Producer
from genq.schemas import JobState
from genq.settings import load_settings
from tests.helpers import environment, wait_all
from tests.integration.procs import BIN, ROOT, Service, ensure_debian_packages, sample, scrape

pytestmark = pytest.mark.integration

COMPOSE = ROOT / "docker-compose.yml"
DEV_ENV = ROOT / "deploy" / "dev.env"
PRODUCTION = {
    "REDIS_PASSWORD": "prod-redis-pw",
    "GENQ_API_BASE_URL": "https://api.example.test",
    "GENQ_API_KEY": "sk-prod-canary",
    "GENQ_FLOWER_BASIC_AUTH": "ops:prod-flower-pw",
}

# ------------------------------------------------------------------ reading the file as compose does

_VARIABLE = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<plain>[A-Za-z_]\w*)"
)


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines, as ``docker compose --env-file`` reads them."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def interpolate(value: Any, variables: Mapping[str, str]) -> Any:
    """Compose's variable substitution: ``${X}``, ``${X:-default}``, ``${X-default}``, ``${X:?error}``,
    ``${X?error}``, ``$X`` and ``$$`` for a literal ``$``; applied to every string in the tree."""
    if isinstance(value, dict):
        return {k: interpolate(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, variables) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m["braced"] or m["plain"]
        op, arg, found = m["op"], m["arg"] or "", variables.get(m["braced"] or m["plain"])
        if op in (":?", "?") and (found is None or (op == ":?" and not found)):
            raise LookupError(f"{name}: {arg}")
        if op == ":-":
            return found or arg
        if op == "-":
            return arg if found is None else found
        return found or ""

    return _VARIABLE.sub(substitute, value)


def compose_services(variables: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The services the given variables start (their profiles active), interpolated."""
    services: dict[str, dict[str, Any]] = interpolate(
        yaml.safe_load(COMPOSE.read_text())["services"], variables
    )
    active = set(filter(None, variables.get("COMPOSE_PROFILES", "").split(",")))
    return {name: s for name, s in services.items() if not s.get("profiles") or active & set(s["profiles"])}


def as_dict(environment: Any) -> dict[str, str]:
    if isinstance(environment, list):
        return dict(item.split("=", 1) for item in environment)
    return {k: str(v) for k, v in (environment or {}).items()}


def as_argv(command: Any) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


# ------------------------------------------------------------------ docker-compose config


@pytest.fixture(scope="module")
def docker_compose() -> str:
    reason = ensure_debian_packages({"docker-compose": "docker-compose"})
    if reason:
        pytest.skip(f"no docker-compose to validate the file with: {reason}")
    return shutil.which("docker-compose") or ""


def rendered(
    docker_compose: str, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GENQ_", "REDIS_", "COMPOSE_"))}
    return subprocess.run(
        [docker_compose, "--project-directory", str(ROOT), "-f", str(COMPOSE), *args, "config"],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_docker_compose_validates_the_file_and_reads_it_as_this_test_does(docker_compose: str) -> None:
    done = rendered(docker_compose, "--env-file", str(DEV_ENV))
    assert done.returncode == 0, done.stderr
    theirs = yaml.safe_load(done.stdout.replace("$$", "$"))["services"]
    ours = compose_services(read_env_file(DEV_ENV))
    assert set(theirs) == set(ours) == {
        "redis", "simulator", "worker-submit", "worker-poll", "worker-download", "worker-training",
        "beat", "flower", "metrics",
    }  # fmt: skip
    for name, service in ours.items():
        assert as_argv(theirs[name]["command"]) == as_argv(service["command"]), name
        assert as_dict(theirs[name].get("environment")) == as_dict(service.get("environment")), name
        if "healthcheck" in service:
            assert theirs[name]["healthcheck"]["test"] == service["healthcheck"]["test"], name


def test_no_secret_has_a_default(docker_compose: str) -> None:
    for missing in PRODUCTION:
        done = rendered(docker_compose, env={k: v for k, v in PRODUCTION.items() if k != missing})
        assert done.returncode != 0, f"compose starts without {missing}"
        assert f"set {missing}" in done.stderr


def test_production_settings_are_strict(docker_compose: str) -> None:
    done = rendered(docker_compose, env=PRODUCTION)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert services["simulator"]["profiles"] == ["dev"]
    assert [n for n, s in services.items() if s.get("profiles")] == ["simulator"]
    for name in ("worker-submit", "worker-poll", "worker-download", "worker-training"):
        env = as_dict(services[name]["environment"])
        assert env["GENQ_DOWNLOAD_ALLOW_HTTP"] == "false" and env["GENQ_DOWNLOAD_ALLOW_PRIVATE"] == "false"
        assert env["GENQ_API_KEY"] == PRODUCTION["GENQ_API_KEY"]
    for name in ("beat", "flower", "metrics", "redis"):
        assert "GENQ_API_KEY" not in as_dict(services[name].get("environment")), f"{name} needs no API key"
    for name in ("flower", "metrics"):
        published = [
            str(p.get("host_ip", "")) if isinstance(p, dict) else str(p) for p in services[name]["ports"]
        ]
        assert all(p.startswith("127.0.0.1") for p in published), (name, published)
    assert "ports" not in services["redis"]
    redis_command = services["redis"]["command"]
    for flag in ("--appendonly yes", "--maxmemory-policy noeviction", "--requirepass prod-redis-pw"):
        assert flag in redis_command


def test_the_image_is_slim_and_runs_as_a_user() -> None:
    stages = (ROOT / "Dockerfile").read_text().split("\nFROM ")
    final = stages[-1]
    assert final.startswith("python:3.11-slim")
    users = re.findall(r"^USER (\S+)$", final, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")


# ------------------------------------------------------------------ running the services


@dataclass
class Host:
    """Translates a container's view (service names, container ports, volumes) to this host's."""

    tmp: Path
    services: dict[str, dict[str, Any]]
    ports: dict[tuple[str, int], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, service in self.services.items():
            for port in service.get("expose", []):
                self.ports[(name, int(port))] = free_port()

    def port(self, service: str, container_port: int) -> int:
        return self.ports[(service, container_port)]

    def text(self, service: str, value: str) -> str:
        for (name, port), local in self.ports.items():
            value = re.sub(rf"(?<![\w.-]){re.escape(name)}:{port}\b", f"127.0.0.1:{local}", value)
            if name == service:
                value = re.sub(rf"(--port[ =]){port}\b", rf"\g<1>{local}", value)
                value = re.sub(rf"\b(?:127\.0\.0\.1|localhost):{port}\b", f"127.0.0.1:{local}", value)
        value = value.replace("0.0.0.0", "127.0.0.1")
        for mount, local_dir in self.mounts(service).items():
            value = re.sub(rf"(?<![\w/]){re.escape(mount)}(?![\w-])", str(local_dir), value)
        return value

    def mounts(self, service: str) -> dict[str, Path]:
        out = {"/tmp": self.tmp / service / "tmp"}
        for volume in self.services[service].get("volumes", []):
            name, _, path = volume.partition(":")
            out[path] = self.tmp / "volumes" / name
        for path in out.values():
            path.mkdir(parents=True, exist_ok=True)
        return out

    def environment(self, service: str) -> dict[str, str]:
        env = {
            k: self.text(service, v) for k, v in as_dict(self.services[service].get("environment")).items()
        }
        for key, value in env.items():
            if key.endswith("_PORT") and (service, int(value)) in self.ports:
                env[key] = str(self.port(service, int(value)))
        self.never_container_ports(list(env.values()))
        return env

    def argv(self, service: str, words: list[str]) -> list[str]:
        out = [self.text(service, w) for w in words]
        for i in range(1, len(out)):  # "--port", "6379" as two words
            own = (service, int(out[i])) if out[i].isdigit() else None
            if out[i - 1] == "--port" and own in self.ports:
                out[i] = str(self.ports[own])
        self.never_container_ports(out)
        return out

    def never_container_ports(self, words: list[str]) -> None:
        """Nothing may reach this host's own services on their usual ports (a Redis on 6379, say)."""
        for word in words:
            for _, port in self.ports:
                assert not re.search(rf"(?<![\d]){port}(?!\d)", word), f"untranslated port {port} in {word!r}"

    def healthcheck(self, service: str) -> list[str] | None:
        test = self.services[service].get("healthcheck", {}).get("test")
        if not test:
            return None
        if test[0] == "CMD-SHELL":
            return ["sh", "-c", *self.argv(service, [test[1]])]
        return self.argv(service, test[1:])


@dataclass
class Deployment:
    host: Host
    running: dict[str, Service]
    env: dict[str, dict[str, str]]
    base_env: dict[str, str]

    def check(self, service: str) -> subprocess.CompletedProcess[str] | None:
        argv = self.host.healthcheck(service)
        if argv is None:
            return None
        return subprocess.run(
            argv,
            env={**self.base_env, **self.env[service]},
            cwd=self.running[service].cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def wait_healthy(self, service: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            done = self.check(service)
            if done is None or done.returncode == 0:
                return
            if not self.running[service].alive():
                pytest.fail(f"{service} exited:\n{self.running[service].output()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{service} never became healthy: {done.stdout}{done.stderr}\n"
                    f"{self.running[service].output()[-3000:]}"
                )
            time.sleep(1)


def start_order(services: Mapping[str, dict[str, Any]]) -> list[str]:
    order: list[str] = []
    while len(order) < len(services):
        ready = [
            n for n, s in services.items()
            if n not in order and all(d in order or d not in services for d in s.get("depends_on", {}))
        ]  # fmt: skip
        assert ready, "a depends_on cycle"
        order += ready
    return order


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    services = compose_services(read_env_file(DEV_ENV))
    host = Host(tmp_path, services)
    redis_dir = str(Path(find_redis_server()).parent)
    base_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("GENQ_", "FLOWER_", "REDIS_", "COMPOSE_"))
    }
    base_env["PATH"] = os.pathsep.join([str(BIN), redis_dir, base_env.get("PATH", "")])
    base_env["PYTHONUNBUFFERED"] = "1"
    deployment = Deployment(host, {}, {name: host.environment(name) for name in services}, base_env)
    try:
        for name in start_order(services):
            work = tmp_path / name / "work"  # like the image's empty WORKDIR: no .env, no sources
            work.mkdir(parents=True, exist_ok=True)
            argv = host.argv(name, as_argv(services[name]["command"]))
            env = {**base_env, **deployment.env[name]}
            deployment.running[name] = Service(argv, env, tmp_path / f"{name}.log", cwd=work).start()
            dependents = [s for s in services.values() if name in s.get("depends_on", {})]
            if any(s["depends_on"][name].get("condition") == "service_healthy" for s in dependents):
                deployment.wait_healthy(name)
        yield deployment
    finally:
        for service in reversed(list(deployment.running.values())):
            service.stop(timeout=20)


def test_every_service_runs_from_the_file_and_a_batch_succeeds(deployment: Deployment) -> None:
    running = deployment.running
    assert set(running) == {
        "redis", "simulator", "worker-submit", "worker-poll", "worker-download", "worker-training",
        "beat", "flower", "metrics",
    }  # fmt: skip
    for name in running:
        deployment.wait_healthy(name)

    worker_env = deployment.env["worker-submit"]
    with environment({"GENQ_REDIS_URL": worker_env["GENQ_REDIS_URL"]}):
        producer = Producer(load_settings())
    try:
        ids = [producer.submit_image(f"a harbour at dawn #{i}", num_images=2).id for i in range(10)]
        ids.append(producer.submit_workflow("a paper boat", num_images=2, upscale_factor=2).id)
        records = wait_all(producer, ids, timeout=180)
        counts = producer.ledger.counts()
    finally:
        producer.close()

    assert [r.state for r in records] == [JobState.SUCCEEDED] * len(ids), [r.error for r in records]
    downloads = deployment.host.mounts("worker-download")["/data/downloads"]
    files = [Path(o.path) for r in records for o in r.outputs]
    assert len(files) == 10 * 2 + 2
    assert all(f.is_file() and f.is_relative_to(downloads) for f in files)

    metrics_port = deployment.host.port("metrics", 9818)
    samples = scrape(requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text)
    assert sample(samples, "genq_jobs", kind="image", state="succeeded") == counts["image:succeeded"] >= 11
    assert sample(samples, "genq_jobs", kind="workflow", state="succeeded") == 1

    flower = f"http://127.0.0.1:{deployment.host.port('flower', 5555)}"
    user, _, password = deployment.env["flower"]["GENQ_FLOWER_BASIC_AUTH"].partition(":")
    assert requests.get(flower + "/api/workers", timeout=30).status_code == 401
    workers = requests.get(flower + "/api/workers?refresh=1", auth=(user, password), timeout=30).json()
    assert {name.split("@")[0] for name in workers} >= {"submit", "poll", "download", "training"}

    for name, service in running.items():
        assert service.alive(), f"{name} died:\n{service.output()[-3000:]}"
        check = deployment.check(name)
        assert check is None or check.returncode == 0, (name, check.stdout, check.stderr)
