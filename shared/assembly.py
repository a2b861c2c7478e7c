"""Rows read back from Kusto, assembled into checkpoints. Pure: no serde, no I/O.

A query returns the rows of the checkpoints it selected, the blobs they reference and
their pending writes, possibly with redelivered copies. Assembly resolves them the way
LangGraph's savers resolve conflicts on their primary keys:

- a checkpoint put twice: the later put wins;
- a blob (channel, version) written twice: the later write wins;
- a pending write: a regular write (idx >= 0) keeps the first, a special write
  (``WRITES_IDX_MAP``, idx < 0) keeps the last.

A payload whose chunks are not all present is treated as absent, never returned torn.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .rows import KEY_SEPARATOR, RowKind, StoredValue, reassemble

CheckpointKey = tuple[str, str, str]
"""(thread_id, checkpoint_ns, checkpoint_id)"""


@dataclass(frozen=True, slots=True)
class StoredWrite:
    task_id: str
    task_path: str
    idx: int
    channel: str
    value: StoredValue

    @property
    def sort_key(self) -> tuple[str, str, int]:
        return (self.task_path, self.task_id, self.idx)


@dataclass(slots=True)
class StoredCheckpoint:
    thread_id: str
    checkpoint_ns: str
    checkpoint_id: str
    parent_checkpoint_id: str
    checkpoint: StoredValue
    metadata: dict[str, Any]
    channel_versions: dict[str, str]
    blobs: dict[str, StoredValue] = field(default_factory=dict)
    writes: list[StoredWrite] = field(default_factory=list)

    @property
    def key(self) -> CheckpointKey:
        return (self.thread_id, self.checkpoint_ns, self.checkpoint_id)


def assemble(rows: Iterable[Mapping[str, Any]]) -> list[StoredCheckpoint]:
    """Checkpoints from query rows, newest checkpoint id first."""
    checkpoint_parts: dict[CheckpointKey, dict[str, list[Mapping[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    blob_parts: dict[tuple[str, str, str], dict[str, list[Mapping[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    write_parts: dict[CheckpointKey, dict[tuple[str, int], dict[str, list[Mapping[str, Any]]]]] = (
        defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    )
    for row in rows:
        kind = row["RowKind"]
        thread, ns, event = str(row["ThreadId"]), str(row["CheckpointNs"] or ""), row["EventId"]
        if kind == RowKind.CHECKPOINT:
            checkpoint_parts[(thread, ns, str(row["CheckpointId"]))][event].append(row)
        elif kind == RowKind.BLOB:
            blob_parts[(thread, ns, str(row["BlobKey"]))][event].append(row)
        elif kind == RowKind.WRITE:
            key = (thread, ns, str(row["CheckpointId"]))
            write_parts[key][(str(row["TaskId"]), int(row["WriteIdx"]))][event].append(row)

    checkpoints: list[StoredCheckpoint] = []
    for key, by_event in checkpoint_parts.items():
        chosen = _latest_complete(by_event)
        if chosen is None:
            continue
        rows_of_event, value = chosen
        head = rows_of_event[0]
        versions = _versions(head.get("BlobKeys"))
        checkpoint = StoredCheckpoint(
            thread_id=key[0],
            checkpoint_ns=key[1],
            checkpoint_id=key[2],
            parent_checkpoint_id=str(head.get("ParentCheckpointId") or ""),
            checkpoint=value,
            metadata=dict(head.get("Metadata") or {}),
            channel_versions=versions,
        )
        for channel, version in versions.items():
            blob_events = blob_parts.get((key[0], key[1], f"{channel}{KEY_SEPARATOR}{version}"))
            blob = _latest_complete(blob_events) if blob_events else None
            if blob is not None:
                checkpoint.blobs[channel] = blob[1]
        for (task_id, idx), by_write_event in write_parts.get(key, {}).items():
            write = _resolve_write(by_write_event, keep_last=idx < 0)
            if write is not None:
                write_rows, write_value = write
                checkpoint.writes.append(
                    StoredWrite(
                        task_id=task_id,
                        task_path=str(write_rows[0].get("TaskPath") or ""),
                        idx=idx,
                        channel=str(write_rows[0]["Channel"]),
                        value=write_value,
                    )
                )
        checkpoint.writes.sort(key=lambda w: w.sort_key)
        checkpoints.append(checkpoint)
    checkpoints.sort(key=lambda c: (c.checkpoint_id, c.thread_id, c.checkpoint_ns), reverse=True)
    return checkpoints


def _versions(blob_keys: Any) -> dict[str, str]:
    versions: dict[str, str] = {}
    for key in blob_keys or ():
        # From the right: versions hold no separator (the saver makes them), channel names may.
        channel, _, version = str(key).rpartition(KEY_SEPARATOR)
        versions[channel] = version
    return versions


def _complete_values(
    by_event: Mapping[str, list[Mapping[str, Any]]],
) -> list[tuple[list[Mapping[str, Any]], StoredValue]]:
    complete = []
    for rows in by_event.values():
        value = reassemble(rows)
        if value is not None:
            complete.append((rows, value))
    return complete


def _latest_complete(
    by_event: Mapping[str, list[Mapping[str, Any]]],
) -> tuple[list[Mapping[str, Any]], StoredValue] | None:
    complete = _complete_values(by_event)
    return max(complete, key=lambda item: item[1].seq, default=None)


def _resolve_write(
    by_event: Mapping[str, list[Mapping[str, Any]]], *, keep_last: bool
) -> tuple[list[Mapping[str, Any]], StoredValue] | None:
    complete = _complete_values(by_event)
    if keep_last:
        return max(complete, key=lambda item: item[1].seq, default=None)
    return min(complete, key=lambda item: item[1].seq, default=None)


@dataclass(slots=True)
class ChannelHistory:
    """What the ancestor walk of ``get_delta_channel_history`` needs, for some channels."""

    parents: dict[str, str] = field(default_factory=dict)
    """checkpoint id -> parent checkpoint id ('' at the root)."""
    versions: dict[str, dict[str, str]] = field(default_factory=dict)
    """checkpoint id -> channel -> version."""
    blobs: dict[tuple[str, str], StoredValue] = field(default_factory=dict)
    """(channel, version) -> stored value."""
    writes: dict[str, list[StoredWrite]] = field(default_factory=dict)
    """checkpoint id -> its pending writes to the channels asked for."""
    seqs: dict[str, int] = field(default_factory=dict)
    """checkpoint id -> the sequence number of the event that wrote it."""

    def add_checkpoint(self, checkpoint: StoredCheckpoint, channels: Iterable[str]) -> None:
        wanted = set(channels)
        self.seqs[checkpoint.checkpoint_id] = checkpoint.checkpoint.seq
        self.parents[checkpoint.checkpoint_id] = checkpoint.parent_checkpoint_id
        self.versions[checkpoint.checkpoint_id] = checkpoint.channel_versions
        for channel, value in checkpoint.blobs.items():
            if channel in wanted:
                self.blobs[(channel, checkpoint.channel_versions[channel])] = value
        self.add_writes(checkpoint.checkpoint_id, checkpoint.writes, wanted)

    def drop_before(self, seq: int) -> None:
        """Forget what events numbered below ``seq`` wrote (a delete of the thread hides it)."""
        for checkpoint_id in [c for c, written in self.seqs.items() if written < seq]:
            del self.seqs[checkpoint_id], self.parents[checkpoint_id]
            self.versions.pop(checkpoint_id, None)
        self.blobs = {key: value for key, value in self.blobs.items() if value.seq >= seq}
        self.writes = {
            checkpoint_id: kept
            for checkpoint_id, writes in self.writes.items()
            if (kept := [w for w in writes if w.value.seq >= seq])
        }

    def add_writes(
        self, checkpoint_id: str, writes: Iterable[StoredWrite], channels: Iterable[str]
    ) -> None:
        """Writes to ``checkpoint_id`` that came later than those already held."""
        wanted = set(channels)
        slots = {(w.task_id, w.idx): w for w in self.writes.get(checkpoint_id, [])}
        add_writes(slots, [w for w in writes if w.channel in wanted])
        self.writes[checkpoint_id] = sorted(slots.values(), key=lambda w: w.sort_key)


def channel_history(rows: Iterable[Mapping[str, Any]]) -> ChannelHistory:
    """Rows of the channel-history query: checkpoint skeletons, blobs and writes."""
    history = ChannelHistory()
    blob_parts: dict[tuple[str, str], dict[str, list[Mapping[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    write_parts: dict[str, dict[tuple[str, int], dict[str, list[Mapping[str, Any]]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for row in rows:
        kind = row["RowKind"]
        if kind == RowKind.CHECKPOINT:
            checkpoint_id = str(row["CheckpointId"])
            history.seqs[checkpoint_id] = int(row["EventSeq"])
            history.parents[checkpoint_id] = str(row.get("ParentCheckpointId") or "")
            history.versions[checkpoint_id] = _versions(row.get("BlobKeys"))
        elif kind == RowKind.BLOB:
            key = (str(row["Channel"]), str(row["Version"]))
            blob_parts[key][str(row["EventId"])].append(row)
        elif kind == RowKind.WRITE:
            slot = (str(row["TaskId"]), int(row["WriteIdx"]))
            write_parts[str(row["CheckpointId"])][slot][str(row["EventId"])].append(row)
    for key, by_event in blob_parts.items():
        chosen = _latest_complete(by_event)
        if chosen is not None:
            history.blobs[key] = chosen[1]
    for checkpoint_id, slots in write_parts.items():
        writes = []
        for (task_id, idx), by_event in slots.items():
            resolved = _resolve_write(by_event, keep_last=idx < 0)
            if resolved is not None:
                head = resolved[0][0]
                writes.append(
                    StoredWrite(
                        task_id,
                        str(head.get("TaskPath") or ""),
                        idx,
                        str(head["Channel"]),
                        resolved[1],
                    )
                )
        history.writes[checkpoint_id] = sorted(writes, key=lambda w: w.sort_key)
    return history


def add_writes(slots: dict[tuple[str, int], StoredWrite], writes: Iterable[StoredWrite]) -> int:
    """LangGraph's rule: a regular write keeps the first, a special write the last.

    Returns how many payload bytes the slots grew by (a replaced write's bytes count out).
    """
    grown = 0
    for write in writes:
        slot = (write.task_id, write.idx)
        replaced = slots.get(slot)
        if replaced is not None and write.idx >= 0:
            continue
        slots[slot] = write
        grown += len(write.value.data) - (len(replaced.value.data) if replaced else 0)
    return grown
