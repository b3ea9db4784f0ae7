"""Helpers for the operations tests: long-running genqueue commands as child processes, HTTP waits,
Prometheus scrapes, and the Debian packages some tests need (installed when missing and possible)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from genq.processes import ProcessGroup

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ARTIFACTS = ROOT / "test-artifacts"


class Service(ProcessGroup):
    """A command in its own process group, its output (stdout and stderr) in a log file; ``stop`` ends
    the whole group."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path = ROOT) -> None:
        super().__init__(args, env, log_path=log_path, cwd=cwd)

    def start(self) -> Service:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as out:
            self.spawn(out, subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> None:
        super().stop(timeout)


def genq(*args: str) -> list[str]:
    """The ``genq`` console script of this environment."""
    return [str(BIN / "genq"), *args]


def wait_http(
    url: str, *, service: Service | None = None, timeout: float = 60.0, **kwargs: Any
) -> requests.Response:
    """The first answer ``url`` gives (any status), retrying while nothing listens yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return requests.get(url, timeout=5, **kwargs)
        except requests.ConnectionError:
            pass
        if service is not None and not service.alive():
            raise RuntimeError(f"{service.args[:3]} exited:\n{service.output()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing answered at {url} in {timeout}s")
        time.sleep(0.2)


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus exposition text as ``{(sample name, sorted labels): value}``."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def sample(
    samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def ensure_debian_packages(binaries: Mapping[str, str]) -> str | None:
    """Make each binary (key) available, installing its Debian package (value) with apt-get when it is
    missing and that is possible. Returns None when all are there, else why not (a skip reason)."""
    missing = {b: p for b, p in binaries.items() if shutil.which(b) is None}
    if not missing:
        return None
    packages = sorted(set(missing.values()))
    if shutil.which("apt-get") is None:
        return f"{', '.join(missing)} not installed and no apt-get here to install {', '.join(packages)}"
    if os.geteuid() != 0:
        return f"{', '.join(missing)} not installed; as root: apt-get install -y {' '.join(packages)}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *packages]
    for attempt in (install, ["apt-get", "update", "-q"], install):
        try:
            done = subprocess.run(attempt, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return f"{' '.join(attempt)} timed out"
        if attempt is install and done.returncode == 0:
            break
    still = [b for b in binaries if shutil.which(b) is None]
    if still:
        return f"could not install {', '.join(packages)} for {', '.join(still)}: {done.stderr.strip()[-300:]}"
    return None
