"""The SQLite queue's spool: what senders append reaches consumers exactly once, a send
cut short is dropped only when it never returned, and spool files go once imported."""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import time
from pathlib import Path

import pytest
from langgraph.checkpoint.kusto.outbox import OutboxError, OutboxMessage
from langgraph.checkpoint.kusto.outbox import spool as spool_module
from langgraph.checkpoint.kusto.outbox import sqlite as sqlite_queue
from langgraph.checkpoint.kusto.outbox.spool import SpoolWriter, encode_record, spool_directory
from langgraph.checkpoint.kusto.outbox.sqlite import SqliteQueue


def msg(message_id: str, session_id: str = "s1") -> OutboxMessage:
    return OutboxMessage(message_id.encode(), message_id, session_id, {"kind": "checkpoint"})


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "outbox.db"


def spool_files(db: Path, queue: str = "events") -> list[Path]:
    return sorted(spool_directory(db.absolute(), queue).glob("*.log"))


def received_ids(queue: SqliteQueue) -> list[str]:
    return [m.message_id for m in queue.receive(100, 0)]


def test_a_send_cut_short_by_a_failed_write_is_dropped_and_the_sends_around_it_kept(
    db: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Half a record reached the file before the disk filled up: that send raised, so it
    was never accepted; the sender goes on in a new file, and a consumer drops the half
    record (its sender has left the file) but keeps what came before it."""
    with SqliteQueue(db) as sender, SqliteQueue(db) as worker:
        sender.send([msg("a")])
        writev = os.writev

        def disk_full_halfway(fd: int, parts: list[bytes]) -> int:
            record = b"".join(parts)
            return writev(fd, [record[: len(record) // 2]])

        def disk_full(fd: int, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        # As a full disk does: the first call writes what fits, the next one fails.
        monkeypatch.setattr(spool_module.os, "writev", disk_full_halfway)
        monkeypatch.setattr(spool_module.os, "write", disk_full)
        with pytest.raises(OutboxError, match=r"cannot append to spool file .* No space left"):
            sender.send([msg("torn")])
        monkeypatch.undo()
        sender.send([msg("b")])
        assert len(spool_files(db)) == 2
        with caplog.at_level(logging.WARNING, logger=sqlite_queue.logger.name):
            assert received_ids(worker) == ["a", "b"]
        assert [r.getMessage() for r in caplog.records] == [
            "dropping a send cut short at the end of a spool file: its sender stopped "
            "while writing it, so that send never returned"
        ]
        assert len(spool_files(db)) == 1  # the abandoned file went; the sender's own stays


def test_a_send_whose_write_stopped_short_writes_the_rest(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``writev`` may write less than asked (a signal, a disk nearly full): the rest
    follows, and the record arrives whole."""
    writev = os.writev

    def interrupted(fd: int, parts: list[bytes]) -> int:
        record = b"".join(parts)
        return writev(fd, [record[:7]])

    with SqliteQueue(db) as sender, SqliteQueue(db) as worker:
        monkeypatch.setattr(spool_module.os, "writev", interrupted)
        sender.send([msg("a")])
        sender.send([msg("b"), msg("c")])
        monkeypatch.undo()
        assert received_ids(worker) == ["a", "b", "c"]


def test_a_record_a_live_sender_is_still_writing_is_waited_for_not_dropped(db: Path) -> None:
    record = b"".join(encode_record([msg("slow")], time.time(), 600.0))
    writer = SpoolWriter(spool_directory(db.absolute(), "events"))
    with SqliteQueue(db) as worker:
        writer.append(record[:10])
        assert worker.receive(10, 0) == []
        assert worker.depth() == 0
        writer.append(record[10:])
        assert received_ids(worker) == ["slow"]
    writer.close()


def _send_and_die(db: Path) -> None:
    queue = SqliteQueue(db)
    queue.send([msg("a")])
    queue.send([msg("b"), msg("c")])
    os._exit(0)  # no close(): as if killed


def test_the_sends_of_a_sender_process_that_died_arrive_and_its_spool_file_goes(
    db: Path,
) -> None:
    process = multiprocessing.get_context("spawn").Process(target=_send_and_die, args=(db,))
    process.start()
    process.join(60)
    assert process.exitcode == 0
    with SqliteQueue(db) as worker:
        assert received_ids(worker) == ["a", "b", "c"]
        assert spool_files(db) == []


def test_a_closed_sender_s_spool_file_goes_once_imported_even_by_an_idle_consumer(
    db: Path,
) -> None:
    with SqliteQueue(db) as worker:
        sender = SqliteQueue(db)
        sender.send([msg("a")])
        assert received_ids(worker) == ["a"]
        assert len(spool_files(db)) == 1  # its sender is still there
        sender.close()
        assert worker.receive(10, 0) == []  # nothing new, but the file can go now
        assert spool_files(db) == []


def test_a_sender_moves_to_a_new_spool_file_past_the_size_limit_and_the_old_ones_go(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_queue, "MAX_SPOOL_FILE_BYTES", 1)
    with SqliteQueue(db) as sender, SqliteQueue(db) as worker:
        for name in ("a", "b", "c"):
            sender.send([msg(name)])
        assert len(spool_files(db)) == 3
        assert received_ids(worker) == ["a", "b", "c"]
        assert len(spool_files(db)) == 1


def test_sends_from_several_senders_keep_the_order_they_were_made_in(db: Path) -> None:
    with SqliteQueue(db) as first, SqliteQueue(db) as second, SqliteQueue(db) as worker:
        for sender, name in ((first, "a"), (second, "b"), (first, "c"), (second, "d")):
            sender.send([msg(name)])
            time.sleep(0.002)
        assert received_ids(worker) == ["a", "b", "c", "d"]


def test_a_spool_import_is_never_repeated_by_another_consumer(db: Path) -> None:
    with SqliteQueue(db) as sender, SqliteQueue(db) as one, SqliteQueue(db) as other:
        sender.send([msg("a"), msg("b", "s2")])
        assert one.depth() == 2
        assert other.depth() == 2  # the same two: the progress is in the file, not in memory
        assert sorted(received_ids(other)) == ["a", "b"]
        assert one.receive(10, 0) == []


def test_properties_the_queue_cannot_store_as_json_are_refused_by_the_send(db: Path) -> None:
    """Consumers encode properties; one they could not encode would stop the queue."""
    with SqliteQueue(db) as queue:
        for bad in ({"raw": b"bytes"}, {"when": time}, {1: "int key"}):
            with pytest.raises(TypeError):
                queue.send([OutboxMessage(b"x", "bad", "s1", bad)])  # type: ignore[arg-type]
        queue.send([OutboxMessage(b"y", "nested", "s1", {"tags": ["a", 1], "n": None})])
        received = queue.receive(10, 0)
        assert [(m.message_id, m.application_properties) for m in received] == [
            ("nested", {"tags": ["a", 1], "n": None})
        ]


@pytest.mark.parametrize("budget", [1, 110], ids=["smaller than a record", "two records"])
def test_a_backlog_is_imported_a_budget_at_a_time_and_a_record_larger_than_it_whole(
    db: Path, monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    monkeypatch.setattr(sqlite_queue, "MAX_IMPORT_BYTES", budget)
    with SqliteQueue(db) as sender:
        for name in ("a", "b", "c", "d"):
            sender.send([msg(name)])
    record_bytes = spool_files(db)[0].stat().st_size // 4
    assert 2 * record_bytes <= 110 < 3 * record_bytes  # 110 bytes hold two whole records
    per_import = 1 if budget == 1 else 2
    with SqliteQueue(db) as worker:
        depths = [worker.depth() for _ in range(4 // per_import)]
        assert depths == list(range(per_import, 5, per_import))
        assert spool_files(db) == []  # deleted with its last record's import
        assert received_ids(worker) == ["a", "b", "c", "d"]
