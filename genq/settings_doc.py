"""Writes ``docs/settings.md`` from the pydantic model in :mod:`genq.settings`.

Every field becomes one row: its environment variable, default, accepted values and meaning (the
attribute docstring under the field in ``genq/settings.py``). ``make docs`` (``python -m
genq.settings_doc``) rewrites the file; a unit test fails when it differs from what this renders.
"""

from __future__ import annotations

import ast
import inspect
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from genq.settings import ENV_PREFIX, PollPolicy, Settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "settings.md"

HEADER = f"""# Settings

<!-- Generated from genq/settings.py by `make docs` (python -m genq.settings_doc): do not edit by hand.
     tests/unit/test_docs.py fails when this file and the model disagree. -->

Every setting is an environment variable with the `{ENV_PREFIX}` prefix, also read from a `.env` file in
the working directory (the environment wins). Groups nest with one underscore after the prefix:
`GENQ_API_BASE_URL` is `api.base_url`. Invalid values stop the process at start with a message naming
each variable. Durations are seconds. A poll policy is one JSON value, and fields left out keep their
defaults: `GENQ_POLL_IMAGE='{{"first_delay": 1, "interval": 2, "deadline": 600}}'`. Lists (hosts,
networks) are comma-separated. Secrets (`SecretStr`) are never logged, never sent to Celery and never
stored in Redis.
"""

FOOTER = """
## Derived and other variables

The Celery configuration is derived from these settings in `genq/celeryconf.py`: see
[design](design.md#the-celery-configuration).

One variable is not a setting: `GENQ_KOMBU_FIX=off` skips the Redis-restart patch of kombu in
`genq/worker/kombu_fix.py` and its version check (see [operations](operations.md#redis-restarts)).
"""

_LIMITS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}


def attribute_docstrings(model: type[BaseModel]) -> dict[str, str]:
    """``{field: docstring}`` of the string literals under field assignments, over the model's bases."""
    found: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if (
            not (isinstance(cls, type) and issubclass(cls, BaseModel))
            or cls.__module__ != Settings.__module__
        ):
            continue
        (node,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
        assert isinstance(node, ast.ClassDef)
        for stmt, after in zip(node.body, node.body[1:], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                found[stmt.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return found


def _default(field: FieldInfo) -> str:
    value: Any = field.get_default(call_default_factory=True)
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, BaseModel):
        return f"`{json.dumps(value.model_dump(mode='json'))}`"
    if value is None or value in ("", []):
        return "(none)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _accepted(field: FieldInfo) -> str:
    annotation = field.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "JSON object"
    parts = [
        f"{symbol} {getattr(meta, name)}"
        for meta in field.metadata
        for name, symbol in _LIMITS.items()
        if getattr(meta, name, None) is not None
    ]
    if get_origin(annotation) is Literal:
        shown = " or ".join(f"`{choice}`" for choice in get_args(annotation))
    else:
        optional = [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) else []
        shown = getattr(optional[0] if len(optional) == 1 else annotation, "__name__", str(annotation))
        shown = {"SecretStr": "secret", "list": "comma-separated list", "Path": "path"}.get(shown, shown)
    return ", ".join([shown, *parts])


def _meaning(name: str, field: FieldInfo, docs: dict[str, str]) -> str:
    text = docs.get(name, "")
    if not text and field.annotation is PollPolicy:
        text = f"Poll policy of {name} jobs: the fields below."
    return text.replace("``", "`").replace("|", "\\|")


def render() -> str:
    lines = [HEADER]
    for group, group_field in Settings.model_fields.items():
        model = group_field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        title = inspect.cleandoc(model.__doc__ or "").split("\n\n")[0]
        lines += [
            f"## `{ENV_PREFIX}{group.upper()}_*`: {group}",
            "",
            " ".join(title.split()).replace("``", "`"),
            "",
            "| variable | default | accepted | meaning |",
            "|---|---|---|---|",
        ]
        docs = attribute_docstrings(model)
        for name, field in model.model_fields.items():
            variable = f"{ENV_PREFIX}{group}_{name}".upper()
            lines.append(
                f"| `{variable}` | {_default(field)} | {_accepted(field)} | {_meaning(name, field, docs)} |"
            )
        lines.append("")
    lines += ["## Poll policy fields", "", " ".join(inspect.cleandoc(PollPolicy.__doc__ or "").split()), ""]
    lines += ["| field | accepted | meaning |", "|---|---|---|"]
    docs = attribute_docstrings(PollPolicy)
    for name, field in PollPolicy.model_fields.items():
        lines.append(f"| `{name}` | {_accepted(field)} | {_meaning(name, field, docs)} |")
    lines.append(FOOTER)
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render())
    sys.stdout.write(f"wrote {DOC}\n")


if __name__ == "__main__":
    main()
