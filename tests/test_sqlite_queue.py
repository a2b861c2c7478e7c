"""The embedded SQLite outbox keeps Azure Service Bus semantics, across threads and processes."""

from __future__ import annotations

import asyncio
import multiprocessing
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
        time.sleep(0.25)
        q.send([msg("late")])
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


def test_send_is_atomic_when_sqlite_fails_midway_through_a_group(db: Path) -> None:
    """The group's messages go through one statement each: a failure in the third undoes
    the first two, ids and session rows included. It is the connection's first send, so
    the objects that send creates are rolled back too, and the next send makes them again."""
    with sqlite3.connect(db) as other:
        other.executescript(sqlite_queue.SCHEMA)
        other.execute(
            "CREATE TRIGGER refuse_boom BEFORE INSERT ON outbox_messages"
            " WHEN NEW.message_id = 'boom' BEGIN SELECT RAISE(ABORT, 'no boom'); END"
        )
    with SqliteQueue(db) as q:
        with pytest.raises(sqlite3.IntegrityError, match="no boom"):
            q.send([msg("a", "s1"), msg("b", "s2"), msg("boom", "s3")])
        assert q.depth() == 0
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM outbox_dedup").fetchone() == (0,)
            assert conn.execute("SELECT count(*) FROM outbox_sessions").fetchone() == (0,)
        q.send([msg("a", "s1"), msg("b", "s2")])  # their ids were not remembered either
        assert [m.message_id for m in q.receive(10, 0)] == ["a", "b"]


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
    """Older versions sent with plain statements against the same tables; the send
    statement's view and trigger are TEMP objects of the connection that sends, so the
    file's schema stays what those versions (and other processes) know."""
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
        assert receiver._conn.execute(temp_objects).fetchall() == []  # only senders have them
        assert sender._conn.execute(temp_objects).fetchall() == [
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


def test_try_send_refuses_at_once_while_another_connection_holds_the_lock(
    queue: SqliteQueue, db: Path
) -> None:
    holder = _hold_write_lock(db)
    assert queue.try_send([msg("a")]) is False
    holder.execute("ROLLBACK")
    assert queue.depth() == 0
    assert queue.try_send([msg("a")]) is True
    assert [m.message_id for m in queue.receive(10, 0)] == ["a"]
    holder.close()


def test_a_send_waits_for_another_connections_lock_then_lands(queue: SqliteQueue, db: Path) -> None:
    holder = _hold_write_lock(db)
    sender = threading.Thread(target=queue.send, args=([msg("a")],))
    sender.start()
    sender.join(timeout=0.2)
    assert sender.is_alive()  # still waiting for the lock, not failed
    holder.execute("COMMIT")
    sender.join(timeout=10)
    assert [m.message_id for m in queue.receive(10, 0)] == ["a"]
    holder.close()


def _delete_queue_file(db: Path) -> None:
    for path in db.parent.glob(db.name + "*"):  # with its -wal and -shm files
        path.unlink()


def test_a_send_after_the_queue_file_was_deleted_or_replaced_fails(db: Path) -> None:
    """SQLite commits into a deleted file it has open: sends "succeeded" and were lost."""
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
    assert times["a"] == times["b"] == times["c"] != times["d"]  # one commit, then another
    await sender.close()


async def test_async_sends_wait_for_another_process_on_the_loop_without_blocking_it(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not in a worker thread: there each statement waits for the GIL while the loop is
    busy (6-8 ms a send in the benchmark's graph). Sends made while the lock is held join
    the waiting group, so the queue keeps the order they were made in."""

    async def no_thread(*_: Any) -> None:
        raise AssertionError("a send went to a worker thread")

    monkeypatch.setattr(asyncio, "to_thread", no_thread)
    sender = AsyncSqliteSender(SqliteQueue(db))
    holder = _hold_write_lock(db)
    first = asyncio.gather(*(sender.send([msg(f"m{i}", "s")]) for i in range(3)))
    ticks = 0
    while ticks < 50:  # the loop keeps running while the group waits for the lock
        await asyncio.sleep(0.001)
        ticks += 1
    later = asyncio.ensure_future(sender.send([msg("m3", "s")]))
    await asyncio.sleep(0.01)
    assert not first.done() and not later.done()
    holder.execute("COMMIT")
    await asyncio.wait_for(asyncio.gather(first, later), 10)
    received = sender.queue.receive(10, 0)
    assert [m.message_id for m in received] == ["m0", "m1", "m2", "m3"]
    assert len({m.enqueued_time for m in received}) == 1  # one commit once the lock was free
    holder.close()
    await sender.close()


async def test_async_sends_fail_once_another_process_holds_the_lock_too_long(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_queue, "BUSY_TIMEOUT_SECONDS", 0.05)
    sender = AsyncSqliteSender(SqliteQueue(db))
    holder = _hold_write_lock(db)
    with pytest.raises(OutboxError, match="stayed locked by another process"):
        await asyncio.wait_for(sender.send([msg("a")]), 10)
    holder.execute("ROLLBACK")
    await sender.send([msg("b")])  # the sender recovers once the lock is free
    assert [m.message_id for m in sender.queue.receive(10, 0)] == ["b"]
    holder.close()
    await sender.close()


async def test_closing_the_async_sender_commits_what_waits_for_the_lock(db: Path) -> None:
    sender = AsyncSqliteSender(SqliteQueue(db))
    holder = _hold_write_lock(db)
    waiting = asyncio.ensure_future(sender.send([msg("a")]))
    await asyncio.sleep(0.01)
    closing = asyncio.ensure_future(sender.close())
    await asyncio.sleep(0.05)
    assert not closing.done()  # it waits for the lock rather than dropping the send
    holder.execute("COMMIT")
    await asyncio.wait_for(closing, 10)
    await waiting
    holder.close()
    with SqliteQueue(db) as queue:
        assert [m.message_id for m in queue.receive(10, 0)] == ["a"]


async def test_a_send_joining_the_wait_late_gets_its_own_time_before_failing(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_queue, "BUSY_TIMEOUT_SECONDS", 0.5)
    sender = AsyncSqliteSender(SqliteQueue(db))
    holder = _hold_write_lock(db)
    early = asyncio.ensure_future(sender.send([msg("early")]))
    await asyncio.sleep(0.4)
    late = asyncio.ensure_future(sender.send([msg("late")]))
    with pytest.raises(OutboxError, match="stayed locked by another process"):
        await early
    await asyncio.sleep(0.05)
    assert not late.done()  # it has waited ~0.15 s of its 0.5 s
    holder.execute("COMMIT")
    await asyncio.wait_for(late, 10)
    assert [m.message_id for m in sender.queue.receive(10, 0)] == ["late"]
    holder.close()
    await sender.close()


async def test_a_bad_send_in_a_waiting_group_fails_alone_and_the_rest_keep_their_order(
    db: Path,
) -> None:
    sender = AsyncSqliteSender(SqliteQueue(db))
    holder = _hold_write_lock(db)
    bad = OutboxMessage(b"x", "bad", "s1", {"not json": object()})  # type: ignore[dict-item]
    waiting = [asyncio.ensure_future(sender.send([m])) for m in (msg("a"), bad, msg("b"))]
    await asyncio.sleep(0.01)
    holder.execute("COMMIT")
    # The group's next try raises. Whenever "c" is sent, before that or after, it must
    # not overtake "b" (5 ms: while the old code retried each send alone in a thread).
    await asyncio.sleep(0.005)
    after = asyncio.ensure_future(sender.send([msg("c")]))
    results = await asyncio.wait_for(asyncio.gather(*waiting, after, return_exceptions=True), 10)
    assert isinstance(results[1], TypeError)
    assert [m.message_id for m in sender.queue.receive(10, 0)] == ["a", "b", "c"]
    holder.close()
    await sender.close()


async def test_closing_with_sends_behind_a_stuck_lock_takes_one_timeout_not_one_per_send(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_queue, "BUSY_TIMEOUT_SECONDS", 0.3)
    sender = AsyncSqliteSender(SqliteQueue(db))
    holder = _hold_write_lock(db)
    waiting = [asyncio.ensure_future(sender.send([msg(f"m{i}")])) for i in range(20)]
    await asyncio.sleep(0.01)
    started = time.monotonic()
    await asyncio.wait_for(sender.close(), 30)
    assert time.monotonic() - started < 20 * 0.3  # retried one by one, each waited it all
    for outcome in await asyncio.gather(*waiting, return_exceptions=True):
        assert isinstance(outcome, OutboxError)
    holder.close()


@pytest.mark.parametrize("closed", [True, False], ids=["loop closed", "loop left open"])
def test_a_send_left_waiting_when_its_loop_ended_goes_out_with_the_next_loop(
    db: Path, closed: bool
) -> None:
    """A caller that gave up while the lock was held, in a loop that then ended: its send
    still goes out (as a cancelled caller's always does), and it does not block the next."""
    sender = AsyncSqliteSender(SqliteQueue(db))
    holder = _hold_write_lock(db)

    async def give_up() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sender.send([msg("given up")]), 0.05)

    first = asyncio.new_event_loop()
    first.run_until_complete(give_up())
    if closed:
        first.close()
    holder.execute("COMMIT")
    holder.close()

    async def send_again() -> None:
        await asyncio.wait_for(sender.send([msg("next")]), 10)
        await asyncio.wait_for(sender.close(), 10)

    asyncio.run(send_again())
    with SqliteQueue(db) as queue:
        assert [m.message_id for m in queue.receive(10, 0)] == ["given up", "next"]
    first.close()


def test_a_send_whose_loop_closed_under_it_does_not_stop_the_others(db: Path) -> None:
    """Its caller's future can take no result any more; the sends around it still must."""
    sender = AsyncSqliteSender(SqliteQueue(db))
    holder = _hold_write_lock(db)
    first = asyncio.new_event_loop()

    async def send_orphaned() -> None:
        await sender.send([msg("orphaned")])

    orphaned = first.create_task(send_orphaned())
    first.run_until_complete(asyncio.sleep(0.02))
    first.close()  # with the task still waiting for the lock
    assert not orphaned.done()
    holder.execute("COMMIT")
    holder.close()

    async def send_again() -> None:
        await asyncio.wait_for(sender.send([msg("next")]), 10)
        await asyncio.wait_for(sender.close(), 10)

    asyncio.run(send_again())
    with SqliteQueue(db) as queue:
        assert [m.message_id for m in queue.receive(10, 0)] == ["orphaned", "next"]


async def test_a_bad_send_in_a_large_waiting_group_does_not_hold_the_loop(db: Path) -> None:
    """Retried one transaction at a time after the group's commit raised, a few per loop
    iteration."""
    sender = AsyncSqliteSender(SqliteQueue(db))
    iteration = 0

    async def count_iterations() -> None:
        nonlocal iteration
        while True:
            iteration += 1
            await asyncio.sleep(0)

    tries_per_iteration: defaultdict[int, int] = defaultdict(int)
    try_send = sender.queue.try_send

    def counted(messages: Any) -> bool:
        tries_per_iteration[iteration] += 1
        return try_send(messages)

    sender.queue.try_send = counted  # type: ignore[method-assign]
    counter = asyncio.ensure_future(count_iterations())
    holder = _hold_write_lock(db)
    bad = OutboxMessage(b"x", "bad", "s1", {"not json": object()})  # type: ignore[dict-item]
    sends = [msg(f"m{i}") for i in range(500)] + [bad] + [msg(f"n{i}") for i in range(500)]
    waiting = [asyncio.ensure_future(sender.send([m])) for m in sends]
    await asyncio.sleep(0.01)
    holder.execute("COMMIT")
    results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 60)
    counter.cancel()
    assert [type(r) for r in results if r is not None] == [TypeError]
    assert max(tries_per_iteration.values()) <= sqlite_queue.ALONE_PER_ITERATION + 1
    assert sender.queue.depth() == 1000
    holder.close()
    await sender.close()


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
