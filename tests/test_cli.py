"""The command line as a user meets it: the demo, and clear errors for mistakes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "langgraph.checkpoint.kusto.ingestor_worker.cli"]


def test_demo_prints_the_history_read_back_from_kusto(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "demo", "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    lines = result.stdout.splitlines()
    start = lines.index("history of thread 'demo-thread', read back from Kusto with KQL:")
    history = lines[start + 2 :]
    assert [line.split()[-1] for line in history] == ["input", "loop", "loop", "loop", "loop"]
    assert [int(line.split()[1]) for line in history] == [-1, 0, 1, 2, 3]
    assert "Traceback" not in result.stderr


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
