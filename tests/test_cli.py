"""The command line as a user meets it: the demo's tour, and clear errors for mistakes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

CLI = [sys.executable, "-m", "langgraph.checkpoint.kusto.ingestor_worker.cli"]


def _section(lines: list[str], title: str) -> list[str]:
    """The lines under a heading of the tour, up to the next blank line."""
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def _rows(lines: list[str]) -> list[dict[str, str]]:
    header, *rows = lines
    return [dict(zip(header.split(), row.split(), strict=True)) for row in rows]


def test_demo_is_a_tour_of_the_whole_pipeline(tmp_path: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [*CLI, "demo", "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    assert time.monotonic() - started < 60, "the demo should stay well under a minute"
    out = result.stdout
    lines = out.splitlines()

    # An agent with tool calls and an approval interrupt, resumed with Command(resume=...).
    assert "    model:     calls weather(city='Seattle')" in lines
    assert "    tool:      weather -> Seattle: rain, 9°C" in lines
    assert "    interrupt: approval asked for book_table(restaurant='Canlis', party=2)" in lines
    assert "    resumed with Command(resume='approve')" in lines
    assert "    tool:      book_table -> not done: the user answered 'reject'" in lines

    # The thread's history, read back from Kusto with KQL.
    history = _rows(_section(lines, "3. History of thread 'demo-thread'"))
    assert [r["Source"] for r in history] == ["input"] + ["loop"] * 8
    assert [int(r["Step"]) for r in history] == list(range(-1, 8))
    assert [r["Next"] for r in history] == ["__start__"] + ["model", "tools"] * 3 + ["model", "-"]
    assert "reads the state from Kusto: 8 messages" in out

    # Analytics over all demo threads: steps, tool calls and interrupts per thread.
    runs = {r["ThreadId"]: r for r in _rows(_section(lines, "4. Analytics"))}
    assert {t: (r["ToolCalls"], r["Interrupts"]) for t, r in runs.items()} == {
        "demo-thread": ("3", "1"),
        "demo-thread-declined": ("1", "1"),
        "demo-thread-umbrella": ("1", "0"),
    }

    # A poison message is dead-lettered, shown and purged; the events a misconfiguration
    # kept from Kusto are held by the worker, not dead-lettered, and land after the fix.
    listed = _rows([line.strip() for line in _section(lines, "  $ langgraph-kusto dlq list")])
    assert [(r["REASON"], r["THREAD"]) for r in listed] == [("MalformedEnvelope", "demo-poison")]
    assert "BadRequest_MappingReferenceWasNotFound" in out
    assert "it keeps them and retries for as long as Kusto refuses" in out
    assert "nothing more is dead-lettered" in out
    assert "purged 1 dead letter(s)" in out
    assert lines[lines.index("  analytics again, the late thread included:") - 2] == (
        f"    no dead letters in sqlite:///{tmp_path.resolve()}/outbox.db"
    )
    after = {r["ThreadId"]: r for r in _rows(_section(lines, "  analytics again"))}
    assert set(after) == set(runs) | {"demo-thread-late"}
    checkpoints = after["demo-thread-late"]["Checkpoints"]
    assert f"thread 'demo-thread-late' is in Kusto now: {checkpoints} checkpoints" in out

    assert "Traceback" not in result.stderr
    assert "Canlis" not in result.stderr, "user data in the logs"


def test_demo_refuses_a_data_directory_that_holds_an_earlier_demo(tmp_path: Path) -> None:
    (tmp_path / "outbox.db").write_bytes(b"")
    result = subprocess.run(
        [*CLI, "demo", "--data", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "holds an earlier demo's data" in result.stderr
    assert result.stderr.count("\n") == 1


def test_bad_cluster_url_is_a_usage_error_not_a_traceback() -> None:
    result = subprocess.run(
        [*CLI, "provision", "--cluster", "ftp://example"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "is not a URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_cluster_says_what_to_check() -> None:
    result = subprocess.run(
        [*CLI, "provision", "--cluster", "http://127.0.0.1:9"], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "cannot reach Kusto" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_queue_url_is_a_usage_error() -> None:
    result = subprocess.run(
        [*CLI, "worker", "--queue", "redis://nope", "--cluster", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "queue URL" in result.stderr
    assert "Traceback" not in result.stderr


def _one_line_error(argv: list[str], cwd: Path | None = None, **env: str) -> tuple[int, str]:
    """Exit code and stderr of a command that must fail at once with a one-line message."""
    result = subprocess.run(
        [*CLI, *argv],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    return result.returncode, result.stderr


def test_a_queue_path_that_cannot_be_a_queue_file_stops_the_worker_with_one_line(
    tmp_path: Path,
) -> None:
    worker = ["worker", "--cluster", "http://127.0.0.1:9", "--health-port", "0", "--queue"]
    missing_root = Path("/proc/no-such-dir/q.db")

    assert _one_line_error([*worker, f"sqlite:///{tmp_path}"]) == (
        1,
        f"langgraph-kusto worker: cannot open the queue file {tmp_path}: it is a directory\n",
    )
    assert _one_line_error([*worker, f"sqlite:///{missing_root}"]) == (
        1,
        f"langgraph-kusto worker: cannot create the directory {missing_root.parent} for the "
        f"queue file {missing_root}: No such file or directory\n",
    )


def test_a_sqlite_url_without_three_slashes_is_refused(tmp_path: Path) -> None:
    worker = ["worker", "--cluster", "http://127.0.0.1:9", "--health-port", "0"]

    code, err = _one_line_error([*worker, "--queue", "sqlite:rel.db"], cwd=tmp_path)

    assert code == 2
    assert err.startswith("langgraph-kusto worker: Not a SQLite queue URL: 'sqlite:rel.db'")
    assert list(tmp_path.iterdir()) == []


def test_non_finite_worker_numbers_are_refused(tmp_path: Path) -> None:
    worker = ["worker", "--cluster", "http://127.0.0.1:9", "--health-port", "0"]
    worker += ["--queue", f"sqlite:///{tmp_path}/q.db"]

    assert _one_line_error([*worker, "--max-wait", "nan"]) == (
        2,
        "langgraph-kusto worker: --max-wait must be a finite number, got nan\n",
    )
    assert _one_line_error([*worker, "--retry-budget", "inf"]) == (
        2,
        "langgraph-kusto worker: --retry-budget must be a finite number, got inf\n",
    )
    assert _one_line_error(worker, LANGGRAPH_KUSTO_MAX_BATCH_DELAY="NaN") == (
        2,
        "langgraph-kusto worker: $LANGGRAPH_KUSTO_MAX_BATCH_DELAY must be a finite number, "
        "got nan\n",
    )


def test_a_bad_local_database_name_is_a_one_line_error(tmp_path: Path) -> None:
    local_kusto = ["local-kusto", "--port", "0", "--data", str(tmp_path / "kusto")]
    message = (
        "langgraph-kusto: database name {!r}: use letters, digits, '_', '-' or '.' "
        "(it is also the DuckDB file name)\n"
    )

    assert _one_line_error([*local_kusto, "--database", "bad name!"]) == (
        2,
        message.format("bad name!"),
    )
    assert _one_line_error(local_kusto, LANGGRAPH_KUSTO_DATABASE="bad name") == (
        2,
        message.format("bad name"),
    )


def test_a_cluster_url_with_an_unusable_port_is_a_one_line_error(tmp_path: Path) -> None:
    cluster = "http://127.0.0.1:99999"
    message = f"cluster {cluster!r} has an unusable port: Port out of range 0-65535"
    worker = ["worker", "--health-port", "0", "--queue", f"sqlite:///{tmp_path}/q.db"]

    # local-kusto takes its default port from the cluster URL.
    assert _one_line_error(
        ["local-kusto", "--data", str(tmp_path)], LANGGRAPH_KUSTO_CLUSTER=cluster
    ) == (
        2,
        f"langgraph-kusto: {message} ($LANGGRAPH_KUSTO_CLUSTER, which --port overrides)\n",
    )
    # Refused at once, not retried for ever as an unreachable Kusto.
    assert _one_line_error(worker, LANGGRAPH_KUSTO_CLUSTER=cluster) == (
        2,
        f"langgraph-kusto worker: {message}\n",
    )


def test_an_unusable_local_duckdb_file_is_a_one_line_error(tmp_path: Path) -> None:
    data = tmp_path / "locked"  # not to be taken for a lock another server holds
    data.mkdir()
    database = data / "langgraph.duckdb"
    database.write_bytes(b"truncated")

    code, err = _one_line_error(["local-kusto", "--port", "0", "--data", str(data)])

    assert code == 2
    assert err.startswith(f"langgraph-kusto: cannot open {database} as a DuckDB database (")
    assert database.read_bytes() == b"truncated"


def test_demo_data_with_url_characters_in_its_path_keeps_everything_there(tmp_path: Path) -> None:
    """The queue URL quotes the path: '#' would end it, '%41' would name another directory."""
    data = tmp_path / "run#1 %41"

    result = subprocess.run(
        [*CLI, "demo", "--data", str(data)], capture_output=True, text=True, timeout=180
    )

    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == [data]
    assert sorted(p.name for p in data.iterdir()) == ["kusto", "outbox.db", "outbox.db-spool"]
    assert f"no dead letters in sqlite:///{quote(str(data.resolve()))}/outbox.db" in result.stdout


def test_demo_data_that_cannot_be_a_directory_is_a_one_line_error(tmp_path: Path) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hello\n")

    assert _one_line_error(["demo", "--data", str(a_file)]) == (
        2,
        f"langgraph-kusto: cannot keep the demo's data in {a_file}: "
        f"[Errno 17] File exists: '{a_file}'\n",
    )
    code, err = _one_line_error(["demo", "--data", str(a_file / "demo")])
    assert code == 2
    assert err.startswith(f"langgraph-kusto: cannot keep the demo's data in {a_file / 'demo'}: ")


def test_a_subcommand_mistake_points_at_the_subcommand_help() -> None:
    assert _one_line_error(["provision", "--queue", "x"]) == (
        2,
        "langgraph-kusto provision: unrecognized arguments: --queue x "
        "(see `langgraph-kusto provision --help`)\n",
    )


class _NotKusto(BaseHTTPRequestHandler):
    """A web server that is not Kusto: an HTML error page for every POST."""

    def do_POST(self) -> None:  # BaseHTTPRequestHandler's interface
        self.send_error(501, "Unsupported method ('POST')")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the test's output clean


def test_a_cluster_that_is_not_kusto_is_summed_up_in_one_line() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotKusto)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cluster = f"http://127.0.0.1:{server.server_address[1]}"
        code, err = _one_line_error(["provision", "--cluster", cluster])
    finally:
        server.shutdown()
        server.server_close()

    assert code == 1
    assert err.startswith("langgraph-kusto: Kusto refused the request: HTTP 501: <!DOCTYPE HTML>")
    assert err.endswith(
        "(an HTML page of 13 lines, not a Kusto answer: does the cluster URL name a Kusto "
        "cluster?)\n"
    )
