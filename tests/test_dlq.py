"""``langgraph-kusto dlq``: list, show, replay and purge on both queue backends.

Each backend-parametrized test runs on the SQLite queue and on Azure Service Bus (our
``ServiceBusQueue`` driving the real SDK against ``tests/amqp_broker.py``). The commands
run through ``cli.main`` as a user types them; what the queue holds afterwards is read
from the queue itself (the broker's state, or the SQLite file).

What is proven:

* list / show / replay / purge, with each filter (reason, thread, age, count); before
  each replay and purge, a dry run with the same flags names exactly what the real run
  then does, and changes nothing;
* a replay killed at the worst instant loses nothing: inside the SQLite transaction before
  its commit, and on Service Bus after the copy was sent but before the dead letter was
  completed (the copy's id is the same on the next replay, so duplicate detection drops
  it); and a replay SIGKILLed at a random point of a long run;
* replaying the same dead letters twice leaves one visible copy in Kusto: both copies are
  ingested, and readers see each checkpoint once (``RowId``).

Service Bus dead-letter operations cost ~2 s each against the test broker (the backend
scans the dead-letter queue with a 2 s receive per re-send or delete), so the Service Bus
cases use a handful of dead letters.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from amqp_broker import AmqpTestBroker, QueueSettings
from conftest import DATABASE
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.kusto import KustoSaver
from langgraph.checkpoint.kusto.ingestor_worker import cli
from langgraph.checkpoint.kusto.ingestor_worker import dlq as dlq_module
from langgraph.checkpoint.kusto.ingestor_worker.dlq import (
    ProgressBar,
    format_age,
    parse_age,
)
from langgraph.checkpoint.kusto.ingestor_worker.ingest import KustoIngestor
from langgraph.checkpoint.kusto.ingestor_worker.worker import Worker
from langgraph.checkpoint.kusto.kusto import KustoQueries
from langgraph.checkpoint.kusto.local.kusto_server import LocalKustoServer
from langgraph.checkpoint.kusto.outbox import (
    OutboxError,
    OutboxMessage,
    OutboxQueue,
    ReceivedMessage,
    queue_id,
    replay_message_id,
)
from langgraph.checkpoint.kusto.outbox.servicebus import ServiceBusQueue
from langgraph.checkpoint.kusto.outbox.sqlite import SqliteQueue
from langgraph.checkpoint.kusto.queries import Query
from langgraph.checkpoint.kusto.shared.envelope import Blob, Event, EventKind, encode_event
from langgraph.checkpoint.kusto.shared.framing import encode_frame, split_frames

CLI = [sys.executable, "-m", "langgraph.checkpoint.kusto.ingestor_worker.cli"]
SECRET = b"SECRET-USER-STATE-4711"


# --- backends --------------------------------------------------------------------------------


@dataclass
class Backend:
    """One fresh queue, its URL as a user passes it, and what the queue holds (read from
    the queue's own state, not through the code under test)."""

    name: str
    url: str
    active: Callable[[], list[tuple[str, bytes]]]
    """(message id, body) of the active messages, in sequence order."""
    dead: Callable[[], list[tuple[int, str, bytes]]]
    """(sequence number, message id, body) of the dead letters, in sequence order."""

    def open(self) -> OutboxQueue:
        if self.name == "sqlite":
            return SqliteQueue.from_url(self.url, duplicate_detection_window=600.0)
        return ServiceBusQueue.from_url(self.url, lock_renewal=0.0)


@pytest.fixture(scope="module")
def broker() -> Iterator[AmqpTestBroker]:
    with AmqpTestBroker({}) as running:
        yield running


def _sqlite_backend(tmp_path: Path) -> Backend:
    path = tmp_path / "outbox.db"
    SqliteQueue(path).close()

    def select(sql: str) -> list[Any]:
        with sqlite3.connect(path) as conn:
            return conn.execute(sql).fetchall()

    def active() -> list[tuple[str, bytes]]:
        rows = select("SELECT message_id, body FROM outbox_messages ORDER BY seq")
        return [(str(i), bytes(b)) for i, b in rows]

    def dead() -> list[tuple[int, str, bytes]]:
        rows = select("SELECT seq, message_id, body FROM outbox_dead_letters ORDER BY seq")
        return [(int(s), str(i), bytes(b)) for s, i, b in rows]

    return Backend("sqlite", f"sqlite:///{path}", active, dead)


def _broker_backend(broker: AmqpTestBroker) -> Backend:
    name = f"q{uuid.uuid4().hex[:10]}"
    broker.add_queue(name, QueueSettings())

    def active() -> list[tuple[str, bytes]]:
        return [(str(m.message_id), m.body_bytes) for m in broker.active(name)]

    def dead() -> list[tuple[int, str, bytes]]:
        return [
            (m.sequence_number, str(m.message_id), m.body_bytes) for m in broker.dead_letters(name)
        ]

    return Backend("servicebus", broker.connection_string(name), active, dead)


@pytest.fixture(params=["sqlite", "servicebus"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return _sqlite_backend(tmp_path)
    return _broker_backend(request.getfixturevalue("broker"))


# --- messages and dead letters ---------------------------------------------------------------


def event_messages(
    thread_id: str, *, kind: EventKind = EventKind.PUT, parts: int = 1
) -> list[OutboxMessage]:
    """The queue messages of one event, framed as the saver frames them."""
    event_id = uuid.uuid4().hex
    blob = Blob("messages", "1", "msgpack", SECRET + os.urandom(600 * parts))
    event = Event(
        kind,
        event_id,
        time.time_ns(),
        time.time(),
        thread_id,
        checkpoint_id=str(uuid6()),
        checkpoint_type="msgpack",
        checkpoint_data=SECRET,
        metadata={"source": "loop", "step": 4, "user_note": "private"},
        blobs=(blob,) if kind is EventKind.PUT else (),
    )
    envelope = encode_event(event)
    size = len(envelope) // parts + 300 if parts > 1 else 1 << 20
    frames = split_frames(event_id, envelope, size)
    assert len(frames) == parts
    return [
        OutboxMessage(encode_frame(f), f.message_id, thread_id, {"kind": kind.value, "part": i})
        for i, f in enumerate(frames)
    ]


def poison(thread_id: str) -> OutboxMessage:
    return OutboxMessage(os.urandom(40), f"poison-{uuid.uuid4().hex[:8]}", thread_id, {})


def receive_exactly(queue: OutboxQueue, count: int) -> list[ReceivedMessage]:
    got: list[ReceivedMessage] = []
    deadline = time.monotonic() + 20
    while len(got) < count and time.monotonic() < deadline:
        got += queue.receive(count - len(got), 1.0)
    assert len(got) == count, f"received {len(got)} of {count}"
    return sorted(got, key=lambda m: m.sequence_number)


def seed(backend: Backend, entries: list[tuple[OutboxMessage, str]]) -> None:
    """Publish the messages, then dead-letter each with its reason, as a worker would."""
    reasons = {queue_id(m.message_id): reason for m, reason in entries}
    queue = backend.open()
    try:
        queue.send([m for m, _ in entries])
        for message in receive_exactly(queue, len(entries)):
            reason = reasons[message.message_id]
            queue.dead_letter(message, reason, f"{reason} for {message.message_id}")
    finally:
        queue.close()


def dlq(capsys: pytest.CaptureFixture[str], backend: Backend, *args: str) -> tuple[int, str, str]:
    action, *rest = args
    code = cli.main(["dlq", action, "--queue", backend.url, *rest])
    out, err = capsys.readouterr()
    return code, out, err


def table(out: str) -> list[dict[str, str]]:
    """The rows of ``dlq list`` (or a dry run) as dicts keyed by the header."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("SEQ "))
    header = lines[start].split()
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows.append(dict(zip(header, line.split(), strict=True)))
    return rows


def seqs(out: str) -> list[int]:
    return [int(row["SEQ"]) for row in table(out)]


# --- list ------------------------------------------------------------------------------------


def test_list_shows_reason_thread_kind_age_and_deliveries_with_each_filter(
    backend: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    [put] = event_messages("thread-a")
    [writes] = event_messages("thread-b", kind=EventKind.PUT_WRITES)
    bad = poison("thread-c")
    seed(backend, [(put, "IngestionRejected"), (writes, "MaxDeliveryCountExceeded"), (bad, "X")])

    code, out, err = dlq(capsys, backend, "list")

    assert (code, err) == (0, "")
    rows = table(out)
    assert [(r["REASON"], r["THREAD"], r["KIND"], r["DELIVERIES"]) for r in rows] == [
        ("IngestionRejected", "thread-a", "put", "1"),
        ("MaxDeliveryCountExceeded", "thread-b", "put_writes", "1"),
        ("X", "thread-c", "-", "1"),
    ]
    assert all(r["AGE"] in ("0s", "1s", "2s", "3s") for r in rows)
    assert "3 dead letter(s)" in out
    everything = seqs(out)

    assert seqs(dlq(capsys, backend, "list", "--reason", "X")[1]) == [everything[2]]
    assert seqs(dlq(capsys, backend, "list", "--thread", "thread-b")[1]) == [everything[1]]
    assert seqs(dlq(capsys, backend, "list", "--limit", "2")[1]) == everything[:2]
    assert seqs(dlq(capsys, backend, "list", "--older-than", "0s")[1]) == everything
    code, out, _ = dlq(capsys, backend, "list", "--older-than", "1h")
    assert (code, out.strip()) == (0, f"no dead letters match the filters in {_where(backend)}")


def _where(backend: Backend) -> str:
    return backend.url.replace("not-a-secret", "***")


def test_list_filters_a_long_thread_id_by_the_id_the_user_knows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = _sqlite_backend(tmp_path)
    long_thread = "tenant-42/" + "x" * 200
    seed(backend, [(m, "R") for m in event_messages(long_thread)])
    seed(backend, [(m, "R") for m in event_messages("short")])

    rows = table(dlq(capsys, backend, "list", "--thread", long_thread)[1])

    assert [r["THREAD"][:7] for r in rows] == ["sha256:"]


# --- show ------------------------------------------------------------------------------------


def test_show_prints_the_envelope_but_the_payload_only_when_asked(
    backend: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    [put] = event_messages("thread-a")
    chunked = event_messages("thread-b", parts=3)
    bad = poison("thread-c")
    seed(backend, [(put, "IngestionRejected"), *((m, "Chunky") for m in chunked), (bad, "Bad")])
    first, second, _, _, last = seqs(dlq(capsys, backend, "list")[1])

    code, out, err = dlq(capsys, backend, "show", str(first))

    assert (code, err) == (0, "")
    assert "reason            IngestionRejected" in out
    assert "description       IngestionRejected for " in out
    assert "thread (session)  thread-a" in out
    assert "part 1 of 1" in out
    for field in ("kind           put", "thread id      thread-a", "blobs          1,"):
        assert field in out
    assert "metadata       source=loop, step=4; other keys: user_note" in out
    assert "private" not in out, "a user's metadata value was printed"
    assert SECRET.decode() not in out
    assert base64.b64encode(put.body).decode()[:40] not in out
    assert "payload: not shown" in out

    code, out, _ = dlq(capsys, backend, "show", str(first), "--payload")
    assert code == 0
    encoded = out.split("payload (the message body, base64):\n", 1)[1]
    assert base64.b64decode("".join(encoded.split())) == put.body

    out = dlq(capsys, backend, "show", str(second))[1]
    assert "part 1 of 3" in out and "envelope (joined from 3 parts):" in out
    assert "thread id      thread-b" in out

    out = dlq(capsys, backend, "show", str(last))[1]
    assert "frame: none (MalformedEnvelope:" in out

    code, out, err = dlq(capsys, backend, "show", "987654")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "no dead letter with sequence number 987654" in err


# --- replay and purge ------------------------------------------------------------------------


def _seed_two_waves(backend: Backend) -> tuple[dict[str, OutboxMessage], float]:
    """a1 (thread-a, R1) and b1 (thread-b, R2), then a2 (thread-a, R2), b2 (thread-b, R1)
    and c (thread-c, R1); returns the messages and a moment between the two waves."""
    msgs = {
        "a1": event_messages("thread-a")[0],
        "b1": event_messages("thread-b")[0],
        "a2": event_messages("thread-a")[0],
        "b2": event_messages("thread-b")[0],
        "c": event_messages("thread-c")[0],
    }
    seed(backend, [(msgs["a1"], "R1"), (msgs["b1"], "R2")])
    time.sleep(0.2)
    between = time.time()
    time.sleep(0.2)
    seed(backend, [(msgs["a2"], "R2"), (msgs["b2"], "R1"), (msgs["c"], "R1")])
    return msgs, between


@pytest.fixture
def an_hour_after(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """Make the dlq commands see the clock an hour after ``moment``, so that
    ``--older-than 1h`` selects what was dead-lettered before it, without waiting."""

    def set_clock(moment: float) -> None:
        monkeypatch.setattr(dlq_module, "time", SimpleNamespace(time=lambda: moment + 3600))

    return set_clock


def _names(msgs: dict[str, OutboxMessage], bodies: list[bytes]) -> list[str]:
    by_body = {m.body: name for name, m in msgs.items()}
    return [by_body[b] for b in bodies]


# Applied in order: each step acts on what the steps before it left.
STEPS = [
    (("--older-than", "1h"), ["a1", "b1"]),
    (("--thread", "thread-a"), ["a2"]),
    (("--reason", "R1", "--limit", "1"), ["b2"]),
]


def _dry_run(
    capsys: pytest.CaptureFixture[str],
    backend: Backend,
    action: str,
    flags: tuple[str, ...],
    msgs: dict[str, OutboxMessage],
) -> list[str]:
    """Run ``action`` with ``--dry-run``: check that nothing changed; return what it named."""
    dead, active = backend.dead(), backend.active()
    by_seq = {seq: body for seq, _, body in dead}

    code, out, _ = dlq(capsys, backend, action, *flags, "--dry-run")

    assert code == 0
    assert "nothing was changed" in out
    assert (backend.dead(), backend.active()) == (dead, active), "a dry run changed the queue"
    named = _names(msgs, [by_seq[s] for s in seqs(out)])
    assert f"dry run: would {action} {len(named)} dead letter(s)" in out
    return named


def test_replay_with_each_filter_resends_exactly_the_selected_dead_letters(
    backend: Backend,
    capsys: pytest.CaptureFixture[str],
    an_hour_after: Callable[[float], None],
) -> None:
    msgs, between = _seed_two_waves(backend)
    an_hour_after(between)
    replayed: list[str] = []
    for flags, expected in [*STEPS, ((), ["c"])]:
        assert sorted(_dry_run(capsys, backend, "replay", flags, msgs)) == sorted(expected)
        dead_before = {seq: mid for seq, mid, _ in backend.dead()}

        code, out, err = dlq(capsys, backend, "replay", *flags)

        assert code == 0, err
        assert f"replayed {len(expected)} dead letter(s)" in out
        replayed += expected
        active = backend.active()
        assert sorted(_names(msgs, [b for _, b in active])) == sorted(replayed)
        dead_after = {seq for seq, _, _ in backend.dead()}
        moved = {replay_message_id(mid, s) for s, mid in dead_before.items() if s not in dead_after}
        assert len(moved) == len(expected) and moved <= {m for m, _ in active}
        assert sorted(_names(msgs, [b for _, _, b in backend.dead()])) == sorted(
            set(msgs) - set(replayed)
        )
    assert dlq(capsys, backend, "replay")[1].startswith("no dead letters in")


def test_purge_with_each_filter_deletes_exactly_the_selected_dead_letters(
    backend: Backend,
    capsys: pytest.CaptureFixture[str],
    an_hour_after: Callable[[float], None],
) -> None:
    msgs, between = _seed_two_waves(backend)
    an_hour_after(between)
    purged: list[str] = []
    for flags, expected in STEPS:
        assert sorted(_dry_run(capsys, backend, "purge", flags, msgs)) == sorted(expected)

        code, out, err = dlq(capsys, backend, "purge", *flags)

        assert code == 0, err
        assert f"purged {len(expected)} dead letter(s)" in out
        purged += expected
        left = _names(msgs, [b for _, _, b in backend.dead()])
        assert sorted(left) == sorted(set(msgs) - set(purged))
        assert backend.active() == []

    code, out, err = dlq(capsys, backend, "purge")
    assert code == 2 and "--all" in err and err.count("\n") == 1
    assert _names(msgs, [b for _, _, b in backend.dead()]) == ["c"]

    assert _dry_run(capsys, backend, "purge", ("--all",), msgs) == ["c"]
    assert dlq(capsys, backend, "purge", "--all")[0] == 0
    assert backend.dead() == [] and backend.active() == []


def test_replay_never_splits_a_chunked_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = _sqlite_backend(tmp_path)
    parts = event_messages("thread-a", parts=3)
    seed(backend, [(m, "IncompleteChunkGroup") for m in parts])
    seed(backend, [(m, "R") for m in event_messages("thread-b")])

    code, out, _ = dlq(capsys, backend, "replay", "--limit", "1")

    assert code == 0
    assert "replayed 3 dead letter(s)" in out
    assert "2 more part(s) of chunked events came along" in out
    assert sorted(b for _, b in backend.active()) == sorted(m.body for m in parts)


def test_bad_flags_are_one_line_errors(tmp_path: Path) -> None:
    backend = _sqlite_backend(tmp_path)
    (tmp_path / "relative.db").touch()
    cases = [
        (["dlq", "replay", "--queue", backend.url, "--older-than", "soon"], "is not understood"),
        (["dlq", "purge", "--queue", backend.url, "--limit", "0"], "must be at least 1"),
        (["dlq", "list", "--queue", f"sqlite:///{tmp_path}/missing.db"], "no queue file at"),
        (["dlq", "list", "--queue", "redis://x"], "is not supported"),
        (
            ["dlq", "list", "--queue", "sqlite:relative.db"],
            "Not a SQLite queue URL: 'sqlite:relative.db'. Expected sqlite:///relative/path.db",
        ),
        (
            ["dlq", "list", "-v"],
            "langgraph-kusto dlq list: unrecognized arguments: -v "
            "(see `langgraph-kusto dlq list --help`)",
        ),
    ]
    for argv, message in cases:
        result = subprocess.run(
            [*CLI, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "missing.db").exists()


def test_a_file_that_is_not_a_queue_is_a_one_line_error(tmp_path: Path) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello\n")

    result = subprocess.run(
        [*CLI, "dlq", "list", "--queue", f"sqlite:///{text_file}"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert result.stderr == (
        f"langgraph-kusto: cannot open the queue file {text_file}: file is not a database\n"
    )


def test_a_database_that_is_not_a_queue_is_refused_and_left_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app_db = tmp_path / "app.db"
    with closing(sqlite3.connect(app_db)) as conn:
        conn.execute("CREATE TABLE users (id INTEGER)")
        conn.commit()
    before = app_db.read_bytes()

    for argv in (["list"], ["show", "1"], ["purge", "--all"], ["replay"]):
        code = cli.main(["dlq", *argv, "--queue", f"sqlite:///{app_db}"])
        out, err = capsys.readouterr()

        assert (code, out) == (1, "")
        assert err == (
            f"langgraph-kusto: cannot open the queue file {app_db}: it is a SQLite database "
            "without the outbox tables, not a queue\n"
        )
    # Not a byte changed (no outbox tables, no switch to WAL), and no -wal or -shm file.
    assert app_db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


def test_a_queue_name_the_file_does_not_hold_names_the_ones_it_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = _sqlite_backend(tmp_path)
    seed(backend, [(poison("thread-a"), "Poison"), (poison("thread-b"), "Poison")])
    with SqliteQueue(tmp_path / "outbox.db", "audit") as audit:
        audit.send([poison("thread-c")])
    mistyped = f"{backend.url}?queue=event"

    code = cli.main(["dlq", "list", "--queue", mistyped])
    out, err = capsys.readouterr()

    assert (code, out) == (2, "")
    assert err == (
        f"langgraph-kusto: the queue file {tmp_path / 'outbox.db'} holds no queue named "
        f"'event', only 'audit', 'events' (from the queue URL {mistyped!r}; choose one "
        "with ?queue=<name>)\n"
    )
    # A queue file that holds no queue yet is an empty queue under any name.
    empty = _sqlite_backend(tmp_path / "fresh")
    code = cli.main(["dlq", "list", "--queue", f"{empty.url}?queue=other"])
    assert (code, capsys.readouterr().out) == (0, f"no dead letters in {empty.url}?queue=other\n")


def test_a_queue_file_an_earlier_version_wrote_is_still_a_queue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Versions before the spool files made no ``outbox_spool`` table; ``dlq`` said such a
    file was "without the outbox tables, not a queue" until this version opened it."""
    backend = _sqlite_backend(tmp_path)
    seed(backend, [(poison("thread-a"), "Poison")])
    with closing(sqlite3.connect(tmp_path / "outbox.db")) as conn:
        conn.execute("DROP TABLE outbox_spool")
        conn.commit()

    code = cli.main(["dlq", "list", "--queue", backend.url])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert [row["THREAD"] for row in table(out)] == ["thread-a"]

    mistyped = f"{backend.url}?queue=event"
    assert cli.main(["dlq", "list", "--queue", mistyped]) == 2
    assert "holds no queue named 'event', only 'events'" in capsys.readouterr().err


def test_a_directory_is_named_as_such_as_the_worker_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "adir"
    directory.mkdir()
    with pytest.raises(OutboxError) as opening:
        SqliteQueue(directory)

    code = cli.main(["dlq", "list", "--queue", f"sqlite:///{directory}"])
    out, err = capsys.readouterr()

    assert (code, out) == (1, "")
    assert err == f"langgraph-kusto: {opening.value}\n"
    assert err.endswith(": it is a directory\n")


def test_an_empty_thread_id_is_a_one_line_error(tmp_path: Path) -> None:
    backend = _sqlite_backend(tmp_path)
    seed(backend, [(poison("thread-a"), "Poison")])

    for action in ("list", "replay", "purge"):
        result = subprocess.run(
            [*CLI, "dlq", action, "--queue", backend.url, "--thread", ""],
            capture_output=True,
            text=True,
            timeout=60,
        )

        assert result.returncode == 2
        assert result.stderr == (
            f"langgraph-kusto dlq {action}: argument --thread: must not be empty "
            f"(see `langgraph-kusto dlq {action} --help`)\n"
        )
    assert len(backend.dead()) == 1


def test_show_refuses_a_sequence_number_no_queue_can_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = _sqlite_backend(tmp_path)
    seed(backend, [(poison("thread-a"), "Poison")])
    largest = 2**63 - 1

    for number in (largest + 1, -1):
        result = subprocess.run(
            [*CLI, "dlq", "show", "--queue", backend.url, "--", str(number)],
            capture_output=True,
            text=True,
            timeout=60,
        )

        assert result.returncode == 2
        assert result.stderr == (
            f"langgraph-kusto dlq show: argument SEQ: must be a sequence number from 0 to "
            f"{largest}, got {number} (see `langgraph-kusto dlq show --help`)\n"
        )
    code, out, err = dlq(capsys, backend, "show", str(largest))
    assert (code, out) == (2, "")
    assert err.startswith(f"langgraph-kusto: no dead letter with sequence number {largest} in ")


def _more_than_a_scan(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> list[OutboxMessage]:
    """Five dead letters of five threads, with a scan limit of three."""
    monkeypatch.setattr(dlq_module, "SCAN_LIMIT", 3)
    messages = [poison(f"thread-{i}") for i in range(5)]
    seed(backend, [(m, "Poison") for m in messages])
    return messages


def test_show_finds_a_dead_letter_past_the_scan_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = _sqlite_backend(tmp_path)
    _more_than_a_scan(backend, monkeypatch)
    newest = max(seq for seq, _, _ in backend.dead())

    code, out, err = dlq(capsys, backend, "show", str(newest))

    assert (code, err) == (0, "")
    assert f"sequence number   {newest}" in out
    assert "thread (session)  thread-4" in out


def test_show_past_the_scan_limit_of_a_store_without_lookup_says_so(
    broker: AmqpTestBroker, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = _broker_backend(broker)
    _more_than_a_scan(backend, monkeypatch)
    newest = max(seq for seq, _, _ in backend.dead())

    code, out, err = dlq(capsys, backend, "show", str(newest))

    assert (code, out) == (2, "")
    assert err == (
        f"langgraph-kusto: no dead letter with sequence number {newest} in {_where(backend)} "
        "among the oldest 3 (the scan limit); `langgraph-kusto dlq list` shows the ones "
        "there are\n"
    )


def test_purge_of_a_thread_past_the_scan_limit_says_matches_were_not_looked_at(
    backend: Backend, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _more_than_a_scan(backend, monkeypatch)

    code, out, err = dlq(capsys, backend, "purge", "--thread", "thread-4")

    assert (code, err) == (0, "")
    assert "no dead letters match the filters" in out
    assert (
        "note: only the oldest 3 dead letters were examined; newer ones, matching or not, "
        "were not looked at: handle (replay or purge) the oldest, then run the command again"
    ) in out
    assert len(backend.dead()) == 5


def test_age_parsing_and_formatting() -> None:
    assert [parse_age(t) for t in ("45s", "10m", "2h", "1d", "1w", "1h30m")] == [
        45,
        600,
        7200,
        86400,
        604800,
        5400,
    ]
    for bad in ("", "10", "m", "1.5h", "10 m", "-1h", "1y"):
        with pytest.raises(ValueError, match="is not understood"):
            parse_age(bad)
    assert [format_age(s) for s in (5, 600, 5400, 90000)] == ["5s", "10m", "1h30m", "1d01h"]


def test_progress_bar_redraws_on_a_terminal_and_logs_quarters_elsewhere() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    bar = ProgressBar("replay", 4, terminal)
    for _ in range(4):
        bar.advance()
    assert terminal.getvalue().split("\r")[1:] == [
        "replay [#######.......................] 1/4",
        "replay [###############...............] 2/4",
        "replay [######################........] 3/4",
        "replay [##############################] 4/4\n",
    ]
    log = io.StringIO()
    bar = ProgressBar("purge", 8, log)
    for _ in range(8):
        bar.advance()
    assert log.getvalue().splitlines() == ["purge: 2/8", "purge: 4/8", "purge: 6/8", "purge: 8/8"]


# --- a replay killed midway ------------------------------------------------------------------

# Runs `dlq replay` and dies (os._exit, no cleanup) in the middle of the DIE_AT-th re-send,
# at the worst instant each backend has: SQLite inside the transaction, before its commit;
# Service Bus after the copy was sent, before the dead letter is completed.
DYING_REPLAY = """
import os, sys
from contextlib import contextmanager
from langgraph.checkpoint.kusto.ingestor_worker import cli

url, die_at = sys.argv[1], int(sys.argv[2])
calls = 0

def count_and_maybe_die():
    global calls
    calls += 1
    if calls == die_at:
        os._exit(9)

if url.startswith("sqlite:"):
    from langgraph.checkpoint.kusto.outbox.sqlite import SqliteQueue
    transaction = SqliteQueue._transaction

    @contextmanager
    def dying_transaction(self):
        with transaction(self) as conn:
            yield conn
            count_and_maybe_die()

    SqliteQueue._transaction = dying_transaction
else:
    from azure.servicebus import ServiceBusReceiver
    complete = ServiceBusReceiver.complete_message

    def dying_complete(self, message):
        count_and_maybe_die()
        return complete(self, message)

    ServiceBusReceiver.complete_message = dying_complete

sys.exit(cli.main(["dlq", "replay", "--queue", url]))
"""


def test_replay_killed_mid_resend_loses_nothing_and_a_second_replay_adds_no_copy(
    backend: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    entries = [(event_messages("thread-a")[0], "R") for _ in range(4)]
    seed(backend, entries)
    originals = {m.body for m, _ in entries}
    dead_ids = {seq: mid for seq, mid, _ in backend.dead()}

    died = subprocess.run(
        [*CLI[:1], "-c", DYING_REPLAY, backend.url, "2"], capture_output=True, timeout=120
    )

    assert died.returncode == 9, died.stderr.decode()
    dead = {body for _, _, body in backend.dead()}
    active = [body for _, body in backend.active()]
    assert originals == dead | set(active), "a message was lost"
    if backend.name == "sqlite":
        # The second re-send was rolled back with its transaction: exactly one copy each.
        assert len(active) == 1 and len(dead) == 3 and not dead & set(active)
    else:
        # The second copy was sent, its dead letter not completed: it is in both places.
        assert len(active) == 2 and len(dead) == 3 and len(dead & set(active)) == 1

    code, _, err = dlq(capsys, backend, "replay")

    assert code == 0, err
    assert backend.dead() == []
    final = backend.active()
    assert sorted(b for _, b in final) == sorted(originals), "lost or doubled after re-replay"
    assert {m for m, _ in final} == {replay_message_id(mid, s) for s, mid in dead_ids.items()}


def test_replay_sigkilled_at_a_random_point_loses_nothing(tmp_path: Path) -> None:
    backend = _sqlite_backend(tmp_path)
    total = 2000
    seed(backend, [(poison(f"thread-{i % 50}"), "R") for i in range(total)])
    originals = sorted(body for _, _, body in backend.dead())
    process = subprocess.Popen(
        [*CLI, "dlq", "replay", "--queue", backend.url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        assert line.startswith("replay: "), line
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    dead = [body for _, _, body in backend.dead()]
    active = [body for _, body in backend.active()]
    assert 0 < len(dead) < total, "the kill did not land mid-replay"
    assert sorted(dead + active) == originals, "lost or doubled by the kill"

    result = subprocess.run(
        [*CLI, "dlq", "replay", "--queue", backend.url], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert backend.dead() == []
    assert sorted(b for _, b in backend.active()) == originals


# --- replaying twice, seen once in Kusto -----------------------------------------------------

ROWS_OF_THREAD = """\
declare query_parameters(thread_id:string);
CheckpointEvents
| where ThreadId == thread_id
| summarize Rows = count(), RowIds = dcount(RowId)"""


def _drain(queue_url: str, server: LocalKustoServer) -> None:
    """Run a worker until the queue is empty (everything ingested and completed)."""
    queue = SqliteQueue.from_url(queue_url)
    ingestor = KustoIngestor(server.url, DATABASE)
    stop = threading.Event()
    runner = threading.Thread(
        target=Worker(queue, ingestor, max_wait=0.05).run, args=(stop,), daemon=True
    )
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while queue.depth() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert queue.depth() == 0, "the worker did not drain the queue"
    finally:
        stop.set()
        runner.join(timeout=10)
        ingestor.close()
        queue.close()


def _dead_letter_everything(queue_url: str, reason: str) -> list[ReceivedMessage]:
    queue = SqliteQueue.from_url(queue_url)
    try:
        received = receive_exactly(queue, queue.depth())
        for message in received:
            queue.dead_letter(message, reason, "Kusto refused the rows (simulated)")
        return received
    finally:
        queue.close()


def test_replaying_the_same_dead_letters_twice_leaves_one_visible_copy_in_kusto(
    kusto_server: LocalKustoServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = _sqlite_backend(tmp_path)
    thread_id = f"twice-{uuid.uuid4().hex[:8]}"
    config: Any = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    with KustoSaver.from_conn_string(
        backend.url, kusto_server.url, DATABASE, consistency="eventual"
    ) as saver:
        for step in range(3):
            checkpoint = empty_checkpoint()
            checkpoint["channel_values"] = {"step": step}
            versions = {"step": saver.get_next_version(None, None)}
            checkpoint["channel_versions"] = versions
            config = saver.put(config, checkpoint, {"source": "loop", "step": step}, versions)
            saver.put_writes(config, [("step", step + 1)], task_id=f"task-{step}")
    failed = _dead_letter_everything(backend.url, "IngestionRejected")

    assert dlq(capsys, backend, "replay")[0] == 0
    _drain(backend.url, kusto_server)
    # What Service Bus leaves when a replay dies between sending a copy and completing the
    # dead letter, once the duplicate-detection window has passed: the same dead letters.
    again = SqliteQueue.from_url(backend.url, duplicate_detection_window=0.0)
    try:
        again.send(
            [
                OutboxMessage(m.body, m.message_id, m.session_id, m.application_properties)
                for m in failed
            ]
        )
    finally:
        again.close()
    _dead_letter_everything(backend.url, "IngestionRejected")
    assert dlq(capsys, backend, "replay")[0] == 0
    _drain(backend.url, kusto_server)

    queries = KustoQueries(kusto_server.url, DATABASE)
    try:
        [counts] = queries.run(Query(ROWS_OF_THREAD, {"thread_id": thread_id}))
    finally:
        queries.close()
    assert counts["Rows"] == 2 * counts["RowIds"] > 0, "both replays must have been ingested"
    with KustoSaver.from_conn_string(
        backend.url, kusto_server.url, DATABASE, consistency="eventual"
    ) as reader:
        listed = list(reader.list({"configurable": {"thread_id": thread_id}}))
        latest = reader.get_tuple({"configurable": {"thread_id": thread_id}})
    ids = [t.checkpoint["id"] for t in listed]
    assert len(ids) == 3 and len(set(ids)) == 3, "a reader saw a checkpoint twice"
    assert latest is not None and latest.checkpoint["channel_values"] == {"step": 2}
    assert [len(t.pending_writes or []) for t in listed] == [1, 1, 1]
