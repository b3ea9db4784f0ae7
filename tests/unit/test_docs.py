"""The README is part of the interface: every setting and every task must be documented there (or, for
settings, in a page of docs/)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from config.celeryconf import TASK_QUEUES
from config.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text()
DOCS = README + "".join(page.read_text() for page in sorted((ROOT / "docs").glob("*.md")))
"""The README and the pages it can point to for one subject (docs/redis.md: every Redis setting)."""


def _env_names() -> list[str]:
    names = []
    for group, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += [f"{ENV_PREFIX}{group}_{name}".upper() for name in annotation.model_fields]
        else:
            names.append(f"{ENV_PREFIX}{group}".upper())
    return names


def test_every_setting_is_documented() -> None:
    names = _env_names()
    assert len(names) > 15
    missing = [name for name in names if f"`{name}`" not in DOCS]
    assert missing == []


def test_every_task_and_its_queue_is_in_the_readme() -> None:
    for name, queue in TASK_QUEUES.items():
        assert f"`{name}(" in README
        assert f"| `{queue}` |" in README


def test_readme_opens_with_the_two_commands() -> None:
    head = README[:1200]
    assert "make demo" in head and "make test" in head
