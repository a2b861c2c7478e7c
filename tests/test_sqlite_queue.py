"""The embedded SQLite outbox keeps Azure Service Bus semantics, across threads and processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import shutil
import sqlite3
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.kusto.outbox import (
    MAX_DELIVERY_COUNT_EXCEEDED,
    DeadLetterLookup,
    DeadLetterStore,
    LockLostError,
    OutboxError,
    OutboxMessage,
    OutboxReceiver,
    OutboxSender,
    open_sender,
    queue_id,
    replay_message_id,
)
from langgraph.checkpoint.kusto.outbox import sqlite as sqlite_queue
from langgraph.checkpoint.kusto.outbox.grouping import SendGroups, commit
from langgraph.checkpoint.kusto.outbox.sqlite import AsyncSqliteSender, SqliteQueue


def msg(message_id: str, session_id: str = "s1", body: bytes | None = None) -> OutboxMessage:
    return OutboxMessage(
        body=body if body is not None else message_id.encode(),
        message_id=message_id,
        session_id=session_id,
        application_properties={"kind": "checkpoint", "n": 7},
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "outbox.db"


@pytest.fixture
def queue(db: Path):
    with SqliteQueue(db) as q:
        yield q


def test_implements_the_three_contracts(queue: SqliteQueue) -> None:
    assert isinstance(queue, OutboxSender)
    assert isinstance(queue, OutboxReceiver)
    assert isinstance(queue, DeadLetterStore)


def test_publish_receive_complete(queue: SqliteQueue) -> None:
    before = time.time()
    queue.send([msg("a"), msg("b", "s2")])
    assert queue.depth() == 2

    received = queue.receive(max_messages=10, max_wait=0)

    assert [m.message_id for m in received] == ["a", "b"]
    first = received[0]
    assert first.body == b"a"
    assert first.session_id == "s1"
    assert first.application_properties == {"kind": "checkpoint", "n": 7}
    assert first.delivery_count == 0  # azure-servicebus reports 0 on a first delivery
    assert before <= first.enqueued_time <= time.time()
    assert first.locked_until == pytest.approx(time.time() + queue.lock_duration, abs=1)
    assert received[0].lock_token != received[1].lock_token
    assert received[0].sequence_number < received[1].sequence_number
    assert queue.receive(10, 0) == []  # locked, not visible to anyone else
    assert queue.depth() == 2  # peek-lock does not remove

    queue.complete(received)

    assert queue.depth() == 0
    assert queue.receive(10, 0) == []
    with pytest.raises(LockLostError, match="settled already"):
        queue.complete(received[:1])


def test_receive_waits_for_a_message_and_gives_up_after_max_wait(db: Path) -> None:
    with SqliteQueue(db) as consumer, SqliteQueue(db) as producer:
        started = time.monotonic()
        assert consumer.receive(5, max_wait=0.2) == []
        assert 0.2 <= time.monotonic() - started < 1.0

        timer = threading.Timer(0.15, producer.send, [[msg("late")]])
        timer.start()
        started = time.monotonic()
        received = consumer.receive(5, max_wait=3)
        timer.join()
        assert [m.message_id for m in received] == ["late"]
        assert time.monotonic() - started < 1.0  # returned on arrival, not at max_wait


def test_max_messages_caps_a_receive(queue: SqliteQueue) -> None:
    queue.send([msg(f"m{i}", f"s{i % 3}") for i in range(10)])
    assert len(queue.receive(max_messages=4, max_wait=0)) == 4
    assert len(queue.receive(max_messages=100, max_wait=0)) == 6


def test_abandon_redelivers_with_delivery_count_plus_one(queue: SqliteQueue) -> None:
    queue.send([msg("a")])
    (first,) = queue.receive(1, 0)

    queue.abandon([first])

    (again,) = queue.receive(1, 0)
    assert again.message_id == "a"
    assert again.delivery_count == first.delivery_count + 1 == 1
    assert again.lock_token != first.lock_token
    with pytest.raises(LockLostError):
        queue.complete([first])  # the old delivery's token is dead
    queue.complete([again])
    assert queue.depth() == 0


def test_lock_expiry_redelivers_and_stale_settlement_fails(db: Path) -> None:
    with SqliteQueue(db, lock_duration=0.2) as a, SqliteQueue(db, lock_duration=0.2) as b:
        a.send([msg("a")])
        (first,) = a.receive(1, 0)
        assert b.receive(1, 0) == []

        time.sleep(0.3)

        (again,) = b.receive(1, 0)
        assert again.message_id == "a"
        assert again.delivery_count == 1
        for settle in (a.complete, a.abandon, a.renew_locks):
            with pytest.raises(LockLostError, match="lock expired"):
                settle([first])
        with pytest.raises(LockLostError):
            a.dead_letter(first, "x", "y")
        b.complete([again])
        assert a.depth() == 0


def test_settling_an_expired_lock_fails_even_before_redelivery(db: Path) -> None:
    with SqliteQueue(db, lock_duration=0.1) as q:
        q.send([msg("a")])
        (m,) = q.receive(1, 0)
        time.sleep(0.2)
        with pytest.raises(LockLostError):
            q.complete([m])
        assert q.depth() == 1


def test_renew_keeps_the_lock(db: Path) -> None:
    with SqliteQueue(db, lock_duration=0.3) as a, SqliteQueue(db, lock_duration=0.3) as b:
        a.send([msg("a"), msg("b")])
        received = a.receive(2, 0)
        time.sleep(0.2)

        renewed = a.renew_locks(received)

        assert len(renewed) == 2
        assert all(r > m.locked_until for r, m in zip(renewed, received, strict=True))
        time.sleep(0.2)  # past the original lock, within the renewed one
        assert b.receive(5, 0) == []
        a.complete(received)  # the original lock tokens stay valid
        assert a.depth() == 0


def test_partial_settlement_completes_the_held_and_names_the_lost(db: Path) -> None:
    with SqliteQueue(db, lock_duration=0.2) as q:
        q.send([msg("a", "s1"), msg("b", "s2")])
        (a,) = q.receive(1, 0)
        time.sleep(0.25)
        a_again, b = q.receive(2, 0)
        assert (a_again.message_id, b.message_id) == ("a", "b")

        with pytest.raises(LockLostError, match=rf"{a.sequence_number} \('a'\)") as raised:
            q.complete([a, b])

        assert "'b'" not in str(raised.value)
        assert q.depth() == 1  # b completed despite a's stale token
        q.complete([a_again])
        assert q.depth() == 0


def test_max_delivery_by_abandon_dead_letters(db: Path) -> None:
    with SqliteQueue(db, max_delivery_count=3) as q:
        q.send([msg("poison"), msg("fine", "s2")])
        counts = []
        for _ in range(3):
            received = {m.message_id: m for m in q.receive(10, 0)}
            counts.append(received["poison"].delivery_count)
            q.abandon([received["poison"]])
        assert counts == [0, 1, 2]

        assert q.dead_letter_count() == 1  # dead-lettered on the third abandon
        assert [m.message_id for m in q.receive(10, 0)] == []  # "fine" is still locked
        (dead,) = q.list_dead_letters()
        assert dead.message_id == "poison"
        assert dead.reason == MAX_DELIVERY_COUNT_EXCEEDED == "MaxDeliveryCountExceeded"
        assert dead.delivery_count == 3
        assert "3" in dead.description and "max_delivery_count" in dead.description
        assert dead.body == b"poison"
        assert q.depth() == 1


def test_max_delivery_by_lock_expiry_dead_letters_on_next_receive(db: Path) -> None:
    with SqliteQueue(db, lock_duration=0.1, max_delivery_count=2) as q:
        q.send([msg("a"), msg("b")])
        for expected in (0, 1):
            received = q.receive(1, 0)
            assert [(m.message_id, m.delivery_count) for m in received] == [("a", expected)]
            time.sleep(0.15)

        (next_up,) = q.receive(1, 0)

        assert next_up.message_id == "b"  # "a" was dead-lettered instead of delivered a 3rd time
        assert [(d.message_id, d.reason) for d in q.list_dead_letters()] == [
            ("a", "MaxDeliveryCountExceeded")
        ]


def test_explicit_dead_letter_keeps_reason_and_description(queue: SqliteQueue) -> None:
    queue.send([msg("bad")])
    (m,) = queue.receive(1, 0)
    before = time.time()

    queue.dead_letter(m, "SchemaMismatch", "column Foo is missing in table Events")

    assert queue.depth() == 0
    assert queue.dead_letter_count() == 1
    (dead,) = queue.list_dead_letters()
    assert (dead.reason, dead.description) == (
        "SchemaMismatch",
        "column Foo is missing in table Events",
    )
    assert (dead.message_id, dead.session_id, dead.body) == ("bad", "s1", b"bad")
    assert dead.sequence_number == m.sequence_number
    assert dead.enqueued_time == m.enqueued_time
    assert dead.application_properties == {"kind": "checkpoint", "n": 7}
    assert before <= dead.dead_lettered_time <= time.time()
    assert dead.delivery_count == 1
    with pytest.raises(LockLostError):
        queue.complete([m])


def test_dead_letters_listed_oldest_first_resent_and_deleted(queue: SqliteQueue) -> None:
    queue.send([msg(f"m{i}", f"s{i}") for i in range(3)])
    for m in queue.receive(3, 0):
        queue.dead_letter(m, "Broken", f"because {m.message_id}")
    dead = queue.list_dead_letters()
    assert [d.message_id for d in dead] == ["m0", "m1", "m2"]
    assert [d.message_id for d in queue.list_dead_letters(limit=2)] == ["m0", "m1"]

    queue.resend_dead_letter(dead[1].sequence_number)  # within the dedup window on purpose

    assert queue.dead_letter_count() == 2
    (replayed,) = queue.receive(5, 0)
    assert (replayed.message_id, replayed.session_id, replayed.body) == (
        replay_message_id("m1", dead[1].sequence_number),
        "s1",
        b"m1",
    )
    assert replayed.application_properties == {"kind": "checkpoint", "n": 7}
    assert replayed.delivery_count == 0
    assert replayed.sequence_number > dead[2].sequence_number  # a new message
    queue.complete([replayed])

    queue.delete_dead_letter(dead[0].sequence_number)
    assert [d.message_id for d in queue.list_dead_letters()] == ["m2"]
    with pytest.raises(KeyError, match="No dead letter with sequence number 999"):
        queue.resend_dead_letter(999)
    with pytest.raises(KeyError, match="list_dead_letters"):
        queue.delete_dead_letter(dead[0].sequence_number)
    assert queue.depth() == 0


def test_find_dead_letter_by_sequence_number(queue: SqliteQueue) -> None:
    assert isinstance(queue, DeadLetterLookup)
    queue.send([msg(f"m{i}", f"s{i}") for i in range(3)])
    for m in queue.receive(3, 0):
        queue.dead_letter(m, "Broken", f"because {m.message_id}")
    listed = queue.list_dead_letters()

    assert [queue.find_dead_letter(d.sequence_number) for d in listed] == listed
    assert queue.find_dead_letter(999) is None


def test_replayed_message_still_blocks_a_late_duplicate(queue: SqliteQueue) -> None:
    queue.send([msg("a")])
    (m,) = queue.receive(1, 0)
    queue.dead_letter(m, "x", "y")
    queue.resend_dead_letter(m.sequence_number)
    queue.send([msg("a")])  # the producer retrying: still a duplicate
    assert queue.depth() == 1


def test_duplicate_message_id_dropped_within_window_accepted_after(db: Path) -> None:
    with SqliteQueue(db, duplicate_detection_window=0.3) as q:
        q.send([msg("a", body=b"first"), msg("a", body=b"same call"), msg("b")])
        assert q.depth() == 2
        q.send([msg("a", body=b"retry")])
        assert q.depth() == 2

        (a, _b) = q.receive(2, 0)
        q.complete([a])
        q.send([msg("a", body=b"after completion")])  # detection outlives consumption
        assert q.depth() == 1

        time.sleep(0.35)
        q.send([msg("a", body=b"after window")])
        assert q.depth() == 2
        bodies = {m.body for m in q.receive(5, 0)}
        assert bodies == {b"after window"}  # "b" is still locked; the new "a" arrived


def test_expired_duplicate_detection_ids_are_deleted(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_queue, "DEDUP_PRUNE_INTERVAL", 0.2)
    with SqliteQueue(db, duplicate_detection_window=0.1) as q:
        q.send([msg(f"m{i}") for i in range(50)])
        assert q.depth() == 50  # imported: their ids are remembered
        time.sleep(0.25)
        q.send([msg("late")])
        assert q.depth() == 51  # the import after the interval deleted the expired ids
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT message_id FROM outbox_dedup").fetchall() == [("late",)]


def test_duplicate_detection_is_per_queue_and_queues_share_a_file(db: Path) -> None:
    with SqliteQueue(db, "events") as events, SqliteQueue(db, "other") as other:
        events.send([msg("a")])
        other.send([msg("a")])
        assert (events.depth(), other.depth()) == (1, 1)
        (m,) = other.receive(5, 0)
        assert events.receive(5, 0)[0].sequence_number != m.sequence_number
        other.dead_letter(m, "r", "d")
        assert (events.dead_letter_count(), other.dead_letter_count()) == (0, 1)


def test_fifo_per_session(queue: SqliteQueue) -> None:
    for i in range(20):
        queue.send([msg(f"x{i}", "x"), msg(f"y{i}", "y")])
    order: dict[str, list[int]] = defaultdict(list)
    while batch := queue.receive(3, 0):
        for m in batch:
            order[m.session_id].append(int(m.message_id[1:]))
        queue.complete(batch)
    assert order == {"x": list(range(20)), "y": list(range(20))}


def test_abandoned_head_of_session_comes_back_first(queue: SqliteQueue) -> None:
    queue.send([msg("m0"), msg("m1"), msg("m2")])
    head, _second = queue.receive(2, 0)
    queue.abandon([head])  # still holding m1: the session stays ours
    assert [m.message_id for m in queue.receive(5, 0)] == ["m0", "m2"]


def test_one_consumer_per_session_at_a_time(db: Path) -> None:
    with SqliteQueue(db) as a, SqliteQueue(db) as b:
        a.send([msg("s1-0", "s1"), msg("s1-1", "s1"), msg("s2-0", "s2")])

        (first,) = a.receive(1, 0)
        assert first.message_id == "s1-0"
        # b may not take s1-1 while a holds s1, even though s1-1 itself is not locked.
        assert [m.message_id for m in b.receive(10, 0)] == ["s2-0"]
        # a holds the session, so a gets the next message of it.
        (second,) = a.receive(10, 0)
        assert second.message_id == "s1-1"

        a.complete([first])
        a.send([msg("s1-2", "s1")])
        assert b.receive(10, 0) == []  # a still holds s1-1, so the session stays with a
        a.complete([second])  # a holds nothing of s1 now: lock released
        assert [m.message_id for m in b.receive(10, 0)] == ["s1-2"]
        assert a.receive(10, 0) == []


def test_session_lock_expiry_hands_the_session_over_in_order(db: Path) -> None:
    with SqliteQueue(db, lock_duration=0.2) as a, SqliteQueue(db, lock_duration=0.2) as b:
        a.send([msg("m0"), msg("m1"), msg("m2")])
        assert [m.message_id for m in a.receive(1, 0)] == ["m0"]
        assert b.receive(10, 0) == []
        time.sleep(0.25)
        taken = b.receive(10, 0)
        assert [(m.message_id, m.delivery_count) for m in taken] == [
            ("m0", 1),
            ("m1", 0),
            ("m2", 0),
        ]
        assert a.receive(10, 0) == []


def test_send_is_atomic_on_failure(queue: SqliteQueue) -> None:
    bad = OutboxMessage(b"x", "bad", "s1", {"not json": object()})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        queue.send([msg("a"), msg("b"), bad])
    assert queue.depth() == 0
    queue.send([msg("a"), msg("b")])  # their ids were not remembered either
    assert queue.depth() == 2


def test_an_import_failing_midway_through_a_send_imports_none_of_it_then_all_of_it_once(
    db: Path,
) -> None:
    """A send's messages are imported one statement each: a failure in the third undoes
    the first two, ids, session rows and the spool's progress included, so the next
    import, once the cause is gone, takes the whole send exactly once."""
    with sqlite3.connect(db) as other:
        other.executescript(sqlite_queue.SCHEMA)
        other.execute(
            "CREATE TRIGGER refuse_boom BEFORE INSERT ON outbox_messages"
            " WHEN NEW.message_id = 'boom' BEGIN SELECT RAISE(ABORT, 'no boom'); END"
        )
    with SqliteQueue(db) as q:
        q.send([msg("a", "s1"), msg("b", "s2"), msg("boom", "s3")])  # spooled
        with pytest.raises(sqlite3.IntegrityError, match="no boom"):
            q.receive(10, 0)
        with sqlite3.connect(db) as conn:
            for table in ("outbox_messages", "outbox_dedup", "outbox_sessions"):
                assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
            assert conn.execute("SELECT imported FROM outbox_spool").fetchall() == [(0,)]
            conn.execute("DROP TRIGGER refuse_boom")
        assert [m.message_id for m in q.receive(10, 0)] == ["a", "b", "boom"]
        assert q.depth() == 3


def test_a_group_keeps_its_order_and_adds_only_the_sessions_of_messages_it_keeps(
    queue: SqliteQueue, db: Path
) -> None:
    queue.send([msg("old", "s0")])
    queue.send(
        [
            msg("c", "s1"),
            msg("old", "dropped-1"),  # accepted before
            msg("a", "s2"),
            msg("c", "dropped-2"),  # accepted earlier in this call
            msg("b", "s1"),
        ]
    )
    received = sorted(queue.receive(10, 0), key=lambda m: m.sequence_number)
    assert [(m.message_id, m.session_id) for m in received] == [
        ("old", "s0"),
        ("c", "s1"),
        ("a", "s2"),
        ("b", "s1"),
    ]
    with sqlite3.connect(db) as conn:
        sessions = conn.execute("SELECT session_id FROM outbox_sessions ORDER BY 1").fetchall()
    assert sessions == [("s0",), ("s1",), ("s2",)]


def test_a_file_written_by_an_older_version_keeps_working_and_keeps_its_schema(
    db: Path,
) -> None:
    """Older versions sent with plain statements against the same tables; the import
    statement's view and trigger are TEMP objects of each connection, so opening a file
    leaves its schema as it was (here already with this version's ``outbox_spool``)."""
    with sqlite3.connect(db) as old:
        old.executescript(sqlite_queue.SCHEMA)
        old.execute(
            "INSERT INTO outbox_messages (queue, message_id, session_id, body, properties,"
            " enqueued_time) VALUES ('events', 'early', 's1', x'65', '{}', ?)",
            (time.time(),),
        )
        old.execute("INSERT INTO outbox_sessions (queue, session_id) VALUES ('events', 's1')")
        old.execute(
            "INSERT INTO outbox_dedup (queue, message_id, enqueued_time)"
            " VALUES ('events', 'early', ?)",
            (time.time(),),
        )
        schema = old.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
    with SqliteQueue(db, lock_duration=0.1) as receiver, SqliteQueue(db) as sender:
        assert receiver.receive(10, 0)[0].message_id == "early"
        sender.send([msg("early", "s1"), msg("late", "s1")])  # "early" is a duplicate
        assert sender.depth() == 2
        temp_objects = "SELECT name FROM sqlite_temp_master ORDER BY name"
        for connection in (receiver._conn, sender._conn):
            assert connection.execute(temp_objects).fetchall() == [
                ("outbox_send",),
                ("outbox_send_message",),
            ]
    with sqlite3.connect(db) as conn:
        after = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
    assert after == schema
    with SqliteQueue(db) as q:
        time.sleep(0.15)  # the receiver's lock on "early" expires
        assert [m.message_id for m in q.receive(10, 0)] == ["early", "late"]


def test_send_is_atomic_for_concurrent_readers(db: Path) -> None:
    batch_size, batches = 25, 200
    seen: set[int] = set()
    ready, done = threading.Event(), threading.Event()

    def watch() -> None:
        with SqliteQueue(db) as reader:
            ready.set()
            while not done.is_set():
                seen.add(reader.depth())

    with SqliteQueue(db) as writer:
        watcher = threading.Thread(target=watch)
        watcher.start()
        ready.wait()
        for b in range(batches):
            writer.send([msg(f"{b}-{i}", f"s{i}") for i in range(batch_size)])
            time.sleep(0.001)  # an append takes microseconds: let the reader look meanwhile
        done.set()
        watcher.join()
        assert writer.depth() == batch_size * batches
    assert len(seen) > 2  # the reader really looked while batches were landing
    assert all(depth % batch_size == 0 for depth in seen)


def test_ids_longer_than_service_bus_allows_keep_their_session_and_dedup(
    queue: SqliteQueue,
) -> None:
    thread = "t" * 300
    queue.send([msg("a", thread), msg("b", thread), msg("x" * 200, thread), msg("x" * 200)])
    received = queue.receive(10, 0)
    assert [m.message_id for m in received] == ["a", "b", queue_id("x" * 200)]
    assert {m.session_id for m in received} == {queue_id(thread)}
    assert len(queue_id(thread)) <= 128
    with pytest.raises(ValueError, match="message_id must not be empty"):
        queue.send([msg("")])
    assert queue.depth() == 3


def test_one_instance_is_safe_across_threads(queue: SqliteQueue) -> None:
    queue.send([msg(f"m{i}", f"s{i % 7}") for i in range(300)])
    completed: list[str] = []

    def work() -> None:
        while batch := queue.receive(10, 0.05):
            queue.complete(batch)
            completed.extend(m.message_id for m in batch)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(completed) == sorted(f"m{i}" for i in range(300))
    assert queue.depth() == 0


def test_state_survives_reopening(db: Path) -> None:
    with SqliteQueue(db) as q:
        q.send([msg("a"), msg("b")])
        (a, _) = q.receive(2, 0)
        q.dead_letter(a, "r", "d")
    with SqliteQueue(db) as q:
        assert (q.depth(), q.dead_letter_count()) == (1, 1)
        assert q.path == db


@pytest.mark.parametrize(
    ("url", "path", "name"),
    [
        ("sqlite:///rel/dir/q.db", "rel/dir/q.db", "events"),
        ("sqlite:////ABS/q.db?queue=jobs", "/ABS/q.db", "jobs"),
        ("sqlite:///my%20q.db?queue=a", "my q.db", "a"),
    ],
)
def test_from_url(
    url: str, path: str, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    url = url.replace("/ABS", str(tmp_path / "abs"))
    path = path.replace("/ABS", str(tmp_path / "abs"))
    with SqliteQueue.from_url(url, lock_duration=5) as q:
        assert (str(q.path), q.queue, q.lock_duration) == (path, name, 5)
        q.send([msg("a")])
    assert (tmp_path / path).exists()


@pytest.mark.parametrize(
    "url",
    [
        "postgres:///q.db",
        "sqlite://host/q.db",
        "sqlite:///",
        "sqlite:///q.db?queue=",
        "sqlite:///q.db?queue=a&queue=b",
        "sqlite:///q.db?topic=a",
        "sqlite:///q.db?queue",
        "q.db",
        "sqlite:q.db",
        "sqlite:/q.db",
        "sqlite://",
        "sqlite:ABS/q.db",
        "sqlite:/ABS/q.db",
        "sqlite://ABS/q.db",
    ],
)
def test_from_url_rejects_bad_urls(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only sqlite:/// and sqlite://// name a file; the other spellings used to open a
    different file than the one the user meant (``sqlite:q.db`` opened ``.db``...)."""
    monkeypatch.chdir(tmp_path)
    url = url.replace("ABS", str(tmp_path / "abs").lstrip("/"))
    with pytest.raises(ValueError, match=r"sqlite:///relative/path\.db"):
        SqliteQueue.from_url(url)
    assert list(tmp_path.iterdir()) == [], "a rejected URL created a file"


@pytest.mark.parametrize("where", ["a directory", "a text file", "under a file", "under /proc"])
def test_a_path_that_cannot_be_a_queue_file_is_an_outbox_error_naming_file_and_cause(
    where: str, tmp_path: Path
) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello\n")
    # /proc: a missing directory that nobody can create, root included.
    path, cause = {
        "a directory": (tmp_path, f"cannot open the queue file {tmp_path}: it is a directory"),
        "a text file": (
            text_file,
            f"cannot open the queue file {text_file}: file is not a database",
        ),
        "under a file": (
            text_file / "q.db",
            f"cannot create the directory {text_file} for the queue file {text_file / 'q.db'}: ",
        ),
        "under /proc": (
            Path("/proc/no-such-dir/q.db"),
            "cannot create the directory /proc/no-such-dir for the queue file "
            "/proc/no-such-dir/q.db: No such file or directory",
        ),
    }[where]

    for open_it in (SqliteQueue.from_url, open_sender):  # open_sender: what the saver uses
        with pytest.raises(OutboxError) as raised:
            open_it(f"sqlite:///{path}")
        message = str(raised.value)
        assert message.startswith(cause), message
        assert "\n" not in message


def test_constructor_rejects_nonsense(db: Path) -> None:
    with pytest.raises(ValueError, match="lock_duration"):
        SqliteQueue(db, lock_duration=0)
    with pytest.raises(ValueError, match="max_delivery_count"):
        SqliteQueue(db, max_delivery_count=0)
    with SqliteQueue(db) as q, pytest.raises(ValueError, match="max_messages"):
        q.receive(0, 0)


# --- several processes ------------------------------------------------------------------

SESSIONS = 30
PER_SESSION = 100


def _produce(path: str, start: Any) -> None:
    with SqliteQueue(path) as q:
        start.wait()
        for i in range(PER_SESSION):
            batch = [
                OutboxMessage(f"{s}:{i}".encode(), f"{s}:{i}", f"session-{s}")
                for s in range(SESSIONS)
            ]
            q.send(batch[: SESSIONS // 2])
            q.send(batch[SESSIONS // 2 :])


def _consume(path: str, start: Any, produced: Any, ticket: Any, results: Any) -> None:
    completed: list[tuple[int, int, int, int]] = []
    with SqliteQueue(path) as q:
        start.wait()
        while True:
            batch = q.receive(max_messages=50, max_wait=0.1)
            if not batch:
                if produced.is_set() and q.depth() == 0:
                    break
                continue
            stamped = []
            for _ in batch:
                with ticket.get_lock():
                    ticket.value += 1
                    stamped.append(ticket.value)
            time.sleep(0.005)  # the work: a worker holds its batch while it ingests
            q.complete(batch)
            for m, stamp in zip(batch, stamped, strict=True):
                session, index = map(int, m.message_id.split(":"))
                completed.append((session, index, stamp, m.delivery_count))
    results.put(completed)


def test_many_processes_complete_each_message_once_in_session_order(db: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    SqliteQueue(db).close()  # schema in place before the race starts
    start = ctx.Barrier(4)  # nobody begins before all are up: spawn start-up is slow
    produced, ticket, results = ctx.Event(), ctx.Value("q", 0), ctx.Queue()
    consumers = [
        ctx.Process(target=_consume, args=(str(db), start, produced, ticket, results))
        for _ in range(3)
    ]
    for p in consumers:
        p.start()
    producer = ctx.Process(target=_produce, args=(str(db), start))
    producer.start()
    producer.join(timeout=60)
    assert producer.exitcode == 0
    produced.set()
    outcomes = [results.get(timeout=60) for _ in consumers]
    for p in consumers:
        p.join(timeout=10)
        assert p.exitcode == 0

    everything = [c for outcome in outcomes for c in outcome]
    assert len(everything) == SESSIONS * PER_SESSION  # no duplicates ...
    assert {(s, i) for s, i, _, _ in everything} == {
        (s, i) for s in range(SESSIONS) for i in range(PER_SESSION)
    }  # ... and nothing lost
    assert all(count == 0 for *_, count in everything)  # nothing needed a redelivery
    by_session: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for session, index, stamp, _ in everything:
        by_session[session].append((stamp, index))
    for session, stamped in by_session.items():
        assert [index for _, index in sorted(stamped)] == list(range(PER_SESSION)), session
    assert all(len(outcome) >= 100 for outcome in outcomes), [len(o) for o in outcomes]
    with SqliteQueue(db) as q:
        assert (q.depth(), q.dead_letter_count()) == (0, 0)


# --- the saver's asyncio sender ---------------------------------------------------------------


def _hold_write_lock(db: Path) -> sqlite3.Connection:
    """Another connection (as another process would) holding the queue's write lock."""
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def test_a_send_does_not_wait_for_another_connections_write_lock(
    queue: SqliteQueue, db: Path
) -> None:
    """A send appends to the sender's spool file; only consumers take SQLite's lock (and
    a sender's first send, which registers its file)."""
    queue.send([msg("first")])
    assert queue.depth() == 1
    holder = _hold_write_lock(db)
    sender = threading.Thread(target=queue.send, args=([msg("a"), msg("b")],))
    sender.start()
    sender.join(timeout=10)
    assert not sender.is_alive()  # done while the lock is held (a wait lasts 30 s)
    holder.execute("ROLLBACK")
    assert [m.message_id for m in queue.receive(10, 0)] == ["first", "a", "b"]
    holder.close()


def _delete_queue_file(db: Path) -> None:
    for path in db.parent.glob(db.name + "*"):  # with its -wal, -shm and -spool files
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def test_a_send_after_the_queue_file_was_deleted_or_replaced_fails(db: Path) -> None:
    """SQLite commits into a deleted file it has open (and appends go to a deleted spool
    file): sends "succeeded" and were lost."""
    with SqliteQueue(db) as queue:
        queue.send([msg("before")])
        _delete_queue_file(db)
        with pytest.raises(OutboxError, match=r"was deleted or replaced .* reopen the saver"):
            queue.send([msg("deleted")])
        with SqliteQueue(db) as replacement:
            with pytest.raises(OutboxError, match="was deleted or replaced"):
                queue.send([msg("replaced")])
            assert replacement.receive(10, 0) == []
    with SqliteQueue(db) as reopened:
        reopened.send([msg("reopened")])
        assert [m.message_id for m in reopened.receive(10, 0)] == ["reopened"]


def test_a_send_after_only_the_queue_file_was_replaced_reaches_the_new_one(db: Path) -> None:
    """The new file imports from the same spool directory, from its start: nothing lost."""
    with SqliteQueue(db) as queue:
        queue.send([msg("before")])
        for path in db.parent.glob(db.name + "*"):
            if path.is_file():
                path.unlink()
        with SqliteQueue(db) as replacement:
            queue.send([msg("after")])
            assert [m.message_id for m in replacement.receive(10, 0)] == ["before", "after"]


def test_a_send_after_its_spool_file_alone_was_deleted_fails(db: Path) -> None:
    with SqliteQueue(db) as queue, SqliteQueue(db) as worker:
        queue.send([msg("before")])
        for spool_file in db.parent.glob(f"{db.name}-spool/*/*.log"):
            spool_file.unlink()
        with pytest.raises(OutboxError, match=r"spool file .* was deleted or replaced"):
            queue.send([msg("deleted")])
        assert worker.receive(10, 0) == []


def test_a_receive_after_the_queue_file_was_replaced_fails(db: Path) -> None:
    """A worker kept polling the deleted file and never saw what savers sent to the new one."""
    with SqliteQueue(db) as worker:
        assert worker.receive(10, 0) == []
        _delete_queue_file(db)
        with SqliteQueue(db) as saver:
            saver.send([msg("new")])
            with pytest.raises(OutboxError, match=r"receives nothing sent to the file now"):
                worker.receive(10, 0)


async def test_an_async_send_after_the_queue_file_was_deleted_fails(db: Path) -> None:
    sender = AsyncSqliteSender(SqliteQueue(db))
    await sender.send([msg("before")])
    _delete_queue_file(db)
    results = await asyncio.gather(
        sender.send([msg("a")]), sender.send([msg("b")]), return_exceptions=True
    )
    assert [type(result) for result in results] == [OutboxError, OutboxError]
    await sender.close()


async def test_async_sends_of_one_loop_iteration_share_a_transaction(db: Path) -> None:
    sender = AsyncSqliteSender(SqliteQueue(db))
    await asyncio.gather(
        sender.send([msg("a", "s1")]), sender.send([msg("b", "s2"), msg("c", "s2")])
    )
    await sender.send([msg("d", "s3")])
    received = sender.queue.receive(10, 0)
    times = {m.message_id: m.enqueued_time for m in received}
    assert times["a"] == times["b"] == times["c"] != times["d"]  # one append, then another
    await sender.close()


async def test_async_sends_do_not_wait_for_another_process_and_stay_on_the_loop(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not in a worker thread: there each send would wait for the GIL while the loop is
    busy (6-8 ms a send in the benchmark's graph)."""

    async def no_thread(*_: Any) -> None:
        raise AssertionError("a send went to a worker thread")

    monkeypatch.setattr(asyncio, "to_thread", no_thread)
    sender = AsyncSqliteSender(SqliteQueue(db))
    await sender.send([msg("first", "s")])  # registers the sender's spool file
    holder = _hold_write_lock(db)
    await asyncio.wait_for(
        asyncio.gather(*(sender.send([msg(f"m{i}", "s")]) for i in range(3))), 10
    )
    await asyncio.wait_for(sender.send([msg("m3", "s")]), 10)
    holder.execute("COMMIT")
    received = sender.queue.receive(10, 0)
    assert [m.message_id for m in received] == ["first", "m0", "m1", "m2", "m3"]
    holder.close()
    await sender.close()


async def test_closing_the_async_sender_sends_what_waits(db: Path) -> None:
    sender = AsyncSqliteSender(SqliteQueue(db))
    waiting = sender.send([msg("a")])
    await sender.close()  # before the loop ran the group's send
    await waiting
    with SqliteQueue(db) as queue:
        assert [m.message_id for m in queue.receive(10, 0)] == ["a"]


@pytest.mark.parametrize("closed", [True, False], ids=["loop closed", "loop left open"])
def test_a_send_left_waiting_when_its_loop_ended_goes_out_with_the_next_loop(
    db: Path, closed: bool
) -> None:
    """A send whose loop stopped before the group went out still goes out (as a cancelled
    caller's always does), first, and does not block the next loop's sends."""
    sender = AsyncSqliteSender(SqliteQueue(db))
    first = asyncio.new_event_loop()

    async def send_then_stop() -> None:
        sender.send([msg("left waiting")])
        first.stop()  # before the next iteration, which would send the group
        await asyncio.sleep(3600)

    with pytest.raises(RuntimeError, match="stopped before"):
        first.run_until_complete(send_then_stop())
    if closed:
        first.close()

    async def send_again() -> None:
        await asyncio.wait_for(sender.send([msg("next")]), 10)
        await asyncio.wait_for(sender.close(), 10)

    asyncio.run(send_again())
    with SqliteQueue(db) as queue:
        assert [m.message_id for m in queue.receive(10, 0)] == ["left waiting", "next"]
    first.close()


async def test_a_failing_send_fails_alone_in_its_group(db: Path) -> None:
    sender = AsyncSqliteSender(SqliteQueue(db))
    bad = OutboxMessage(b"x", "bad", "s1", {"not json": object()})  # type: ignore[dict-item]
    results = await asyncio.gather(
        sender.send([msg("a")]), sender.send([bad]), sender.send([msg("b")]), return_exceptions=True
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], TypeError)
    assert sorted(m.message_id for m in sender.queue.receive(10, 0)) == ["a", "b"]
    with pytest.raises(ValueError, match="message_id must not be empty"):
        await sender.send([msg("")])
    await sender.close()


async def test_a_cancelled_group_commit_cancels_its_callers_instead_of_leaving_them_waiting() -> (
    None
):
    groups = SendGroups()
    done = groups.add([msg("a")])
    group, messages = groups.take()

    async def never_answers(_: Any) -> None:
        await asyncio.sleep(3600)

    committing = asyncio.ensure_future(commit(group, messages, never_answers))
    await asyncio.sleep(0)
    committing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(done, 5)
