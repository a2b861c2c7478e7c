"""The embedded outbox: one SQLite file in WAL mode with Azure Service Bus semantics.

It lets local mode run the same saver and worker code as Azure: peek-lock with expiry and
renewal, delivery counts, max delivery -> dead letter, sessions (FIFO per session id, one
consumer per session at a time) and duplicate detection by message id. Several processes
may open the same file; every state change runs in a ``BEGIN IMMEDIATE`` transaction, so
SQLite's single writer lock serialises them and no message is handed out twice. Senders
append to spool files instead (``spool``); consumers import them in those transactions.

Delivery count convention: ``ReceivedMessage.delivery_count`` is **0 on the first
delivery** and grows by one on each redelivery (after abandon or lock expiry). That is what
``azure.servicebus.ServiceBusReceivedMessage.delivery_count`` reports: in azure-servicebus
7.15.0 (``azure/servicebus/_common/message.py``) the property returns the AMQP header's
``delivery_count`` unchanged, which the AMQP spec defines as "the number of prior
unsuccessful delivery attempts"; Service Bus puts (its own 1-based count - 1) there, and the
SDK's live tests (``sdk/servicebus/azure-servicebus/tests/test_queues.py``) assert
``message.delivery_count == 0`` on a first receive. (.NET and Java add 1 and start at 1.)
Matching Python keeps the worker's retry arithmetic identical on both backends. As in
Service Bus, a message is delivered at most ``max_delivery_count`` times; the attempt after
that dead-letters it. A ``DeadLetter.delivery_count`` counts the deliveries that failed,
i.e. all of them.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self
from urllib.parse import parse_qs, unquote, urlsplit

from . import (
    MAX_DELIVERY_COUNT_EXCEEDED,
    DeadLetter,
    LockLostError,
    OutboxError,
    OutboxMessage,
    ReceivedMessage,
    replay_message_id,
)
from .grouping import SendGroups, nothing_to_send, settle
from .spool import (
    MAX_SPOOL_FILE_BYTES,
    SPOOL_SUFFIX,
    SpoolReader,
    SpoolRecord,
    SpoolWriter,
    encode_record,
    require_posix,
    sender_gone,
    spool_directory,
)

__all__ = ["AsyncSqliteSender", "SqliteQueue", "SqliteUrl", "parse_url"]

logger = logging.getLogger("langgraph.checkpoint.kusto.outbox.sqlite")

BUSY_TIMEOUT_SECONDS = 30.0
"""How long a transaction waits for another process's write lock before giving up."""

LOCK_RETRY_FIRST_DELAY, LOCK_RETRY_MAX_DELAY = 0.00005, 0.002
"""Backoff while another process holds a lock. SQLite's own busy handler sleeps 1, 2, 5,
10 ms... even when another consumer's transaction frees the lock in microseconds."""

MAX_IMPORT_BYTES = 16 << 20
"""Spooled bytes one import takes at most (or one record, if larger): a consumer that
comes back to a large backlog imports it over several transactions, not all in memory."""

DEDUP_PRUNE_INTERVAL = 1.0
"""Seconds between deletions of duplicate-detection ids older than the window."""

DEFAULT_WAL_AUTOCHECKPOINT = 1_000
"""WAL pages after which a commit copies the log back into the database (SQLite's
``wal_autocheckpoint``)."""

POLL_FIRST_DELAY = 0.005
POLL_MAX_DELAY = 0.05


URL_FORM = "sqlite:///relative/path.db or sqlite:////absolute/path.db, optionally ?queue=name"
URL_PREFIX = "sqlite:///"


class SqliteUrl(NamedTuple):
    """What a queue URL names: the database file and the queue in it."""

    path: Path
    queue: str


def parse_url(url: str) -> SqliteUrl:
    """The file and queue of a ``sqlite:///path.db[?queue=name]`` URL, else ``ValueError``.

    Three slashes then a relative path, four for an absolute one (the SQLAlchemy
    convention), so the same setting works in a config file and on the command line.
    Every other spelling is refused: ``sqlite:q.db`` or ``sqlite:/tmp/q.db`` would otherwise
    name a different file than the user meant, and an app and its worker could silently
    use different queues.
    """
    parts = urlsplit(url)
    if not url.startswith(URL_PREFIX) or parts.fragment:
        raise ValueError(f"Not a SQLite queue URL: {url!r}. Expected {URL_FORM}.")
    path = unquote(parts.path).removeprefix("/")
    if not path or path.endswith("/"):
        raise ValueError(f"No database file in queue URL {url!r}. Expected {URL_FORM}.")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as error:
        raise ValueError(f"Bad query in queue URL {url!r}. Expected {URL_FORM}.") from error
    unknown = sorted(set(query) - {"queue"})
    if unknown:
        raise ValueError(
            f"Unknown option(s) {', '.join(unknown)} in queue URL {url!r}. Expected {URL_FORM}."
        )
    queues = query.get("queue", ["events"])
    if len(queues) != 1 or not queues[0]:
        raise ValueError(f"Give exactly one non-empty queue name in {url!r}. Expected {URL_FORM}.")
    return SqliteUrl(Path(path), queues[0])


SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox_messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    message_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    body BLOB NOT NULL,
    properties TEXT NOT NULL,
    enqueued_time REAL NOT NULL,
    delivery_count INTEGER NOT NULL DEFAULT 0,
    lock_token TEXT,
    locked_by TEXT,
    locked_until REAL
);
CREATE INDEX IF NOT EXISTS outbox_messages_by_session
    ON outbox_messages (queue, session_id, seq);
CREATE TABLE IF NOT EXISTS outbox_sessions (
    queue TEXT NOT NULL,
    session_id TEXT NOT NULL,
    owner TEXT,
    locked_until REAL,
    PRIMARY KEY (queue, session_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox_dedup (
    queue TEXT NOT NULL,
    message_id TEXT NOT NULL,
    enqueued_time REAL NOT NULL,
    PRIMARY KEY (queue, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outbox_dedup_by_time ON outbox_dedup (queue, enqueued_time);
CREATE TABLE IF NOT EXISTS outbox_dead_letters (
    queue TEXT NOT NULL,
    seq INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    body BLOB NOT NULL,
    properties TEXT NOT NULL,
    enqueued_time REAL NOT NULL,
    delivery_count INTEGER NOT NULL,
    dead_lettered_time REAL NOT NULL,
    reason TEXT NOT NULL,
    description TEXT NOT NULL,
    PRIMARY KEY (queue, seq)
);
CREATE INDEX IF NOT EXISTS outbox_dead_letters_by_time
    ON outbox_dead_letters (queue, dead_lettered_time, seq);
CREATE TABLE IF NOT EXISTS outbox_spool (
    queue TEXT NOT NULL,
    file TEXT NOT NULL,
    imported INTEGER NOT NULL,
    PRIMARY KEY (queue, file)
) WITHOUT ROWID;
"""
# AUTOINCREMENT (not plain rowid) so a sequence number is never reused after the newest
# message is completed: dead letters keep theirs and operators address them by it.
# ``outbox_sessions`` holds a row per session that has messages; ``owner``/``locked_until``
# is the session lock. Message locks of a session always expire with the session lock,
# which is what makes "one consumer per session" and FIFO hold across processes.
# ``outbox_spool`` holds how many bytes of each spool file are in ``outbox_messages``; it
# changes in the transaction that imports them, so a record is imported exactly once.

PRUNE_DEDUP = "DELETE FROM outbox_dedup WHERE queue = :queue AND enqueued_time < :horizon"

# Importing a spooled send is one INSERT per message into this view; its trigger does the
# work in SQLite, and ``executemany`` runs a send's INSERTs in one call (~15% less CPU than
# three statements a message, each a Python call). The view and trigger are TEMP objects,
# made by each connection when it opens and seen by it alone, so they never enter the
# file's schema (``outbox_spool`` is the one table this version adds to it).
CREATE_SEND_VIEW = """
CREATE TEMP VIEW IF NOT EXISTS outbox_send
    (queue, message_id, session_id, body, properties, now, horizon)
AS SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL WHERE 0
"""

# The first statement claims the id unless it was accepted at or after ``horizon`` (within
# the duplicate-detection window, earlier in the same group included); a claim that changed
# no row drops the message and adds no session row. Inside a trigger, ``changes()`` counts
# the rows changed by the trigger's previous statement.
CREATE_SEND_TRIGGER = """
CREATE TEMP TRIGGER IF NOT EXISTS outbox_send_message INSTEAD OF INSERT ON outbox_send
BEGIN
    INSERT INTO outbox_dedup (queue, message_id, enqueued_time)
    VALUES (NEW.queue, NEW.message_id, NEW.now)
    ON CONFLICT (queue, message_id) DO UPDATE SET enqueued_time = excluded.enqueued_time
        WHERE outbox_dedup.enqueued_time < NEW.horizon;
    INSERT INTO outbox_messages (queue, message_id, session_id, body, properties, enqueued_time)
    SELECT NEW.queue, NEW.message_id, NEW.session_id, NEW.body, NEW.properties, NEW.now
    WHERE changes() = 1;
    INSERT INTO outbox_sessions (queue, session_id)
    SELECT NEW.queue, NEW.session_id WHERE changes() = 1
    ON CONFLICT (queue, session_id) DO NOTHING;
END
"""

SEND_MESSAGE = """
INSERT INTO temp.outbox_send (queue, message_id, session_id, body, properties, now, horizon)
VALUES (?, ?, ?, ?, ?, ?, ?)
"""

SPOOL_PROGRESS = "SELECT file, imported FROM outbox_spool WHERE queue = :queue"

RECORD_SPOOL_PROGRESS = """
INSERT INTO outbox_spool (queue, file, imported) VALUES (:queue, :file, :imported)
ON CONFLICT (queue, file) DO UPDATE SET imported = excluded.imported
"""

REGISTER_SPOOL_FILE = """
INSERT INTO outbox_spool (queue, file, imported) VALUES (:queue, :file, 0)
ON CONFLICT (queue, file) DO NOTHING
"""

FORGET_SPOOL_FILE = "DELETE FROM outbox_spool WHERE queue = :queue AND file = :file"

REMEMBER_MESSAGE_ID = """
INSERT INTO outbox_dedup (queue, message_id, enqueued_time) VALUES (:queue, :message_id, :now)
ON CONFLICT (queue, message_id) DO UPDATE SET enqueued_time = excluded.enqueued_time
"""

INSERT_MESSAGE = """
INSERT INTO outbox_messages (queue, message_id, session_id, body, properties, enqueued_time)
VALUES (:queue, :message_id, :session_id, :body, :properties, :now)
"""

ADD_SESSION = """
INSERT INTO outbox_sessions (queue, session_id) VALUES (:queue, :session_id)
ON CONFLICT (queue, session_id) DO NOTHING
"""

# Sessions this consumer may take messages from, the one with the oldest message first.
OPEN_SESSIONS = """
SELECT s.session_id FROM outbox_sessions AS s
WHERE s.queue = :queue AND (s.owner IS NULL OR s.owner = :me OR s.locked_until < :now)
ORDER BY (SELECT min(m.seq) FROM outbox_messages AS m
          WHERE m.queue = s.queue AND m.session_id = s.session_id)
"""

ANY_AVAILABLE = """
SELECT 1 FROM outbox_sessions AS s
WHERE s.queue = :queue AND (s.owner IS NULL OR s.owner = :me OR s.locked_until < :now)
  AND EXISTS (SELECT 1 FROM outbox_messages AS m
              WHERE m.queue = s.queue AND m.session_id = s.session_id
                AND (m.locked_until IS NULL OR m.locked_until < :now))
LIMIT 1
"""

AVAILABLE_IN_SESSION = """
SELECT seq, delivery_count FROM outbox_messages
WHERE queue = :queue AND session_id = :session_id
  AND (locked_until IS NULL OR locked_until < :now)
ORDER BY seq LIMIT :limit
"""

LOCK_MESSAGE = """
UPDATE outbox_messages
SET delivery_count = delivery_count + 1, lock_token = :token, locked_by = :me,
    locked_until = :until
WHERE seq = :seq
RETURNING message_id, session_id, body, properties, enqueued_time, delivery_count
"""

LOCK_SESSION = """
UPDATE outbox_sessions SET owner = :me, locked_until = :until
WHERE queue = :queue AND session_id = :session_id
"""

# A session has one lock: extending it extends every message lock this consumer holds in it.
EXTEND_HELD_LOCKS = """
UPDATE outbox_messages SET locked_until = :until
WHERE queue = :queue AND session_id = :session_id AND locked_by = :me AND locked_until >= :now
"""

DROP_EMPTY_SESSION = """
DELETE FROM outbox_sessions
WHERE queue = :queue AND session_id = :session_id
  AND NOT EXISTS (SELECT 1 FROM outbox_messages
                  WHERE queue = :queue AND session_id = :session_id)
"""

RELEASE_IDLE_SESSION = """
UPDATE outbox_sessions SET owner = NULL, locked_until = NULL
WHERE queue = :queue AND session_id = :session_id AND owner = :me
  AND NOT EXISTS (SELECT 1 FROM outbox_messages
                  WHERE queue = :queue AND session_id = :session_id
                    AND locked_by = :me AND locked_until >= :now)
"""

COMPLETE_MESSAGE = """
DELETE FROM outbox_messages
WHERE seq = :seq AND queue = :queue AND lock_token = :token AND locked_until >= :now
RETURNING session_id
"""

ABANDON_MESSAGE = """
UPDATE outbox_messages SET lock_token = NULL, locked_by = NULL, locked_until = NULL
WHERE seq = :seq AND queue = :queue AND lock_token = :token AND locked_until >= :now
RETURNING session_id, delivery_count
"""

RENEW_MESSAGE = """
UPDATE outbox_messages SET locked_until = :until
WHERE seq = :seq AND queue = :queue AND lock_token = :token AND locked_until >= :now
RETURNING session_id
"""

HOLDS_LOCK = """
SELECT 1 FROM outbox_messages
WHERE seq = :seq AND queue = :queue AND lock_token = :token AND locked_until >= :now
"""

MOVE_TO_DEAD_LETTERS = """
INSERT INTO outbox_dead_letters (queue, seq, message_id, session_id, body, properties,
    enqueued_time, delivery_count, dead_lettered_time, reason, description)
SELECT queue, seq, message_id, session_id, body, properties, enqueued_time, delivery_count,
    :now, :reason, :description
FROM outbox_messages WHERE seq = :seq
"""

DELETE_MESSAGE = "DELETE FROM outbox_messages WHERE seq = :seq"

DEAD_LETTER_COLUMNS = """
SELECT body, message_id, session_id, seq, delivery_count, enqueued_time, dead_lettered_time,
    reason, description, properties
FROM outbox_dead_letters"""

LIST_DEAD_LETTERS = f"""{DEAD_LETTER_COLUMNS} WHERE queue = :queue
ORDER BY dead_lettered_time, seq LIMIT :limit
"""

FIND_DEAD_LETTER = f"{DEAD_LETTER_COLUMNS} WHERE queue = :queue AND seq = :seq"

TAKE_DEAD_LETTER = """
DELETE FROM outbox_dead_letters WHERE queue = :queue AND seq = :seq
RETURNING message_id, session_id, body, properties
"""

DELETE_DEAD_LETTER = "DELETE FROM outbox_dead_letters WHERE queue = :queue AND seq = :seq"

COUNT_MESSAGES = "SELECT count(*) FROM outbox_messages WHERE queue = :queue"

COUNT_DEAD_LETTERS = "SELECT count(*) FROM outbox_dead_letters WHERE queue = :queue"


class SqliteQueue:
    """A Service Bus-like session queue in one SQLite file, shared by several processes.

    Implements ``OutboxSender``, ``OutboxReceiver`` and ``DeadLetterStore``. Each instance
    is one consumer (a random consumer id) with one connection guarded by a lock, so the
    saver may call it from several threads. Several named queues may share a file.
    Times (``enqueued_time``, ``locked_until``) are Unix epoch seconds. A sending instance
    appends to its own spool file (``spool``); receiving and ``depth`` import the spools.
    """

    def __init__(
        self,
        path: str | Path,
        queue: str = "events",
        *,
        lock_duration: float = 30.0,
        max_delivery_count: int = 10,
        duplicate_detection_window: float = 600.0,
        wal_autocheckpoint: int = DEFAULT_WAL_AUTOCHECKPOINT,
    ) -> None:
        require_posix()
        if sqlite3.sqlite_version_info < (3, 35, 0):
            raise OutboxError(
                f"SqliteQueue needs SQLite 3.35 or newer (for RETURNING); this Python links "
                f"SQLite {sqlite3.sqlite_version}. Use a Python build with a newer SQLite."
            )
        if not queue:
            raise ValueError("queue name must not be empty")
        if lock_duration <= 0:
            raise ValueError(f"lock_duration must be positive, got {lock_duration}")
        if max_delivery_count < 1:
            raise ValueError(f"max_delivery_count must be at least 1, got {max_delivery_count}")
        if duplicate_detection_window < 0:
            raise ValueError(
                f"duplicate_detection_window must not be negative, got {duplicate_detection_window}"
            )
        self.path = Path(path)
        self._absolute_path = self.path.absolute()  # the same file after a chdir
        self.queue = queue
        self.lock_duration = lock_duration
        self.max_delivery_count = max_delivery_count
        self.duplicate_detection_window = duplicate_detection_window
        self.wal_autocheckpoint = wal_autocheckpoint
        self._next_dedup_prune = 0.0
        self._consumer_id = uuid.uuid4().hex
        self._lock = threading.RLock()  # a send's first append registers its file
        self._spool_directory = spool_directory(self._absolute_path, queue)
        self._spool: SpoolWriter | None = None
        """This instance's spool file, made on its first send."""
        self._spool_seen: dict[str, tuple[int, bool]] = {}
        """Per spool file: bytes imported and whether its sender had gone, as of this
        instance's last committed import (so an idle consumer takes no write lock)."""
        self._conn = self._connect()
        self._file = self._file_now()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        lock_duration: float = 30.0,
        max_delivery_count: int = 10,
        duplicate_detection_window: float = 600.0,
        wal_autocheckpoint: int = DEFAULT_WAL_AUTOCHECKPOINT,
    ) -> SqliteQueue:
        """Open the queue a ``sqlite:///path.db[?queue=name]`` URL names (see ``parse_url``)."""
        location = parse_url(url)
        return cls(
            location.path,
            location.queue,
            lock_duration=lock_duration,
            max_delivery_count=max_delivery_count,
            duplicate_detection_window=duplicate_detection_window,
            wal_autocheckpoint=wal_autocheckpoint,
        )

    def _connect(self) -> sqlite3.Connection:
        """A connection with the schema in place, or ``OutboxError`` naming the file and
        why it cannot be the queue (a directory, not a SQLite file, no way to create it)."""
        try:
            return self._open_connection()
        except OSError as error:  # only creating the file's directory raises it
            raise OutboxError(
                f"cannot create the directory {error.filename or self.path.parent} for the "
                f"queue file {self.path}: {error.strerror or error}"
            ) from error
        except sqlite3.Error as error:
            # SQLite says only "unable to open database file" for a directory.
            cause = "it is a directory" if self.path.is_dir() else str(error)
            raise OutboxError(f"cannot open the queue file {self.path}: {cause}") from error

    def _file_now(self) -> tuple[int, int] | None:
        """(device, inode) of the file ``path`` names now, ``None`` if none (or in memory)."""
        try:
            found = os.stat(self._absolute_path)
        except FileNotFoundError:
            return None
        return found.st_dev, found.st_ino

    def _check_file_kept(self, consequence: str) -> None:
        """``OutboxError`` if the queue file was deleted or replaced after it was opened.

        SQLite keeps using a deleted file it has open, and commits succeed: without this
        check, sends were lost silently, and a worker never saw the file at the path again.
        """
        if self._file_now() != self._file:
            raise OutboxError(
                f"the queue file {self.path} was deleted or replaced while this process had "
                f"it open: {consequence}"
            )

    def _open_connection(self) -> sqlite3.Connection:
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so the write lock is
        # taken before reading, and two consumers can never pick the same message.
        conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode: a committed send survives a process crash; only an OS
            # crash or power loss can drop the last transactions (FULL would fsync each commit).
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA wal_autocheckpoint = {int(self.wal_autocheckpoint)}")
            conn.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("COMMIT")
            conn.execute(CREATE_SEND_VIEW)
            conn.execute(CREATE_SEND_TRIGGER)
            # From here on ``_execute`` waits for busy locks itself, at a finer grain.
            conn.execute("PRAGMA busy_timeout = 0")
        except BaseException:
            conn.close()
            raise
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction."""
        with self._lock:
            self._execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def _importing(self) -> Iterator[sqlite3.Connection]:
        """A transaction that first imports the spool; the files it finished (their
        senders gone, every record imported) are deleted once it has committed."""
        readers: list[SpoolReader] = []
        try:
            with self._transaction() as conn:
                self._import_spool(conn, readers)
                yield conn
            self._spool_seen = {r.path.name: (r.imported, r.sender_gone) for r in readers}
            for reader in readers:
                if reader.finished:
                    reader.remove()
        finally:
            for reader in readers:
                reader.close()

    def _execute(self, statement: str, params: dict[str, object] | None = None) -> sqlite3.Cursor:
        """Execute, retrying at sub-millisecond intervals while another process holds a
        lock the statement needs (the connection's own busy timeout is 0)."""
        deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
        delay = LOCK_RETRY_FIRST_DELAY
        while True:
            try:
                return self._conn.execute(statement, params or {})
            except sqlite3.OperationalError as error:
                # The primary code: BUSY_RECOVERY, BUSY_SNAPSHOT... are waits too.
                if error.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                    raise
                if time.monotonic() > deadline:
                    raise self._locked_too_long(error) from error
            time.sleep(delay)
            delay = min(delay * 2, LOCK_RETRY_MAX_DELAY)

    def _locked_too_long(self, cause: object) -> OutboxError:
        return OutboxError(
            f"Queue file {self.path} stayed locked by another process for "
            f"{BUSY_TIMEOUT_SECONDS:.0f}s ({cause}). Check for a stuck process holding it."
        )

    def _params(self, **values: object) -> dict[str, object]:
        return {"queue": self.queue, "me": self._consumer_id, **values}

    # --- OutboxSender -------------------------------------------------------------------

    def send(self, messages: Sequence[OutboxMessage]) -> None:
        """Enqueue all messages at once: other processes see all or none.

        The send is one append to this instance's spool file, which survives the process
        (not an OS crash: like SQLite's ``synchronous = NORMAL``); it never waits for a
        consumer's lock, except on the first send to a new file, which registers it. A
        message whose id this queue accepted within ``duplicate_detection_window`` seconds
        (earlier in the same call included) is dropped silently when consumers import it,
        as Service Bus drops it, so a saver that retries a publish after a crash does not
        enqueue twice. Ids longer than Service Bus allows are stored in their ``queue_id``
        form, as the Service Bus backend sends them.
        """
        _check_messages(messages)
        if not messages:
            return
        record = encode_record(messages, time.time(), self.duplicate_detection_window)
        with self._lock:
            if self._spool is None or self._spool.size >= MAX_SPOOL_FILE_BYTES:
                if self._spool is not None:
                    self._spool.close()
                self._spool = SpoolWriter(self._spool_directory)
                self._register_spool_file(self._spool.path.name)
            spool = self._spool
            try:
                spool.append(*record)
            except OSError as error:
                self._spool = None
                raise OutboxError(f"cannot append to spool file {spool.path}: {error}") from error
            kept = spool.kept()
        if not kept:
            # The queue file itself is not checked: whatever file is at its path imports
            # from this spool directory, so the send still reaches a worker.
            raise OutboxError(
                f"the spool file {spool.path} was deleted or replaced while this process had "
                "it open: what it sends there now reaches no worker. Close and reopen the "
                "saver (or restart this process) to send to a new spool file."
            )

    def _register_spool_file(self, name: str) -> None:
        """Record the new file (once per file: not a send's cost), so the queue's name is
        in the file for tools such as ``dlq`` before any consumer imported it."""
        with self._transaction() as conn:
            conn.execute(REGISTER_SPOOL_FILE, self._params(file=name))

    # --- Spool import -------------------------------------------------------------------

    def _import_spool(self, conn: sqlite3.Connection, readers: list[SpoolReader]) -> None:
        """Move the records senders appended since the last import into the queue, in
        ``conn``'s transaction. Sends from several files go in by time (each file's in
        its own order), as Service Bus orders sends from several clients by arrival."""
        progress = dict(conn.execute(SPOOL_PROGRESS, self._params()).fetchall())
        present = {path.name: path for path in self._spool_directory.glob(f"*{SPOOL_SUFFIX}")}
        for name in progress.keys() - present.keys():  # deleted after an earlier import
            conn.execute(FORGET_SPOOL_FILE, self._params(file=name))
        spooled: list[list[SpoolRecord]] = []
        budget = MAX_IMPORT_BYTES
        for name, path in sorted(present.items()):
            if budget <= 0:  # the rest waits for the next import
                break
            try:
                reader = SpoolReader(path)
            except FileNotFoundError:  # another consumer finished and deleted it
                continue
            readers.append(reader)
            imported = progress.get(name, 0)
            read = reader.read_records(imported, budget)
            if reader.sender_gone and read.reached_end:
                if read.left:
                    logger.warning(
                        "dropping a send cut short at the end of a spool file: its sender "
                        "stopped while writing it, so that send never returned",
                        extra={"queue": self.queue, "file": str(path), "bytes": read.left},
                    )
                reader.finished = True
            if read.used:
                conn.execute(
                    RECORD_SPOOL_PROGRESS, self._params(file=name, imported=imported + read.used)
                )
            reader.imported = imported + read.used
            budget -= read.used
            spooled.append(read.records)
        if not spooled:
            return
        now = time.time()
        if now >= self._next_dedup_prune:
            # Expired ids are already ignored by the send trigger; deleting them is
            # housekeeping, so once a second is enough.
            conn.execute(PRUNE_DEDUP, self._params(horizon=now - self.duplicate_detection_window))
            self._next_dedup_prune = now + DEDUP_PRUNE_INTERVAL
        for record in heapq.merge(*spooled, key=lambda record: record.enqueued_time):
            sent = record.enqueued_time
            horizon = sent - record.duplicate_detection_window
            conn.executemany(
                SEND_MESSAGE,
                [
                    (
                        self.queue,
                        m.message_id,
                        m.session_id,
                        m.body,
                        json.dumps(m.properties),
                        sent,
                        horizon,
                    )
                    for m in record.messages
                ],
            )

    def _spool_has_news(self) -> bool:
        """Whether a spool file holds records this instance has not imported, or has a
        sender that left since (so it can be deleted), without taking the write lock."""
        try:
            entries = list(os.scandir(self._spool_directory))
        except FileNotFoundError:
            return False
        for entry in entries:
            if not entry.name.endswith(SPOOL_SUFFIX):
                continue
            seen = self._spool_seen.get(entry.name)
            try:
                size = entry.stat().st_size
            except FileNotFoundError:
                continue
            if seen is None or seen[0] != size or seen[1]:
                return True
            if sender_gone(Path(entry.path)):
                return True
        return False

    # --- OutboxReceiver -----------------------------------------------------------------

    def receive(self, max_messages: int, max_wait: float) -> list[ReceivedMessage]:
        """Peek-lock up to ``max_messages``, waiting up to ``max_wait`` seconds for any.

        Returns as soon as at least one message is available (possibly from several
        sessions); an empty list means none came within ``max_wait``.
        """
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, got {max_messages}")
        if max_wait < 0:
            raise ValueError(f"max_wait must not be negative, got {max_wait}")
        self._check_file_kept(
            "this process receives nothing sent to the file now at that path. Restart it."
        )
        deadline = time.monotonic() + max_wait
        delay = POLL_FIRST_DELAY
        while True:
            received = self._receive_now(max_messages)
            remaining = deadline - time.monotonic()
            if received or remaining <= 0:
                return received
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, POLL_MAX_DELAY)

    def _receive_now(self, max_messages: int) -> list[ReceivedMessage]:
        # A read never waits for (or blocks) a writer in WAL mode; the write lock is
        # taken only when there is something to import or lock, so idle consumers do not
        # stall each other in SQLite's busy-wait sleeps.
        with self._lock:
            idle = (
                not self._spool_has_news()
                and self._execute(ANY_AVAILABLE, self._params(now=time.time())).fetchone() is None
            )
        if idle:
            return []
        received: list[ReceivedMessage] = []
        with self._importing() as conn:
            now = time.time()
            until = now + self.lock_duration
            sessions = [row[0] for row in conn.execute(OPEN_SESSIONS, self._params(now=now))]
            for session_id in sessions:
                wanted = max_messages - len(received)
                if wanted <= 0:
                    break
                received += self._take_from_session(conn, session_id, wanted, now, until)
        return received

    def _take_from_session(
        self, conn: sqlite3.Connection, session_id: str, wanted: int, now: float, until: float
    ) -> list[ReceivedMessage]:
        """Lock the session's next ``wanted`` available messages, in sequence order.

        A message out of deliveries is dead-lettered on the way and the one after it
        delivered instead, so a poison head never stalls its session.
        """
        params = self._params(session_id=session_id, now=now, until=until)
        taken: list[ReceivedMessage] = []
        while len(taken) < wanted:
            limit = wanted - len(taken)
            rows = conn.execute(AVAILABLE_IN_SESSION, {**params, "limit": limit}).fetchall()
            for seq, deliveries in rows:
                if deliveries >= self.max_delivery_count:
                    self._dead_letter_exhausted(conn, seq, deliveries, now)
                else:
                    taken.append(self._lock_message(conn, seq, until))
            if len(rows) < limit:
                break
        if taken:
            conn.execute(LOCK_SESSION, params)
            conn.execute(EXTEND_HELD_LOCKS, params)
        else:
            self._tidy_session(conn, session_id, now)
        return taken

    def _lock_message(self, conn: sqlite3.Connection, seq: int, until: float) -> ReceivedMessage:
        token = str(uuid.uuid4())
        row = conn.execute(LOCK_MESSAGE, self._params(seq=seq, token=token, until=until)).fetchone()
        message_id, session_id, body, properties, enqueued_time, deliveries = row
        return ReceivedMessage(
            body=body,
            message_id=message_id,
            session_id=session_id,
            sequence_number=seq,
            delivery_count=deliveries - 1,
            enqueued_time=enqueued_time,
            lock_token=token,
            locked_until=until,
            application_properties=json.loads(properties),
        )

    def _dead_letter_exhausted(
        self, conn: sqlite3.Connection, seq: int, deliveries: int, now: float
    ) -> None:
        description = (
            f"Delivered {deliveries} times without being completed; the queue's "
            f"max_delivery_count is {self.max_delivery_count}."
        )
        self._move_to_dead_letters(conn, seq, MAX_DELIVERY_COUNT_EXCEEDED, description, now)

    def _move_to_dead_letters(
        self, conn: sqlite3.Connection, seq: int, reason: str, description: str, now: float
    ) -> None:
        params = {"seq": seq, "now": now, "reason": reason, "description": description}
        conn.execute(MOVE_TO_DEAD_LETTERS, params)
        conn.execute(DELETE_MESSAGE, params)

    def _tidy_session(self, conn: sqlite3.Connection, session_id: str, now: float) -> None:
        """Drop the session row once empty; release its lock once we hold no message in it."""
        params = self._params(session_id=session_id, now=now)
        conn.execute(DROP_EMPTY_SESSION, params)
        conn.execute(RELEASE_IDLE_SESSION, params)

    def complete(self, messages: Sequence[ReceivedMessage]) -> None:
        """Delete the messages in one transaction.

        Messages whose lock is still held are completed even if others in the call lost
        theirs; ``LockLostError`` then names the lost ones (they are or will be redelivered).
        """
        lost: list[ReceivedMessage] = []
        with self._transaction() as conn:
            now = time.time()
            sessions: set[str] = set()
            for message in messages:
                row = conn.execute(COMPLETE_MESSAGE, self._lock_params(message, now)).fetchone()
                if row is None:
                    lost.append(message)
                else:
                    sessions.add(row[0])
            for session_id in sessions:
                self._tidy_session(conn, session_id, now)
        _raise_if_lost(lost, "complete", self.queue)

    def abandon(self, messages: Sequence[ReceivedMessage]) -> None:
        """Make the messages available again now; redelivery reports delivery_count + 1.

        A message that has used up ``max_delivery_count`` deliveries is dead-lettered right
        away, as Service Bus does. Lost locks are reported as in ``complete``.
        """
        lost: list[ReceivedMessage] = []
        with self._transaction() as conn:
            now = time.time()
            sessions: set[str] = set()
            for message in messages:
                row = conn.execute(ABANDON_MESSAGE, self._lock_params(message, now)).fetchone()
                if row is None:
                    lost.append(message)
                    continue
                session_id, deliveries = row
                sessions.add(session_id)
                if deliveries >= self.max_delivery_count:
                    self._dead_letter_exhausted(conn, message.sequence_number, deliveries, now)
            for session_id in sessions:
                self._tidy_session(conn, session_id, now)
        _raise_if_lost(lost, "abandon", self.queue)

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        """Move the message to the dead-letter sub-queue with why, for an operator to replay."""
        with self._transaction() as conn:
            now = time.time()
            if conn.execute(HOLDS_LOCK, self._lock_params(message, now)).fetchone() is None:
                lost = [message]
            else:
                lost = []
                self._move_to_dead_letters(conn, message.sequence_number, reason, description, now)
                self._tidy_session(conn, message.session_id, now)
        _raise_if_lost(lost, "dead-letter", self.queue)

    def renew_locks(self, messages: Sequence[ReceivedMessage]) -> list[float]:
        """Extend the locks by ``lock_duration`` from now; returns the new ``locked_until``.

        Renewing a message renews its session's lock, hence every lock this consumer holds
        in that session. Locks still held are renewed even if ``LockLostError`` is raised
        for the others.
        """
        lost: list[ReceivedMessage] = []
        with self._transaction() as conn:
            now = time.time()
            until = now + self.lock_duration
            sessions: set[str] = set()
            for message in messages:
                params = {**self._lock_params(message, now), "until": until}
                row = conn.execute(RENEW_MESSAGE, params).fetchone()
                if row is None:
                    lost.append(message)
                else:
                    sessions.add(row[0])
            for session_id in sessions:
                params = self._params(session_id=session_id, now=now, until=until)
                conn.execute(LOCK_SESSION, params)
                conn.execute(EXTEND_HELD_LOCKS, params)
        _raise_if_lost(lost, "renew the lock of", self.queue)
        return [until] * len(messages)

    def _lock_params(self, message: ReceivedMessage, now: float) -> dict[str, object]:
        return self._params(seq=message.sequence_number, token=message.lock_token, now=now)

    # --- DeadLetterStore ----------------------------------------------------------------

    def list_dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters of this queue, in the order they died."""
        with self._lock:
            rows = self._execute(LIST_DEAD_LETTERS, self._params(limit=limit)).fetchall()
        return [_dead_letter(row) for row in rows]

    def find_dead_letter(self, sequence_number: int) -> DeadLetter | None:
        """The dead letter with this sequence number, however many died before it."""
        with self._lock:
            row = self._execute(FIND_DEAD_LETTER, self._params(seq=sequence_number)).fetchone()
        return None if row is None else _dead_letter(row)

    def resend_dead_letter(self, sequence_number: int) -> None:
        """Re-enqueue a copy (same body, session and properties, fresh delivery count, id
        ``replay_message_id(message_id, sequence_number)``) and drop the dead letter.

        Both happen in one transaction, so a crash never loses or doubles the message. The
        new id is what the Service Bus backend must use (the original id may still be in the
        duplicate-detection window there); the contract keeps both backends alike.
        """
        with self._transaction() as conn:
            now = time.time()
            row = conn.execute(TAKE_DEAD_LETTER, self._params(seq=sequence_number)).fetchone()
            if row is None:
                raise KeyError(self._no_dead_letter(sequence_number))
            message_id, session_id, body, properties = row
            params = self._params(
                message_id=replay_message_id(message_id, sequence_number),
                session_id=session_id,
                body=body,
                properties=properties,
                now=now,
            )
            conn.execute(REMEMBER_MESSAGE_ID, params)
            conn.execute(INSERT_MESSAGE, params)
            conn.execute(ADD_SESSION, params)

    def delete_dead_letter(self, sequence_number: int) -> None:
        """Discard a dead letter for good."""
        with self._transaction() as conn:
            if conn.execute(DELETE_DEAD_LETTER, self._params(seq=sequence_number)).rowcount == 0:
                raise KeyError(self._no_dead_letter(sequence_number))

    def _no_dead_letter(self, sequence_number: int) -> str:
        return (
            f"No dead letter with sequence number {sequence_number} in queue {self.queue!r} "
            f"of {self.path}; list_dead_letters() shows the ones there are."
        )

    # --- Monitoring and lifecycle -------------------------------------------------------

    def depth(self) -> int:
        """Active messages in this queue, locked or not (dead letters excluded), spooled
        sends included (they are imported first)."""
        with self._importing() as conn:
            return int(conn.execute(COUNT_MESSAGES, self._params()).fetchone()[0])

    def dead_letter_count(self) -> int:
        """Messages in this queue's dead-letter sub-queue."""
        with self._lock:
            return int(self._execute(COUNT_DEAD_LETTERS, self._params()).fetchone()[0])

    def close(self) -> None:
        """Close the connection and the spool file (consumers import what it holds, then
        delete it); locks this consumer holds expire after ``lock_duration``."""
        with self._lock:
            if self._spool is not None:
                self._spool.close()
                self._spool = None
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SqliteQueue({str(self.path)!r}, queue={self.queue!r})"


class AsyncSqliteSender:
    """``AsyncOutboxSender`` over a ``SqliteQueue``, sending in groups (``grouping``).

    A group is the sends of one event-loop iteration (in a LangGraph step: its writes and
    its checkpoint), appended to the spool in one ``write`` on the loop's own thread. It
    never waits for a lock, so no thread is needed: a worker thread would wait for the GIL
    while the loop is busy (6-8 ms a send in the benchmark's graph).
    """

    def __init__(self, queue: SqliteQueue) -> None:
        self.queue = queue
        self._groups = SendGroups()
        self._scheduled: asyncio.Handle | None = None
        """The send of the waiting group, if one is scheduled ..."""
        self._scheduled_on: asyncio.AbstractEventLoop | None = None
        """... and the loop it is scheduled on."""

    def send(self, messages: Sequence[OutboxMessage]) -> asyncio.Future[None]:
        _check_messages(messages)
        if not messages:
            return nothing_to_send()
        self._schedule()
        return self._groups.add(messages)

    def _schedule(self) -> None:
        """A send soon on the running loop, unless one is scheduled there already: also
        when the loop it was scheduled on has ended, leaving the sends of its cancelled
        callers waiting (they are still sent, as a cancelled caller's always are)."""
        loop = asyncio.get_running_loop()
        if self._scheduled is None or self._scheduled_on is not loop:
            self._scheduled_on = loop
            self._scheduled = loop.call_soon(self._send_group)

    def _send_group(self) -> None:
        self._scheduled = None
        group, messages = self._groups.take()
        try:
            self.queue.send(messages)
        except Exception as error:
            if len(group) == 1:
                settle(group, error)
                return
            # Each alone, in order and at once (not in a task, as grouping.failed does),
            # so only the bad one fails and no later send overtakes the others.
            for alone, done in group:
                try:
                    self.queue.send(alone)
                except Exception as its_error:
                    settle([(alone, done)], its_error)
                else:
                    settle([(alone, done)], None)
        else:
            settle(group, None)

    async def close(self) -> None:
        """Send what waits, then close the queue."""
        if self._groups:
            self._send_group()
        self.queue.close()


def _dead_letter(row: tuple[Any, ...]) -> DeadLetter:
    """A row of ``DEAD_LETTER_COLUMNS`` as a ``DeadLetter``."""
    (
        body,
        message_id,
        session_id,
        seq,
        delivery_count,
        enqueued_time,
        dead_lettered_time,
        reason,
        description,
        properties,
    ) = row
    return DeadLetter(
        body=body,
        message_id=message_id,
        session_id=session_id,
        sequence_number=seq,
        delivery_count=delivery_count,
        enqueued_time=enqueued_time,
        dead_lettered_time=dead_lettered_time,
        reason=reason,
        description=description,
        application_properties=json.loads(properties),
    )


def _check_messages(messages: Sequence[OutboxMessage]) -> None:
    for message in messages:
        _check_id("message_id", message.message_id)
        _check_id("session_id", message.session_id)


def _check_id(name: str, value: str) -> None:
    if not value:
        raise ValueError(f"{name} must not be empty")


def _raise_if_lost(lost: list[ReceivedMessage], action: str, queue: str) -> None:
    if lost:
        which = ", ".join(f"{m.sequence_number} ({m.message_id!r})" for m in lost)
        raise LockLostError(
            f"Could not {action} message(s) {which} in queue {queue!r}: the lock expired or "
            "the message was settled already. It is (or will be) redelivered; make the "
            "processing idempotent, or renew locks sooner.",
            [m.sequence_number for m in lost],
        )
