"""The docs cannot drift from the code: every command they show is run or checked.

What is collected from README.md and docs/*.md:

* **Shell blocks** (```bash, ```sh, ```shell). Each command (``\\`` continuations joined,
  ``#`` comments dropped) is one of:

  - a ``langgraph-kusto`` command: **run**, as a user following the page would. Each page
    gets a session: a fresh working directory whose default queue
    (``.langgraph-kusto/outbox.db``) holds four dead letters (``SEEDED``), and an
    environment without ``LANGGRAPH_KUSTO_*`` settings, so the local defaults apply.
    Commands run in page order and must exit 0 without a traceback. Long-running ones
    (``local up``, ``local-kusto``, ``worker``) are started, waited for until they say they
    are ready, and stopped with SIGINT at the end of their block, which must end them with
    exit code 0. Two settings are not the defaults, so that a session needs no fixed port
    free on the test machine: ``LANGGRAPH_KUSTO_CLUSTER`` names a free loopback port (the
    local server listens there, and every command and app looks there), and
    ``LANGGRAPH_KUSTO_HEALTH_PORT=0`` turns the worker's health endpoint off. The defaults
    themselves are what ``tests/test_local_up.py`` runs, and the health endpoint is tested
    in ``tests/test_worker_faults.py``;
  - a script CI runs already (``CI_RUNS``, with the proof checked here);
  - an environment variable assignment: the variable must be one the code reads;
  - a command that cannot run here (``NOT_RUN``: Azure CLI, Docker), each with its reason;
    what can be checked offline is: the repository paths it names exist, and the
    ``--parameters`` it passes to a Bicep template are declared in that template.

  Anything else fails: add it to one of the lists, with the reason.
* **Inline commands** (`` `langgraph-kusto ...` `` in prose): parsed by the CLI's own
  argument parser, so a renamed command or flag fails (``INLINE_NOT_PARSED`` lists the
  exceptions, with reasons).
* **KQL blocks** (```kql, ```kusto), split into statements at blank lines (as in
  provision.kql, a statement never contains one): every statement is checked by the
  machinery of ``tests/test_kql_validity.py`` (Microsoft's Kusto.Language, against the
  schema provision.kql declares); ``.purge`` is not in Kusto.Language's grammar, so its
  predicate is checked as a query on the table instead. Every query (not a ``.command``)
  also runs on the local Kusto server over the demo's threads, except those in
  ``LOCAL_SERVER_CANNOT_RUN``, each with its reason.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from azure.identity._constants import EnvironmentVariables
from langgraph.checkpoint.kusto.ingestor_worker import cli
from langgraph.checkpoint.kusto.ingestor_worker.demo import run_demo
from langgraph.checkpoint.kusto.ingestor_worker.local_stack import READY
from langgraph.checkpoint.kusto.ingestor_worker.service import HEALTH_PORT_ENV
from langgraph.checkpoint.kusto.kusto import KustoQueries
from langgraph.checkpoint.kusto.local.kusto_server import LocalKustoServer
from langgraph.checkpoint.kusto.outbox import OutboxMessage
from langgraph.checkpoint.kusto.outbox.sqlite import SqliteQueue
from langgraph.checkpoint.kusto.queries import Query
from langgraph.checkpoint.kusto.settings import CLUSTER_ENV, DEFAULT_DATABASE, DEFAULT_QUEUE
from langgraph.checkpoint.kusto.shared.envelope import Blob, Event, EventKind, encode_event
from langgraph.checkpoint.kusto.shared.framing import encode_frame, split_frames
from test_kql_validity import PROJECT_ITEMS, _errors, _report, run_checker

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell"}
KQL = {"kql", "kusto"}
COMMAND_TIMEOUT = 120.0
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 45.0

# --- what is not run, and why ----------------------------------------------------------------

CI_RUNS = {
    "./scripts/test": "CI runs it: .ci/run execs ./scripts/test (checked below)",
    "./scripts/demo": "it installs the package, then execs `langgraph-kusto demo`, which "
    "tests/test_cli.py runs (both checked below)",
}

AZURE = "needs an Azure subscription and a signed-in Azure CLI"
NOT_RUN = {
    ("az", "acr", "build"): f"{AZURE} with a container registry; the Dockerfile is checked "
    "by checkov in tests/test_infra.py",
    ("az", "group", "create"): AZURE,
    ("az", "deployment", "group", "what-if"): f"{AZURE}; the Bicep is parsed and checked "
    "by checkov in tests/test_infra.py",
    ("az", "deployment", "group", "create"): f"{AZURE}; the Bicep is parsed and checked by "
    "checkov in tests/test_infra.py",
    ("az", "deployment", "group", "show"): f"{AZURE} and a finished deployment",
    ("az", "containerapp", "logs", "show"): f"{AZURE} and a deployed worker",
    ("az", "group", "delete"): AZURE,
    ("docker", "build"): "needs a Docker engine; the Dockerfile is checked by checkov in "
    "tests/test_infra.py",
    ("docker", "push"): "needs a Docker engine and a registry",
}

INLINE_NOT_PARSED = {
    "langgraph-kusto provision --retention … --hot-cache …": "docs/kusto.md names this "
    "option to say that it does not exist yet",
}

LOCAL_SERVER_CANNOT_RUN = {
    "ingestion_time()": "the local server keeps no ingestion time (duckdb-kql has no "
    "ingestion_time()); the query is checked by Kusto.Language only",
}

# --- the session's starting point ------------------------------------------------------------

SEEDED = [
    # (thread, event kind or None for random bytes, dead-letter reason)
    ("u-42:support", EventKind.PUT, "MaxDeliveryCountExceeded"),
    ("u-42:support", EventKind.PUT_WRITES, "MaxDeliveryCountExceeded"),
    ("u-7:billing", EventKind.PUT, "IngestionRejected"),
    ("unknown", None, "MalformedEnvelope"),
]
"""Dead letters with sequence numbers 1 to 4 in each session's default queue."""

LONG_RUNNING: dict[tuple[str, ...], tuple[str, str]] = {
    ("local", "up"): ("stdout", re.escape(READY)),
    ("local-kusto",): ("stdout", r"^http://127\.0\.0\.1:\d+$"),
    ("worker",): ("stderr", r'"message": "worker started"'),
}
"""Subcommand -> (stream, pattern of the line that says it is ready)."""

# --- collecting ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Block:
    page: Path
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


@dataclass(frozen=True, slots=True)
class Command:
    block: Block
    line: int
    argv: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.block.page.relative_to(ROOT)}:{self.line}"

    @property
    def text(self) -> str:
        return shlex.join(self.argv)


FENCE = re.compile(r"^```(\S*)\s*$")


def blocks(page: Path) -> list[Block]:
    found: list[Block] = []
    lang: str | None = None
    start = 0
    lines: list[str] = []
    for number, line in enumerate(page.read_text("utf-8").splitlines(), start=1):
        fence = FENCE.match(line.strip())
        if lang is None and fence:
            lang, start, lines = fence.group(1).lower(), number, []
        elif lang is not None and line.strip() == "```":
            found.append(Block(page, start, lang, "\n".join(lines)))
            lang = None
        elif lang is not None:
            lines.append(line)
    return found


def commands(block: Block) -> list[Command]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    found: list[Command] = []
    pending = ""
    first = 0
    for offset, raw in enumerate(block.text.splitlines(), start=1):
        if not pending:
            first = block.line + offset
        pending += raw.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        argv = tuple(shlex.split(pending, comments=True))
        pending = ""
        if argv:
            found.append(Command(block, first, argv))
    return found


ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]
ALL_COMMANDS = [c for b in ALL_BLOCKS if b.lang in SHELL for c in commands(b)]


def _not_run_reason(command: Command) -> str | None:
    for prefix, reason in NOT_RUN.items():
        if command.argv[: len(prefix)] == prefix:
            return reason
    return None


def _is_assignment(command: Command) -> bool:
    words = command.argv[1:] if command.argv[0] == "export" else command.argv
    return len(words) == 1 and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]) is not None


def _kind(command: Command) -> str:
    if command.argv[0] == "langgraph-kusto":
        return "run"
    if command.argv[0] in CI_RUNS:
        return "ci"
    if _is_assignment(command):
        return "env"
    if _not_run_reason(command) is not None:
        return "not run"
    return "unknown"


# --- shell commands: accounted for -----------------------------------------------------------


def test_every_shell_command_in_the_docs_is_run_or_explained() -> None:
    unknown = [f"{c.where}: {c.text}" for c in ALL_COMMANDS if _kind(c) == "unknown"]
    assert not unknown, (
        "commands in the docs that are neither run by tests/test_docs.py nor listed with a "
        "reason in CI_RUNS / NOT_RUN there:\n" + "\n".join(unknown)
    )
    kinds = {_kind(c) for c in ALL_COMMANDS}
    assert "run" in kinds, "no langgraph-kusto command found: is the extraction broken?"


def test_not_run_list_has_no_stale_entries() -> None:
    used = {prefix for c in ALL_COMMANDS for prefix in NOT_RUN if c.argv[: len(prefix)] == prefix}
    assert used == set(NOT_RUN), f"not in any doc any more: {set(NOT_RUN) - used}"


NOT_RUN_COMMANDS = [c for c in ALL_COMMANDS if _kind(c) == "not run"]


@pytest.mark.parametrize(
    "command", NOT_RUN_COMMANDS, ids=[f"{c.where} {' '.join(c.argv[:4])}" for c in NOT_RUN_COMMANDS]
)
def test_commands_that_cannot_run_here_name_what_exists(command: Command) -> None:
    """Not run, for the reason ``NOT_RUN`` gives; checked offline instead: the repository
    files it names exist, and every ``--parameters name=value`` is a parameter of the
    template it deploys."""
    assert _not_run_reason(command)
    argv = list(command.argv)
    for word in argv:
        if re.match(r"^(infra|scripts|docs|tests)/", word):
            assert (ROOT / word).exists(), f"{command.where}: {word} does not exist"
    if "--template-file" in argv:
        template = (ROOT / argv[argv.index("--template-file") + 1]).read_text("utf-8")
        declared = set(re.findall(r"^param\s+(\w+)", template, re.MULTILINE))
        start = argv.index("--parameters") + 1 if "--parameters" in argv else len(argv)
        for word in argv[start:]:
            if word.startswith("--"):
                break
            name = word.split("=", 1)[0]
            assert name in declared, f"{command.where}: the template has no parameter {name}"


def test_scripts_shown_in_the_readme_are_run_by_ci() -> None:
    ci = (ROOT / ".ci" / "run").read_text("utf-8")
    assert re.search(r"^exec \./scripts/test\b", ci, re.MULTILINE), ".ci/run no longer runs it"
    demo = (ROOT / "scripts" / "demo").read_text("utf-8").strip().splitlines()
    assert demo[-1].startswith("exec .venv/bin/langgraph-kusto demo"), "scripts/demo changed"
    assert '"demo"' in (ROOT / "tests" / "test_cli.py").read_text("utf-8")
    shown = {c.argv[0] for c in ALL_COMMANDS if _kind(c) == "ci"}
    assert shown == set(CI_RUNS), f"CI_RUNS lists scripts no doc shows: {set(CI_RUNS) - shown}"


def _variables_the_code_reads() -> set[str]:
    sources = [
        p
        for folder in ("saver", "ingestor_worker", "shared", "local")
        for p in (ROOT / folder).rglob("*.py")
    ]
    text = "\n".join(p.read_text("utf-8") for p in sources)
    ours = set(re.findall(r'"((?:LANGGRAPH_KUSTO|OTEL)_[A-Z0-9_]+)"', text))
    # DefaultAzureCredential reads these (AZURE_CLIENT_ID picks a managed identity).
    azure = {v for k, v in vars(EnvironmentVariables).items() if k.isupper() and isinstance(v, str)}
    return ours | azure


def test_environment_variables_in_the_docs_are_read_by_the_code() -> None:
    known = _variables_the_code_reads()
    assert {"LANGGRAPH_KUSTO_QUEUE", "AZURE_CLIENT_ID"} <= known
    unknown = []
    for command in ALL_COMMANDS:
        if _kind(command) == "env":
            name = command.argv[-1].split("=", 1)[0]
            if name not in known:
                unknown.append(f"{command.where}: {name}")
    assert not unknown, "variables nothing reads:\n" + "\n".join(unknown)


# --- inline commands -------------------------------------------------------------------------

INLINE = re.compile(r"`(langgraph-kusto(?: [^`]*)?)`")


def _inline_commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = page.read_text("utf-8")
        # Fenced blocks are checked above; only prose here.
        prose = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
        for match in INLINE.finditer(prose):
            line = text[: text.find(match.group(0))].count("\n") + 1
            found.append((f"{page.relative_to(ROOT)}:{line}", match.group(1)))
    return found


INLINE_COMMANDS = _inline_commands()


@pytest.mark.parametrize(("where", "text"), INLINE_COMMANDS, ids=[w for w, _ in INLINE_COMMANDS])
def test_inline_commands_parse(where: str, text: str, capsys: pytest.CaptureFixture[str]) -> None:
    if text in INLINE_NOT_PARSED:
        pytest.skip(f"not parsed, on purpose: {INLINE_NOT_PARSED[text]}")
    parser = cli._parser()
    try:
        parser.parse_args(shlex.split(text)[1:])
    except SystemExit as exc:
        err = capsys.readouterr().err
        # Naming a command group (`langgraph-kusto dlq`) is a reference, not a command line.
        assert exc.code == 0 or "the following arguments are required" in err, (
            f"{where}: `{text}` does not parse: {err.strip()}"
        )


def test_inline_exceptions_are_used() -> None:
    shown = {text for _, text in INLINE_COMMANDS}
    assert set(INLINE_NOT_PARSED) <= shown, f"stale: {set(INLINE_NOT_PARSED) - shown}"


# --- running the langgraph-kusto commands ----------------------------------------------------


def _seed_dead_letters(queue_path: Path) -> None:
    queue = SqliteQueue(queue_path)
    try:
        messages = []
        for n, (thread, kind, _) in enumerate(SEEDED, start=1):
            if kind is None:
                messages.append(OutboxMessage(os.urandom(32), f"seed-{n}", thread, {}))
                continue
            event = Event(
                kind,
                uuid.uuid4().hex,
                time.time_ns(),
                time.time(),
                thread,
                checkpoint_id=f"checkpoint-{n}",
                blobs=(Blob("messages", "1", "msgpack", b"\x90"),),
            )
            [frame] = split_frames(event.event_id, encode_event(event), 1 << 20)
            messages.append(
                OutboxMessage(encode_frame(frame), frame.message_id, thread, {"kind": kind.value})
            )
        queue.send(messages)
        received = sorted(queue.receive(len(messages), 5), key=lambda m: m.sequence_number)
        assert len(received) == len(messages)
        for message, (_, _, reason) in zip(received, SEEDED, strict=True):
            queue.dead_letter(message, reason, f"seeded by tests/test_docs.py: {reason}")
    finally:
        queue.close()


def _session_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANGGRAPH_KUSTO_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env[HEALTH_PORT_ENV] = "0"
    env[CLUSTER_ENV] = f"http://127.0.0.1:{_free_port()}"
    return env


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class _Background:
    command: Command
    process: subprocess.Popen[str]
    lines: dict[str, list[str]] = field(default_factory=lambda: {"stdout": [], "stderr": []})
    readers: list[threading.Thread] = field(default_factory=list)

    def read(self) -> None:
        for name in ("stdout", "stderr"):
            stream = getattr(self.process, name)
            reader = threading.Thread(target=self._pump, args=(stream, name), daemon=True)
            reader.start()
            self.readers.append(reader)

    def _pump(self, stream: Any, name: str) -> None:
        for line in stream:
            self.lines[name].append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines["stdout"] + self.lines["stderr"])


def _long_running(command: Command) -> tuple[str, str] | None:
    for words, ready in LONG_RUNNING.items():
        if command.argv[1 : 1 + len(words)] == words:
            return ready
    return None


def _start(command: Command, cwd: Path, env: dict[str, str]) -> _Background:
    stream, pattern = _long_running(command) or ("", "")
    process = subprocess.Popen(
        list(command.argv),
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    running = _Background(command, process)
    running.read()
    deadline = time.monotonic() + READY_TIMEOUT
    while not any(re.search(pattern, line) for line in running.lines[stream]):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"{command.where}: `{command.text}` did not get ready:\n{running.output()}")
        time.sleep(0.05)
    return running


def _stop(running: _Background) -> None:
    command = running.command
    running.process.send_signal(signal.SIGINT)
    try:
        code = running.process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        running.process.kill()
        running.process.wait()
        pytest.fail(f"{command.where}: `{command.text}` did not stop on SIGINT")
    for reader in running.readers:
        reader.join(timeout=5)
    assert code == 0, f"{command.where}: `{command.text}` exited {code}:\n{running.output()}"
    assert "Traceback" not in running.output(), f"{command.where}:\n{running.output()}"


def _run(command: Command, cwd: Path, env: dict[str, str]) -> None:
    result = subprocess.run(
        list(command.argv),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{command.where}: `{command.text}` failed:\n{output}"
    assert "Traceback" not in output, f"{command.where}: `{command.text}`:\n{output}"


PAGES_WITH_RUNS = [
    page for page in PAGES if any(c.block.page == page and _kind(c) == "run" for c in ALL_COMMANDS)
]


@pytest.mark.parametrize("page", PAGES_WITH_RUNS, ids=[p.name for p in PAGES_WITH_RUNS])
def test_langgraph_kusto_commands_of_a_page_run(page: Path, tmp_path: Path) -> None:
    env = _session_env()
    assert shutil.which("langgraph-kusto", path=env["PATH"]), "langgraph-kusto is not installed"
    cwd = tmp_path / "session"
    cwd.mkdir()
    _seed_dead_letters(cwd / DEFAULT_QUEUE.removeprefix("sqlite:///"))
    for block in (b for b in ALL_BLOCKS if b.page == page and b.lang in SHELL):
        started: list[_Background] = []
        try:
            for command in commands(block):
                if _kind(command) != "run":
                    continue
                if _long_running(command):
                    started.append(_start(command, cwd, env))
                else:
                    _run(command, cwd, env)
        finally:
            for running in reversed(started):
                _stop(running)


# --- KQL -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Statement:
    block: Block
    index: int
    text: str

    @property
    def name(self) -> str:
        return f"{self.block.where}#{self.index}"

    @property
    def is_command(self) -> bool:
        code = [ln for ln in self.text.splitlines() if not ln.lstrip().startswith("//")]
        return "\n".join(code).lstrip().startswith(".")


def _statements() -> list[Statement]:
    found = []
    for block in ALL_BLOCKS:
        if block.lang not in KQL:
            continue
        chunks = re.split(r"\n\s*\n", block.text)
        for index, chunk in enumerate(chunks):
            code = [ln for ln in chunk.splitlines() if not ln.lstrip().startswith("//")]
            if any(ln.strip() for ln in code):
                found.append(Statement(block, index, chunk.strip()))
    return found


STATEMENTS = _statements()
PURGE = re.compile(
    r"^\.purge\s+(?:table|materialized-view)\s+(\w+)\s+records\s+in\s+database\s+\w+"
    r"(?:\s+with\s*\([^)]*\))?\s*<\|(.*)$",
    re.DOTALL,
)


def _checked_text(statement: Statement) -> str:
    """What Kusto.Language checks: the statement, or for ``.purge`` (not in its grammar) the
    purge predicate as a query over the purged table."""
    purge = PURGE.match(statement.text)
    if purge is None:
        return statement.text
    return f"{purge.group(1)}\n| {purge.group(2).strip()}"


@pytest.fixture(scope="module")
def kql_checked() -> dict[str, Any]:
    items = [item for item in PROJECT_ITEMS if item.get("provision")]
    items += [{"name": s.name, "text": _checked_text(s)} for s in STATEMENTS]
    results: dict[str, Any] = run_checker(items)["results"]
    return results


@pytest.mark.parametrize("statement", STATEMENTS, ids=[s.name for s in STATEMENTS])
def test_kql_in_the_docs_is_valid(statement: Statement, kql_checked: dict[str, Any]) -> None:
    result = kql_checked[statement.name]
    errors = _errors(result)
    assert not errors, "Kusto.Language reports errors in " + _report(result, errors)


def test_the_docs_have_kql_and_purge_is_understood() -> None:
    assert len(STATEMENTS) > 10
    purges = [s for s in STATEMENTS if s.text.startswith(".purge")]
    assert purges and all(PURGE.match(s.text) for s in purges), "a .purge the check cannot read"


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The local Kusto server over the demo's threads (the tour run once)."""
    data = tmp_path_factory.mktemp("demo")
    run_demo(data, io.StringIO())
    server = LocalKustoServer(data / "kusto", 0, DEFAULT_DATABASE).start()
    yield server.url
    server.close()


QUERIES = [s for s in STATEMENTS if not s.is_command]


def _cannot_run_locally(statement: Statement) -> str | None:
    return next(
        (why for key, why in LOCAL_SERVER_CANNOT_RUN.items() if key in statement.text), None
    )


@pytest.mark.parametrize("statement", QUERIES, ids=[s.name for s in QUERIES])
def test_kql_queries_in_the_docs_run_on_the_local_server(
    statement: Statement, demo_server: str
) -> None:
    why = _cannot_run_locally(statement)
    if why is not None:
        pytest.skip(f"not run on the local server, on purpose: {why}")
    queries = KustoQueries(demo_server, DEFAULT_DATABASE)
    try:
        queries.run(Query(statement.text, {}))
    finally:
        queries.close()


def test_local_server_exceptions_are_used() -> None:
    used = {key for s in QUERIES for key in LOCAL_SERVER_CANNOT_RUN if key in s.text}
    assert used == set(LOCAL_SERVER_CANNOT_RUN), f"stale: {set(LOCAL_SERVER_CANNOT_RUN) - used}"
