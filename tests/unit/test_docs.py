"""The README and docs/ are part of the interface: the README stays a short front door, every setting,
task and queue is documented under docs/, and every link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from genq import settings_doc
from genq.celeryconf import TASK_QUEUES
from genq.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _env_names() -> list[str]:
    names = []
    for group, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += [f"{ENV_PREFIX}{group}_{name}".upper() for name in annotation.model_fields]
        else:
            names.append(f"{ENV_PREFIX}{group}".upper())
    return names


def test_every_setting_is_in_docs_settings() -> None:
    text = (DOCS / "settings.md").read_text()
    names = _env_names()
    assert len(names) > 15
    missing = [name for name in names if f"`{name}`" not in text]
    assert missing == []


def test_docs_settings_is_what_the_model_renders() -> None:
    assert (DOCS / "settings.md").read_text() == settings_doc.render(), (
        "docs/settings.md is stale: run `make docs`"
    )


def test_every_task_and_its_queue_is_in_docs_operations() -> None:
    text = (DOCS / "operations.md").read_text()
    for name, queue in TASK_QUEUES.items():
        assert f"`{name}(" in text
        assert f"| `{queue}` |" in text


def test_readme_opens_with_the_two_commands() -> None:
    head = README[:1200]
    assert "make demo" in head and "make test" in head


def test_readme_is_a_front_door() -> None:
    assert len(README.splitlines()) <= 150
    for gone in ("../shared", "DESIGN.md"):
        assert gone not in README


def test_ci_runs_lint_then_the_readmes_test_command() -> None:
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci.index("make lint") < ci.index("make test")
    # The whole suite but the slow runs, nothing narrower (the workers flag only spreads it).
    test = r"^test: .*\n\t\$\(BIN\)/pytest -n \$\(TEST_WORKERS\) -m \"not slow\" \$\(PYTEST_ARGS\)$"
    assert re.search(test, (ROOT / "Makefile").read_text(), re.M)


def test_every_phony_target_says_what_it_does_in_make_help() -> None:
    makefile = (ROOT / "Makefile").read_text()
    phony = {t for line in re.findall(r"^\.PHONY: (.*)$", makefile, re.M) for t in line.split()}
    described = set(re.findall(r"^([\w-]+):.*## ", makefile, re.M))
    assert phony - described == set()


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _outside_code(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _links(page: Path) -> list[str]:
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", _outside_code(page.read_text()))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for link in _links(page):
        if re.match(r"[a-z]+:", link):
            continue  # https:, mailto:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.is_relative_to(ROOT) or not target.exists():
            broken.append(link)
        elif anchor and target.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", _outside_code(target.read_text()), re.M)
            if anchor not in {_anchor(h) for h in headings}:
                broken.append(link)
    assert broken == []


def test_the_link_check_sees_links() -> None:
    assert len(_links(ROOT / "README.md")) >= 7
    assert _anchor("Flower: `genq flower`") == "flower-genq-flower"
