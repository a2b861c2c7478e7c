"""The SQLite queue's spool: append-only files its senders write and its consumers import.

A send to the SQLite queue is one ``writev`` of one record to the sender's own spool file,
not a SQLite transaction. Inside a LangGraph step a transaction cost ~350-450 µs of CPU
on the app's thread (cold caches: ~7 B-tree pages to the WAL, locks, the trigger); the
append costs ~85 µs, and a sender waits for a consumer's write lock only once per file
(to register it, so the queue's name is in the database for tools). Consumers move
the records into the queue's tables inside their own write transaction, together with
how far they have read each file, so a record is imported exactly once.

Each sender holds an exclusive ``flock`` on its file while the file is open. A consumer
that can take the lock knows the sender is gone (closed or dead): once such a file is
fully imported it is deleted. A record is ``<length, CRC-32>`` then msgpack
``[enqueued_time, duplicate_detection_window, [[message_id, session_id, body,
properties], ...]]`` (the sender's window, as a send checked it before): a record cut
short by a sender that died in the middle of a ``write`` (whose send therefore never
returned) fails its check and is dropped once its sender is gone.

Records are encoded by ormsgpack (faster) and decoded by msgpack, as envelopes are.
``flock`` makes the local queue POSIX-only (Linux, macOS; on Windows, use WSL).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import ormsgpack

from . import OutboxError, OutboxMessage, queue_id

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

SPOOL_SUFFIX = ".log"
NEW_SUFFIX = ".new"
"""A spool file before its sender has locked it; consumers import only ``SPOOL_SUFFIX``.
(One is left behind only by a sender that died between creating and naming it: empty.)"""

MAX_SPOOL_FILE_BYTES = 64 << 20
"""A sender starts a new file after this many bytes, so consumers can delete the old one."""

_HEADER = struct.Struct("<II")  # payload length, CRC-32 of the payload


class SpooledMessage(NamedTuple):
    message_id: str
    session_id: str
    body: bytes
    properties: dict[str, Any]
    """``application_properties``; consumers store them as JSON text (a sender only
    checks that they can be: ``json.dumps`` cost ~90 µs a send inside a graph's step)."""


class SpoolRecord(NamedTuple):
    """One send: its messages, enqueued at ``enqueued_time`` (epoch seconds), dropped as
    duplicates of ids accepted less than ``duplicate_detection_window`` seconds before."""

    enqueued_time: float
    duplicate_detection_window: float
    messages: list[SpooledMessage]


def spool_directory(database: Path, queue: str) -> Path:
    """Where the senders of ``queue`` in the queue file ``database`` append their records.

    One directory per queue (named by a hash: queue names may hold any character), beside
    the database file as SQLite keeps its ``-wal`` and ``-shm`` files.
    """
    key = hashlib.sha256(queue.encode()).hexdigest()[:16]
    return database.parent / f"{database.name}-spool" / key


def require_posix() -> None:
    if fcntl is None:  # pragma: no cover - Windows
        raise OutboxError(
            "the local SQLite queue needs a POSIX system (Linux or macOS) for its spool "
            "files' locks; on Windows, run it in WSL"
        )


def encode_record(
    messages: Sequence[OutboxMessage], enqueued_time: float, duplicate_detection_window: float
) -> tuple[bytes, bytes]:
    """One send as a spool record: its header and its payload, which ``SpoolWriter.append``
    writes together without joining them (inside a graph's step, a copy of a record cost
    ~20-30 µs; an agent's records are 7-65 KB). ``TypeError`` if a message's properties
    are not JSON."""
    for message in messages:
        _check_json_properties(message.application_properties)
    payload = ormsgpack.packb(
        [
            enqueued_time,
            duplicate_detection_window,
            [
                [
                    queue_id(message.message_id),
                    queue_id(message.session_id),
                    bytes(message.body),
                    message.application_properties,
                ]
                for message in messages
            ],
        ],
    )
    return _HEADER.pack(len(payload), zlib.crc32(payload)), payload


_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})


def _check_json_properties(properties: dict[str, Any]) -> None:
    """``TypeError`` unless ``properties`` can be stored as JSON; plain values pass
    without encoding them (the consumer encodes them, and must not meet one it cannot)."""
    if not all(type(k) is str and type(v) in _JSON_SCALARS for k, v in properties.items()):
        json.dumps(properties)


def decode_records(data: bytes) -> tuple[list[SpoolRecord], int]:
    """The whole records at the start of ``data``, and how many bytes they take.

    Decoding stops at a record that is incomplete or fails its check: its sender may be
    writing it right now, or died while writing it.
    """
    records: list[SpoolRecord] = []
    at = 0
    while at + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, at)
        start, end = at + _HEADER.size, at + _HEADER.size + length
        if end > len(data) or zlib.crc32(data[start:end]) != crc:
            break
        enqueued_time, window, messages = msgpack.unpackb(data[start:end])
        records.append(SpoolRecord(enqueued_time, window, [SpooledMessage(*m) for m in messages]))
        at = end
    return records, at


class SpoolRead(NamedTuple):
    records: list[SpoolRecord]
    used: int
    """Bytes the records take."""
    reached_end: bool
    """Whether the read went to the end of the file (as it was then) ..."""
    left: int
    """... and how many bytes after the records it holds: at the end of a file whose
    sender has gone, a record cut short."""


class SpoolWriter:
    """A sender's own spool file: created, locked, then named, so that a consumer never
    takes an unlocked file for one whose sender has gone."""

    def __init__(self, directory: Path) -> None:
        require_posix()
        directory.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        unnamed = directory / f"{name}{NEW_SUFFIX}"
        self.path = directory / f"{name}{SPOOL_SUFFIX}"
        self._fd = os.open(unnamed, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            os.rename(unnamed, self.path)
        except BaseException:
            os.close(self._fd)
            raise
        self.size = 0

    def append(self, *parts: bytes) -> None:
        """Write the parts of a record in one ``writev``; on an error the file is closed
        (part of the record may be in it, so nothing more may follow) and the caller
        starts a new one."""
        try:
            written = os.writev(self._fd, parts)
            size = sum(len(part) for part in parts)
            if written < size:  # a full disk or a signal stopped it short
                rest = memoryview(b"".join(parts))[written:]
                while rest:
                    rest = rest[os.write(self._fd, rest) :]
        except BaseException:
            self.close()
            raise
        self.size += size

    def kept(self) -> bool:
        """Whether the file is still linked: not deleted, nor replaced by a file renamed
        over its path. (An ``fstat``: inside an agent's step it cost 14-20 µs of CPU, a
        ``stat`` of the path 35-60.)"""
        return os.fstat(self._fd).st_nlink > 0

    def close(self) -> None:
        """Close the file, which releases its lock: consumers may delete it once imported."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SpoolReader:
    """A consumer's look at one spool file during an import."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.sender_gone = False
        except BaseException:
            os.close(self._fd)
            raise
        else:
            # Locked now, so it never grows again: read to the end, then it may go.
            self.sender_gone = True
        self.imported = 0
        """Set by the importer: how many bytes of the file are in the queue ..."""
        self.finished = False
        """... and whether that is all of them, for good."""

    def read_records(self, offset: int, budget: int) -> SpoolRead:
        """The whole records from ``offset`` on, about ``budget`` bytes of them (at least
        one, however large, if there is one)."""
        size = os.fstat(self._fd).st_size
        wanted = max(budget, _HEADER.size)  # enough to learn the first record's length
        data = os.pread(self._fd, max(min(wanted, size - offset), 0), offset)
        records, used = decode_records(data)
        if not records and len(data) >= _HEADER.size:
            whole = _HEADER.size + _HEADER.unpack_from(data)[0]
            if whole > len(data):  # one record larger than the budget
                data = os.pread(self._fd, min(whole, size - offset), offset)
                records, used = decode_records(data)
        return SpoolRead(records, used, offset + len(data) >= size, size - offset - used)

    def remove(self) -> None:
        """Delete the file (only after the import that finished it has committed)."""
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        os.close(self._fd)


def sender_gone(path: Path) -> bool:
    """Whether the sender of the spool file at ``path`` has gone (its lock is free)."""
    try:
        reader = SpoolReader(path)
    except FileNotFoundError:
        return False
    reader.close()
    return reader.sender_gone
