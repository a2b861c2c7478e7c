"""The row model: how an event lands in the append-only ``CheckpointEvents`` table.

Every row carries its event's id and sequence, so readers can drop redelivered copies
(same ``RowId``) and hide rows older than a delete (smaller ``EventSeq``). Payloads are
base64 text cut into chunks well under Kusto's 1 MB string limit, which Kusto would
otherwise truncate silently.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .envelope import Event, EventKind
from .ids import row_id

TABLE = "CheckpointEvents"

COLUMNS: tuple[tuple[str, str], ...] = (
    ("RowId", "string"),
    ("EventId", "string"),
    ("EventSeq", "long"),
    ("PublishedAt", "datetime"),
    ("RowKind", "string"),
    ("ThreadId", "string"),
    ("CheckpointNs", "string"),
    ("CheckpointId", "string"),
    ("ParentCheckpointId", "string"),
    ("TaskId", "string"),
    ("TaskPath", "string"),
    ("WriteIdx", "long"),
    ("Channel", "string"),
    ("Version", "string"),
    ("BlobKey", "string"),
    ("ValueType", "string"),
    ("Chunk", "int"),
    ("ChunkCount", "int"),
    ("Payload", "string"),
    ("Metadata", "dynamic"),
    ("MetadataPairs", "dynamic"),
    ("BlobKeys", "dynamic"),
    ("RunId", "string"),
)
COLUMN_NAMES = tuple(name for name, _ in COLUMNS)

ROW_CHUNK_BYTES = 512 * 1024
"""Raw bytes per row; base64 makes it ~700 KB, under the 1 MB string limit."""

KEY_SEPARATOR = "\x1f"

MAX_DYNAMIC_BYTES = 1024 * 1024
"""Kusto ingests a dynamic value whose JSON is longer than this as null."""


class RowKind:
    CHECKPOINT = "checkpoint"
    BLOB = "blob"
    WRITE = "write"
    DELETE_THREAD = "delete_thread"
    DELETE_RUN = "delete_run"
    PRUNE = "prune"
    DEAD_LETTER = "dead_letter"
    """Not part of any event: the ingestor's note that it dead-lettered one."""


def run_id_of(metadata: Mapping[str, Any]) -> str:
    """The ``RunId`` column of a checkpoint with this metadata: ``""`` without a run."""
    return str(metadata.get("run_id") or "")


def dynamic_bytes(value: Any) -> int:
    """The length of ``value``'s JSON, as Kusto measures a dynamic value."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def blob_key(channel: str, version: str) -> str:
    return f"{channel}{KEY_SEPARATOR}{version}"


def metadata_pairs(metadata: Mapping[str, Any]) -> list[str]:
    """``key<US>canonical-json(value)`` for each top-level key, for exact filter matching."""
    return [
        f"{key}{KEY_SEPARATOR}{canonical_json(value)}" for key, value in sorted(metadata.items())
    ]


def canonical_json(value: Any) -> str:
    """One text per JSON value: keys sorted, and a whole float written as an integer, so
    ``1.0`` matches ``1`` as numbers do in the reference savers (``true`` stays ``true``)."""
    return json.dumps(
        _whole_floats_as_ints(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


def _whole_floats_as_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _whole_floats_as_ints(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_whole_floats_as_ints(item) for item in value]
    return value


def event_rows(event: Event) -> list[dict[str, Any]]:
    """All rows of one event. They must be ingested in one operation (no torn reads)."""
    base = {
        "EventId": event.event_id,
        "EventSeq": event.seq,
        "PublishedAt": datetime.fromtimestamp(event.published_at, UTC).isoformat(),
        "ThreadId": event.thread_id,
        "CheckpointNs": event.checkpoint_ns,
    }
    rows: list[dict[str, Any]] = []
    if event.kind is EventKind.PUT:
        checkpoint = {
            **base,
            "RowKind": RowKind.CHECKPOINT,
            "CheckpointId": event.checkpoint_id,
            "ParentCheckpointId": event.parent_checkpoint_id,
            "ValueType": event.checkpoint_type,
            "Metadata": event.metadata,
            "MetadataPairs": metadata_pairs(event.metadata),
            "BlobKeys": [blob_key(c, v) for c, v in sorted(event.channel_versions.items())],
            "RunId": run_id_of(event.metadata),
        }
        rows.extend(_chunked(checkpoint, event.checkpoint_data))
        for blob in event.blobs:
            rows.extend(
                _chunked(
                    {
                        **base,
                        "RowKind": RowKind.BLOB,
                        "Channel": blob.channel,
                        "Version": blob.version,
                        "BlobKey": blob_key(blob.channel, blob.version),
                        "ValueType": blob.type,
                    },
                    blob.data,
                )
            )
    elif event.kind is EventKind.PUT_WRITES:
        for write in event.writes:
            rows.extend(
                _chunked(
                    {
                        **base,
                        "RowKind": RowKind.WRITE,
                        "CheckpointId": event.checkpoint_id,
                        "TaskId": write.task_id,
                        "TaskPath": write.task_path,
                        "WriteIdx": write.idx,
                        "Channel": write.channel,
                        "ValueType": write.type,
                    },
                    write.data,
                )
            )
    elif event.kind is EventKind.DELETE_THREAD:
        rows.append({**base, "RowKind": RowKind.DELETE_THREAD})
    elif event.kind is EventKind.DELETE_RUNS:
        rows.extend({**base, "RowKind": RowKind.DELETE_RUN, "RunId": run} for run in event.run_ids)
    elif event.kind is EventKind.PRUNE:
        rows.extend(
            {**base, "RowKind": RowKind.PRUNE, "CheckpointNs": ns, "CheckpointId": checkpoint_id}
            for ns, checkpoint_id in event.kept
        )
    for index, row in enumerate(rows):
        row["RowId"] = row_id(event.event_id, index)
    return rows


def _chunked(row: dict[str, Any], data: bytes) -> Iterable[dict[str, Any]]:
    count = max(1, -(-len(data) // ROW_CHUNK_BYTES))
    for chunk in range(count):
        part = data[chunk * ROW_CHUNK_BYTES : (chunk + 1) * ROW_CHUNK_BYTES]
        yield {
            **row,
            "Chunk": chunk,
            "ChunkCount": count,
            "Payload": base64.b64encode(part).decode("ascii"),
        }


@dataclass(frozen=True, slots=True)
class StoredValue:
    """A payload reassembled from its chunk rows, with the event that wrote it."""

    event_id: str
    seq: int
    type: str
    data: bytes


def reassemble(rows: Iterable[Mapping[str, Any]]) -> StoredValue | None:
    """Join the chunks of one event's payload; ``None`` if a chunk is missing."""
    chunks: dict[int, Mapping[str, Any]] = {}
    for row in rows:
        chunks.setdefault(int(row["Chunk"]), row)
    if not chunks:
        return None
    first = next(iter(chunks.values()))
    if len(chunks) != int(first["ChunkCount"]):
        return None
    data = b"".join(base64.b64decode(chunks[i]["Payload"]) for i in range(len(chunks)))
    return StoredValue(str(first["EventId"]), int(first["EventSeq"]), str(first["ValueType"]), data)


def dead_letter_row(event_id: str, thread_id: str, reason: str) -> dict[str, Any]:
    """The ingestor's note that it dead-lettered ``event_id``, so that the saver waiting
    for that event stops waiting and says why. The event may not decode: its sequence is
    unknown (0), and the publisher finds the note by event id. A replay adds the event's
    own rows later; the note stays, and readers then see the event as ingested."""
    return {
        "RowId": f"{event_id}/{RowKind.DEAD_LETTER}",
        "EventId": event_id,
        "EventSeq": 0,
        "PublishedAt": datetime.now(UTC).isoformat(),
        "RowKind": RowKind.DEAD_LETTER,
        "ThreadId": thread_id,
        "Metadata": {"reason": reason},
    }
