"""The command line as a user meets it: the demo's tour, and clear errors for mistakes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

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

    # A poison message and a misconfiguration dead-lettered; replayed after the fix.
    assert "BadRequest_MappingReferenceWasNotFound" in out
    listed = _rows([line.strip() for line in _section(lines, "  $ langgraph-kusto dlq list")])
    reasons = [r["REASON"] for r in listed]
    assert reasons.count("MalformedEnvelope") == 1
    late = [r for r in listed if r["REASON"] == "MaxDeliveryCountExceeded"]
    assert late and {r["THREAD"] for r in late} == {"demo-thread-late"}
    assert f"replayed {len(late)} dead letter(s)" in out
    assert "purged 1 dead letter(s)" in out
    assert lines[lines.index("  analytics again, the replayed thread included:") - 2] == (
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
