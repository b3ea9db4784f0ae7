"""An installed genqueue puts ``genq`` and nothing else on ``sys.path``, so a producer app with its own
``config`` or ``tasks`` package (cookiecutter-django's layout) imports genqueue without a collision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import redis

from genq.embedded import EmbeddedRedis

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

PRODUCER_APP = """
import json, sys
import config, tasks                     # the app's own packages, not genqueue's
assert config.MINE and tasks.MINE, "the app's packages were shadowed"
from genq.producer import Producer
handle = Producer().submit_image("a fox")
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("config", "tasks", "workers"))
print(json.dumps({"id": handle.id, "state": handle.status().state.value, "genq_modules": ours}))
"""


def test_the_wheel_holds_only_genq_at_the_top_level(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("genqueue-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {
            name.split("/")[0] for name in archive.namelist() if not name.split("/")[0].endswith(".dist-info")
        }
    assert tops == {"genq"}, tops


def test_a_producer_with_its_own_config_and_tasks_packages_imports_and_submits(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    app = tmp_path / "producer_app"
    for package in ("config", "tasks"):
        (app / package).mkdir(parents=True)
        (app / package / "__init__.py").write_text("MINE = True\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_") and k != "PYTHONPATH"}
    env |= {"PYTHONPATH": str(app), "GENQ_REDIS_URL": redis_server.url}
    # Run from the app's folder, as the app would: the checkout of genqueue is nowhere on sys.path.
    done = subprocess.run(
        [sys.executable, "-c", PRODUCER_APP], cwd=app, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["state"] == "pending"  # recorded in the ledger, its submit message on the broker
    assert answer["genq_modules"] == ["config", "tasks"]  # only the app's own two, nothing of ours
    assert redis.Redis.from_url(redis_server.url).llen("submit") == 1
