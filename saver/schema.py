"""provision.kql: reading it, applying it, and checking a database against it."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from langgraph.checkpoint.kusto.shared.rows import COLUMNS, TABLE


class SchemaError(RuntimeError):
    """The database lacks what provision.kql creates; the message says how to fix it."""


def provision_script() -> str:
    return files("langgraph.checkpoint.kusto").joinpath("provision.kql").read_text("utf-8")


def provision_commands(script: str | None = None) -> list[str]:
    """The management commands of the script: blank-line separated, comments dropped."""
    text = provision_script() if script is None else script
    commands = []
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if not line.lstrip().startswith("//")]
        command = "\n".join(lines).strip()
        if command:
            commands.append(command)
    return commands


def apply_provision(queries: Any) -> int:
    """Run every command of provision.kql through ``queries.command``; how many ran."""
    commands = provision_commands()
    for command in commands:
        queries.command(command)
    return len(commands)


SHOW_SCHEMA = f".show table {TABLE} cslschema"


def missing_columns(cslschema: str) -> list[str]:
    """Columns of the row model that ``cslschema`` (``Name:type, ...``) lacks or mistypes."""
    present = {}
    for item in cslschema.split(","):
        name, _, kind = item.strip().partition(":")
        present[name.strip()] = kind.strip().lower()
    return [f"{name}:{kind}" for name, kind in COLUMNS if present.get(name) not in (kind, None)] + [
        f"{name}:{kind}" for name, kind in COLUMNS if name not in present
    ]


def schema_error(detail: str) -> SchemaError:
    return SchemaError(
        f"table {TABLE} is missing or out of date ({detail}). "
        "Run `langgraph-kusto provision --cluster <url> --database <db>` "
        "or call saver.setup(provision=True)."
    )


def verify_schema(show_schema_rows: list[dict[str, object]]) -> None:
    """Raise ``SchemaError`` unless ``.show table ... cslschema`` shows the full row model."""
    if not show_schema_rows:
        raise schema_error("table not found")
    missing = missing_columns(str(show_schema_rows[0]["Schema"]))
    if missing:
        raise schema_error("missing " + ", ".join(missing))
