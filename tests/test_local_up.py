"""``langgraph-kusto local up``: the local stack in one foreground command.

An app started afterwards in a separate process, from the same directory, with no settings
at all (``AsyncKustoSaver.from_conn_string()``), gets its checkpoints queryable in Kusto;
SIGINT (Ctrl-C) or SIGTERM then stops the stack with exit code 0 and leaves no process,
port or database lock behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from langgraph.checkpoint.kusto import KustoSaver
from langgraph.checkpoint.kusto.ingestor_worker.local_stack import READY
from langgraph.checkpoint.kusto.kusto import KustoQueries
from langgraph.checkpoint.kusto.local.kusto_server import LocalKustoServer
from langgraph.checkpoint.kusto.queries import Query
from langgraph.checkpoint.kusto.settings import (
    DEFAULT_CLUSTER,
    DEFAULT_DATABASE,
    DEFAULT_LOCAL_PORT,
    LOCAL_DIR,
)

CLI = [sys.executable, "-m", "langgraph.checkpoint.kusto.ingestor_worker.cli"]
START_TIMEOUT = 60.0

# The app: a two-step graph through AsyncKustoSaver.from_conn_string() with no arguments,
# then a second saver without a cache (eventual) polls Kusto until it sees every checkpoint.
APP = """
import asyncio, json, time
from typing import TypedDict
from langgraph.checkpoint.kusto import AsyncKustoSaver
from langgraph.graph import END, START, StateGraph

class State(TypedDict):
    n: int

def double(state: State) -> State:
    return {"n": state["n"] * 2}

async def main() -> None:
    config = {"configurable": {"thread_id": "app-thread"}}
    graph = StateGraph(State)
    graph.add_node("double", double)
    graph.add_edge(START, "double")
    graph.add_edge("double", END)
    async with AsyncKustoSaver.from_conn_string() as saver:
        result = await graph.compile(checkpointer=saver).ainvoke({"n": 21}, config)
        written = [t.checkpoint["id"] async for t in saver.alist(config)]
    deadline = time.monotonic() + 30
    async with AsyncKustoSaver.from_conn_string(consistency="eventual") as reader:
        while True:
            seen = [t.checkpoint["id"] async for t in reader.alist(config)]
            if sorted(seen) == sorted(written) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        latest = await reader.aget_tuple(config)
    print(json.dumps({"result": result["n"], "written": written, "seen": seen,
                      "latest": latest.checkpoint["channel_values"] if latest else None}))

asyncio.run(main())
"""

COUNT_ROWS = """\
declare query_parameters(thread_id:string);
CheckpointEvents
| where ThreadId == thread_id and RowKind == "checkpoint"
| summarize Checkpoints = dcount(CheckpointId)"""


def _clean_env() -> dict[str, str]:
    """This environment without the saver's settings: an app then uses the defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LANGGRAPH_KUSTO_")}


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces; the parent pid follows its ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _processes_in(directory: Path) -> list[int]:
    """Processes whose working directory is ``directory`` or below it."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if cwd == str(directory) or cwd.startswith(f"{directory}/"):
                found.append(int(entry.name))
    return found


class Stack:
    """A running ``local up`` and the lines it printed."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.process = subprocess.Popen(
            [*CLI, "local", "up", *args],
            cwd=cwd,
            env=_clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        assert self.process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        while READY not in self.lines:
            line = self.process.stdout.readline()
            assert line, f"local up exited early:\n{self._stderr()}"
            assert time.monotonic() < deadline, "local up did not get ready"
            self.lines.append(line.rstrip("\n"))

    def stop(self, signum: int) -> tuple[int, str, str]:
        self.process.send_signal(signum)
        out, err = self.process.communicate(timeout=60)
        self.lines += out.splitlines()
        return self.process.returncode, "\n".join(self.lines), err

    def _stderr(self) -> str:
        self.process.kill()
        return self.process.communicate()[1]


@pytest.fixture
def stacks() -> Iterator[list[Stack]]:
    started: list[Stack] = []
    yield started
    for stack in started:
        if stack.process.poll() is None:
            stack.process.kill()
            stack.process.wait(timeout=10)


def test_local_up_serves_an_app_with_default_settings_and_ctrl_c_leaves_nothing(
    tmp_path: Path, stacks: list[Stack]
) -> None:
    if not _port_free(DEFAULT_LOCAL_PORT):
        pytest.fail(
            f"port {DEFAULT_LOCAL_PORT} is in use: this test runs `local up` with its defaults "
            "(stop the local stack or server that holds the port)"
        )
    stacks.append(Stack(tmp_path))
    stack = stacks[0]
    assert f"kusto:   {DEFAULT_CLUSTER}  database {DEFAULT_DATABASE}" in stack.lines[0]
    assert stack.lines[1].startswith("schema:  provision.kql applied (")
    assert stack.lines[2].startswith(f"worker:  sqlite:///{LOCAL_DIR}/outbox.db -> ")
    assert "from_conn_string() with no arguments" in stack.lines[3]

    app = subprocess.run(
        [sys.executable, "-c", APP],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert app.returncode == 0, app.stderr
    report = json.loads(app.stdout)
    assert report["result"] == 42
    assert len(report["written"]) == 3
    assert sorted(report["seen"]) == sorted(report["written"]), "not all checkpoints queryable"
    assert report["latest"] == {"n": 42}
    queries = KustoQueries(DEFAULT_CLUSTER, DEFAULT_DATABASE)
    try:
        [row] = queries.run(Query(COUNT_ROWS, {"thread_id": "app-thread"}))
    finally:
        queries.close()
    assert row["Checkpoints"] == 3
    assert _children(stack.process.pid) == [], "local up started processes"

    code, output, err = stack.stop(signal.SIGINT)

    assert code == 0, err
    assert output.splitlines()[-3:] == [
        "stopping: the worker finishes the batch in hand",
        "worker:  stopped",
        "kusto:   stopped",
    ]
    assert "Traceback" not in err
    assert _processes_in(tmp_path) == [], "a process was left behind"
    assert _port_free(DEFAULT_LOCAL_PORT), "the Kusto port is still held"
    LocalKustoServer(tmp_path / LOCAL_DIR / "kusto", 0, DEFAULT_DATABASE).close()


def test_sigterm_stops_the_stack_and_a_restart_keeps_the_data(
    tmp_path: Path, stacks: list[Stack]
) -> None:
    data = tmp_path / "kusto-data"
    queue = f"sqlite:///{tmp_path / 'q.db'}"
    stacks.append(Stack(tmp_path, "--port", "0", "--data", str(data), "--queue", queue))
    first = stacks[-1]
    url = first.lines[0].split()[1]
    assert url.startswith("http://127.0.0.1:") and url != DEFAULT_CLUSTER
    assert any(line.startswith("apps:    set LANGGRAPH_KUSTO_CLUSTER=") for line in first.lines)

    code, _, err = first.stop(signal.SIGTERM)

    assert code == 0, err
    stacks.append(Stack(tmp_path, "--port", "0", "--data", str(data), "--queue", queue))
    assert stacks[-1].stop(signal.SIGINT)[0] == 0
    assert (data / f"{DEFAULT_DATABASE}.duckdb").is_file()


def test_a_busy_port_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [*CLI, "local", "up", "--port", str(port), "--data", str(tmp_path)],
            cwd=tmp_path,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert f"cannot listen on port {port}" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def _local_up_error(tmp_path: Path, *flags: str, **env: str) -> tuple[int, str]:
    """Exit code and stderr of a `local up` that must stop at once with one line."""
    result = subprocess.run(
        [*CLI, "local", "up", "--port", "0", "--data", str(tmp_path / "kusto"), *flags],
        cwd=tmp_path,
        env={**_clean_env(), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    return result.returncode, result.stderr


def test_a_queue_path_that_is_a_directory_is_a_one_line_error(tmp_path: Path) -> None:
    assert _local_up_error(tmp_path, "--queue", f"sqlite:///{tmp_path}") == (
        1,
        f"langgraph-kusto: cannot open the queue file {tmp_path}: it is a directory\n",
    )


def test_a_bad_database_name_is_a_one_line_error(tmp_path: Path) -> None:
    message = (
        "langgraph-kusto: database name {!r}: use letters, digits, '_', '-' or '.' "
        "(it is also the DuckDB file name)\n"
    )

    assert _local_up_error(tmp_path, "--database", "bad!name") == (2, message.format("bad!name"))
    assert _local_up_error(tmp_path, LANGGRAPH_KUSTO_DATABASE="bad name") == (
        2,
        message.format("bad name"),
    )


def test_an_unusable_duckdb_file_is_a_one_line_error_that_leaves_it_alone(tmp_path: Path) -> None:
    database = tmp_path / "kusto" / f"{DEFAULT_DATABASE}.duckdb"
    database.parent.mkdir()
    database.write_bytes(b"truncated")

    code, err = _local_up_error(tmp_path)

    assert code == 2
    assert err.startswith(f"langgraph-kusto: cannot open {database} as a DuckDB database (")
    assert err.endswith("): move it aside, or choose another --data directory\n")
    assert database.read_bytes() == b"truncated"
    database.unlink()
    database.mkdir()  # a directory of that name, too
    code, err = _local_up_error(tmp_path)
    assert code == 2
    assert err.startswith(f"langgraph-kusto: cannot open {database} as a DuckDB database (")


def test_a_data_directory_duckdb_cannot_use_is_a_one_line_error(tmp_path: Path) -> None:
    """DuckDB cuts a path at '?' to name its WAL file: `local up` made the directory, then
    ended in a traceback ("Cannot open file .../a.wal?b/langgraph.duckdb")."""
    data = tmp_path / "a?b"

    assert _local_up_error(tmp_path, "--data", str(data)) == (
        2,
        f"langgraph-kusto: cannot keep a DuckDB database in {data}: DuckDB does not allow "
        "'?' in its file paths; choose another --data directory\n",
    )
    assert not data.exists()


def test_a_cluster_url_with_an_unusable_port_is_refused_by_local_up_and_the_saver(
    tmp_path: Path,
) -> None:
    """Not a traceback from `local up`, nor a saver blaming a stopped local server."""
    for cluster, reason in (
        ("http://127.0.0.1:99999", "Port out of range 0-65535"),
        ("http://127.0.0.1:abc", "Port could not be cast to integer value as 'abc'"),
        ("http://127.0.0.1:0", "0"),  # a server's "any free port": no app could find it
    ):
        message = f"cluster {cluster!r} has an unusable port: {reason}"
        # No --port: `local up` takes its port from the cluster URL.
        result = subprocess.run(
            [*CLI, "local", "up", "--data", str(tmp_path / "kusto")],
            cwd=tmp_path,
            env={**_clean_env(), "LANGGRAPH_KUSTO_CLUSTER": cluster},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (result.returncode, result.stderr) == (
            2,
            f"langgraph-kusto: {message} ($LANGGRAPH_KUSTO_CLUSTER, which --port overrides)\n",
        )
        with (
            pytest.raises(ValueError, match=re.escape(message)),
            KustoSaver.from_conn_string(queue=f"sqlite:///{tmp_path}/q.db", cluster=cluster),
        ):
            pass
    assert list(tmp_path.iterdir()) == []
