"""Every KQL text the project can emit, checked by Microsoft's Kusto.Language (DESIGN §7).

``tests/kql/check.js`` loads ``@kusto/language-service-next`` (installed by
``scripts/setup.d/10-npm.sh``) in one node process. It declares the database from the
commands of provision.kql (tables, stored functions, materialized views, read from
Kusto.Language's own syntax tree of those commands), checks each provision command in
order, then checks every query below against that database. Any diagnostic of severity
Error fails the item's test.

What is collected:

* every command of ``schema.provision_commands()``;
* every module-level ``str`` constant, in every module of every package pyproject.toml
  ships, that reads as KQL (starts with ``declare query_parameters``, ``let``,
  ``<Table> |`` or a ``.command``). A constant without ``str.format`` placeholders is
  checked as it is (``SHOW_SCHEMA``, ``THREAD_HISTORY``, ...);
* a constant with placeholders is a template: it is checked through the renderings of the
  builder registered for it in ``BUILDERS``.

What Kusto.Language does not check, and what check.js does instead (codes LGK*):
commands its grammar does not know give no diagnostic (reported as LGK001); tokens skipped
after a complete command give none (LGK002); an update policy's query is a string
(extracted and analysed as a query, its output checked against the target table); an
ingestion mapping is a string (JSON parsed, column names checked against the table);
other policy JSON is parsed as JSON only, and plain policy values (an encoding type) are
not validated at all.

How to add a query:

* A finished KQL constant: nothing to do, it is found.
* A template plus a builder function: add ``"<module>.<CONSTANT>": <renderings>`` to
  ``BUILDERS``, where ``<renderings>`` returns ``(name, text)`` pairs covering every
  argument combination that changes the text (``test_every_kql_template_has_a_builder``
  fails until you do).
* KQL assembled somewhere else (not from a module constant): add a function to
  ``OTHER_RENDERINGS`` in the same shape.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import itertools
import json
import pkgutil
import re
import shutil
import string
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.kusto.queries import (
    VISIBLE_CHECKPOINTS,
    channel_history,
    ingested_events,
    newest_seq,
    select_checkpoints,
)
from langgraph.checkpoint.kusto.schema import provision_commands
from langgraph.checkpoint.kusto.settings import DEFAULT_DATABASE
from langgraph.checkpoint.kusto.shared.rows import COLUMNS, TABLE

ROOT = Path(__file__).resolve().parents[1]
CHECKER = ROOT / "tests" / "kql" / "check.js"
LIBRARY = ROOT / "node_modules" / "@kusto" / "language-service-next"
SETUP = "bash scripts/setup.d/10-npm.sh"

Rendering = tuple[str, str]

# ---------------------------------------------------------------------------------------
# Builders: representative renderings of each KQL template
# ---------------------------------------------------------------------------------------


def select_checkpoints_renderings() -> Iterator[Rendering]:
    """Every combination of the arguments that can change the text, hostile-looking values."""
    filters: list[dict[str, Any]] = [
        {},
        {"source": "loop"},
        {"source": "input", "step": 3, "nested": {"a": ["b", None], "q": "x'\"|;//"}},
    ]
    for thread, namespace, checkpoint, before, metadata, limit in itertools.product(
        ["thread-1", None],
        ["", None],
        [None, "1ef-checkpoint"],
        [None, "1ef-before"],
        filters,
        [None, 5],
    ):
        query = select_checkpoints(
            thread_id=thread,
            checkpoint_ns=namespace,
            checkpoint_id=checkpoint,
            before_id=before,
            metadata_filter=metadata,
            limit=limit,
        )
        name = (
            f"select_checkpoints(thread={thread!r}, ns={namespace!r}, id={checkpoint!r}, "
            f"before={before!r}, filter_keys={len(metadata)}, limit={limit!r})"
        )
        yield name, query.text


def ingested_events_renderings() -> Iterator[Rendering]:
    for count in (1, 3, 50):
        seqs = [1_700_000_000_000_000_000 + n * n for n in range(count)]
        yield f"ingested_events({count} events)", ingested_events("0123456789abcdef0123", seqs).text


def channel_history_renderings() -> Iterator[Rendering]:
    for channels in (["messages"], ["messages", "x'|;//", "c"]):
        query = channel_history("thread-1", "", channels)
        yield f"channel_history({len(channels)} channels)", query.text


def newest_seq_renderings() -> Iterator[Rendering]:
    yield "newest_seq", newest_seq("thread-1").text


def visible_checkpoints_renderings() -> Iterator[Rendering]:
    """The shared visibility prelude on its own, ending in the table it defines."""
    declare = (
        "declare query_parameters(all_threads:bool, thread_id:string, "
        "all_namespaces:bool, checkpoint_ns:string);\n"
    )
    yield (
        "VISIBLE_CHECKPOINTS prelude",
        declare + VISIBLE_CHECKPOINTS.format(table=TABLE) + ("\nCheckpoints"),
    )


BUILDERS: dict[str, Callable[[], Iterator[Rendering]]] = {
    "langgraph.checkpoint.kusto.queries.SELECT_CHECKPOINTS": select_checkpoints_renderings,
    "langgraph.checkpoint.kusto.queries.INGESTED_EVENTS": ingested_events_renderings,
    "langgraph.checkpoint.kusto.queries.CHANNEL_HISTORY": channel_history_renderings,
    "langgraph.checkpoint.kusto.queries.NEWEST_SEQ": newest_seq_renderings,
    "langgraph.checkpoint.kusto.queries.VISIBLE_CHECKPOINTS": visible_checkpoints_renderings,
}

OTHER_RENDERINGS: list[Callable[[], Iterator[Rendering]]] = []

# ---------------------------------------------------------------------------------------
# Generic collection of KQL constants
# ---------------------------------------------------------------------------------------

KQL_START = re.compile(
    r"""\A\s*(?:
        declare\s+query_parameters\b      # parameterised query
      | let\s+[A-Za-z_]\w*\s*=            # query starting with let statements
      | \.[a-z][a-z-]*\s                  # management command
      | [A-Za-z_]\w*\s*\|                 # Table | ...
      | \{[A-Za-z_]\w*\}\s*\|             # {table} | ...   (template)
      | \{[A-Za-z_]\w*\}\s*\n\s*let\s      # {prelude} then let statements (template)
    )""",
    re.VERBOSE,
)


def _packages() -> list[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    return list(pyproject["tool"]["setuptools"]["packages"])


def _modules() -> Iterator[Any]:
    seen: set[str] = set()
    for package_name in _packages():
        package = importlib.import_module(package_name)
        names = [package_name] + [
            info.name
            for info in pkgutil.iter_modules(package.__path__, package_name + ".")
            if not info.ispkg
        ]
        for name in names:
            if name not in seen:
                seen.add(name)
                yield importlib.import_module(name)


def _assigned_names(module: Any) -> set[str]:
    """Names the module itself assigns at top level (so re-exports count once)."""
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError):
        return set()
    names: set[str] = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _is_template(text: str) -> bool:
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]
    except ValueError:
        return False
    return any(re.fullmatch(r"[A-Za-z_]\w*", field) for field in fields)


def kql_constants() -> dict[str, str]:
    """``module.NAME -> text`` of every module-level str constant that reads as KQL."""
    found = {}
    for module in _modules():
        for name in sorted(_assigned_names(module)):
            value = getattr(module, name, None)
            if isinstance(value, str) and KQL_START.match(value):
                found[f"{module.__name__}.{name}"] = value
    return found


CONSTANTS = kql_constants()
TEMPLATES = {name for name, text in CONSTANTS.items() if _is_template(text)}


def project_items() -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for i, command in enumerate(provision_commands()):
        head = command.split(None, 3)[:3]
        items.append(
            {"name": f"provision.kql[{i}] {' '.join(head)}", "text": command, "provision": True}
        )
    for name, text in CONSTANTS.items():
        if name not in TEMPLATES:
            items.append({"name": name, "text": text})
    renderings = [builder for name, builder in BUILDERS.items() if name in TEMPLATES]
    for builder in [*renderings, *OTHER_RENDERINGS]:
        items.extend({"name": name, "text": text} for name, text in builder())
    return items


PROJECT_ITEMS = project_items()

# ---------------------------------------------------------------------------------------
# Proof that the checker can fail: each text must be reported with the given code
# ---------------------------------------------------------------------------------------

_SELECT = select_checkpoints(thread_id="t", checkpoint_ns="").text
_POLICY = (
    ".alter table CheckpointEvents policy update "
    """@'[{"IsEnabled": true, "Source": "CheckpointEvents", "Query": "%s"}]'"""
)

MUST_FAIL: dict[str, tuple[str, str]] = {
    "misspelled column": ('CheckpointEvents | where ThreadIdd == "x"', "KS142"),
    "unknown table": ("CheckpointEvent | take 1", "KS204"),
    "misspelled column inside select_checkpoints": (
        _SELECT.replace("CheckpointNs == checkpoint_ns", "CheckpointNz == checkpoint_ns", 1),
        "KS142",
    ),
    "undeclared query parameter": (
        _SELECT.replace("thread_id:string, ", "", 1),
        "KS142",
    ),
    "syntax error": ('CheckpointEvents | where ThreadId == "x" |', "KS176"),
    "command on an unknown table": (
        ".alter table CheckpointEvent policy streamingingestion enable",
        "KS204",
    ),
    "unknown command": (".create-merge tabel CheckpointEvents (A: string)", "KS005"),
    "command the grammar does not know": (".frobnicate table CheckpointEvents", "LGK001"),
    "text after a complete command": (".show table CheckpointEvents cslschema now", "LGK002"),
    "update policy query with a misspelled column": (
        _POLICY % 'CheckpointEvents | where ThreadIdd == \\"x\\"',
        "KS142",
    ),
    "ingestion mapping naming a missing column": (
        ".create-or-alter table CheckpointEvents ingestion json mapping 'M' "
        """'[{"column":"ThreadIdd","Properties":{"Path":"$.ThreadId"}}]'""",
        "LGK021",
    ),
}

# And the extraction must not invent errors: a valid update policy passes.
MUST_PASS: dict[str, str] = {
    "valid update policy": _POLICY % 'CheckpointEvents | where ThreadId == \\"x\\"',
}

# ---------------------------------------------------------------------------------------
# One node process for everything
# ---------------------------------------------------------------------------------------


def _all_items() -> list[dict[str, Any]]:
    items = list(PROJECT_ITEMS)
    items += [{"name": f"must fail: {n}", "text": t} for n, (t, _) in MUST_FAIL.items()]
    items += [{"name": f"must pass: {n}", "text": t} for n, t in MUST_PASS.items()]
    return items


def run_checker(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Check ``items`` ({name, text, provision?}) in one node process.

    Returns the checker's output with ``results`` keyed by name, each with its text.
    Fails the calling test (not skips) when node or the npm package is missing.
    """
    if not (LIBRARY / "Kusto.Language.Bridge.min.js").is_file():
        pytest.fail(
            f"{LIBRARY.relative_to(ROOT)} is missing: run `{SETUP}` from the repository root "
            "(scripts/test does) to install the npm packages this test uses",
            pytrace=False,
        )
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH; this test needs Node.js (20+)", pytrace=False)
    names = [item["name"] for item in items]
    duplicates = {name for name in names if names.count(name) > 1}
    assert not duplicates, f"item names must be unique: {sorted(duplicates)}"
    process = subprocess.run(
        [node, str(CHECKER)],
        input=json.dumps(items),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": str(Path(node).parent), "KQL_CHECK_DATABASE": DEFAULT_DATABASE},
        timeout=120,
        check=False,
    )
    if process.returncode != 0:
        pytest.fail(f"{CHECKER.name} failed:\n{process.stderr}", pytrace=False)
    output = json.loads(process.stdout)
    texts = {item["name"]: item["text"] for item in items}
    results = {}
    for result in output["results"]:
        if result is not None:
            results[result["name"]] = {**result, "text": texts[result["name"]]}
    return {"database": output["database"], "results": results}


@pytest.fixture(scope="module")
def checked() -> dict[str, Any]:
    return run_checker(_all_items())


def _errors(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [d for d in result["diagnostics"] if d["severity"] == "Error"]


def _report(result: dict[str, Any], diagnostics: list[dict[str, Any]]) -> str:
    numbered = "\n".join(
        f"{n:4} | {line}" for n, line in enumerate(result["text"].splitlines(), start=1)
    )
    found = "\n".join(
        f"  {d['code']} ({d['severity']}, {d['source']}) at line {d['line']} column "
        f"{d['column']} [offset {d['start']}, length {d['length']}]: {d['message']}\n"
        f"      {d['excerpt']}"
        for d in diagnostics
    )
    notes = "".join(f"\n  note: {note}" for note in result["notes"])
    kind = f"{result['kind']} {result['command_kind'] or ''}".strip()
    return f"{result['name']} ({kind}):\n{found}{notes}\n{numbered}"


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------


PROJECT_NAMES = [item["name"] for item in PROJECT_ITEMS]


@pytest.mark.parametrize("name", PROJECT_NAMES, ids=PROJECT_NAMES)
def test_kql_is_valid(checked: dict[str, Any], name: str) -> None:
    result = checked["results"][name]
    errors = _errors(result)
    assert not errors, "Kusto.Language reports errors in " + _report(result, errors)


@pytest.mark.parametrize("name", sorted(MUST_FAIL))
def test_checker_reports_broken_kql(checked: dict[str, Any], name: str) -> None:
    code = MUST_FAIL[name][1]
    result = checked["results"][f"must fail: {name}"]
    codes = [d["code"] for d in _errors(result)]
    assert code in codes, f"expected {code}, got {codes}: " + _report(result, result["diagnostics"])


@pytest.mark.parametrize("name", sorted(MUST_PASS))
def test_checker_accepts_valid_kql(checked: dict[str, Any], name: str) -> None:
    result = checked["results"][f"must pass: {name}"]
    assert not _errors(result), _report(result, result["diagnostics"])


def test_checker_sees_the_provisioned_schema(checked: dict[str, Any]) -> None:
    """The checks above run against provision.kql's table, with the row model's columns."""
    declared = checked["database"]["tables"].get(TABLE)
    assert declared is not None, f"provision.kql declares no table {TABLE}: {checked['database']}"
    for column, kind in COLUMNS:
        assert f"{column}:{kind}" in declared, f"{column}:{kind} not in {declared}"


def test_every_kql_template_has_a_builder() -> None:
    missing = sorted(TEMPLATES - BUILDERS.keys())
    assert not missing, (
        f"KQL templates without representative renderings: {missing}. Add each to BUILDERS "
        "in tests/test_kql_validity.py with a function yielding (name, text) pairs that "
        "cover every argument combination that changes the text."
    )


def test_known_queries_are_collected() -> None:
    """Guards the generic collection: these must be among the checked texts."""
    names = {item["name"] for item in PROJECT_ITEMS}
    for expected in (
        "langgraph.checkpoint.kusto.ingestor_worker.demo.THREAD_HISTORY",
        "langgraph.checkpoint.kusto.schema.SHOW_SCHEMA",
    ):
        assert expected in names
    assert set(BUILDERS) <= TEMPLATES, f"stale BUILDERS entries: {set(BUILDERS) - TEMPLATES}"
    assert any(item.get("provision") for item in PROJECT_ITEMS)
