"""The read cache: read-your-writes for ``session`` consistency, bounded in entries and bytes.

It holds what this process wrote, in serialized form (so callers always get fresh
objects). An entry whose event Kusto has not confirmed yet is pinned: evicting it could
make this process read state older than it wrote. Confirmed entries are evicted least
recently used first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from langgraph.checkpoint.kusto.shared.assembly import (
    CheckpointKey,
    StoredCheckpoint,
    StoredWrite,
    add_writes,
)
from langgraph.checkpoint.kusto.shared.rows import StoredValue

DEFAULT_MAX_ENTRIES = 10_000

_WriteSlots = dict[tuple[str, int], StoredWrite]
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


@dataclass(slots=True)
class _Entry:
    checkpoint: StoredCheckpoint
    event_ids: set[str]
    size: int
    confirmed: bool = False
    pending_writes: dict[tuple[str, int], StoredWrite] = field(default_factory=dict)


_BlobRef = tuple[str, str, str, str]
"""(thread_id, checkpoint_ns, channel, version): blobs are shared by the checkpoints
that reference them, as in the official savers, and counted once."""


class ReadCache:
    """Thread-safe; all methods are O(1) or O(entries of one thread)."""

    def __init__(
        self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("cache bounds must be positive")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[CheckpointKey, _Entry] = OrderedDict()
        self._latest: dict[tuple[str, str], str] = {}
        self._deleted: dict[str, int] = {}
        self._deleted_runs: dict[str, int] = {}
        self._pruned: dict[str, tuple[int, frozenset[tuple[str, str]]]] = {}
        self._orphan_writes: dict[CheckpointKey, tuple[set[str], _WriteSlots]] = {}
        self._blobs: dict[_BlobRef, tuple[StoredValue, int]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, checkpoint: StoredCheckpoint, event_id: str) -> bool:
        """Cache a checkpoint this process wrote.

        Blobs of channels it did not change come from the checkpoints cached before it.
        If one is not cached, the checkpoint cannot be served whole from here: it is not
        cached and reads of the thread go to Kusto. ``False`` says so.
        """
        thread_id, checkpoint_ns = checkpoint.thread_id, checkpoint.checkpoint_ns
        ns_key = (thread_id, checkpoint_ns)
        refs = {
            channel: (thread_id, checkpoint_ns, channel, version)
            for channel, version in checkpoint.channel_versions.items()
        }
        with self._lock:
            complete = all(c in checkpoint.blobs or ref in self._blobs for c, ref in refs.items())
            if complete:
                # Hold the new references before releasing an earlier put's, which may be
                # the only holder of a blob this checkpoint inherits.
                for channel, ref in refs.items():
                    self._hold_blob(ref, checkpoint.blobs.get(channel))
            # Pending writes may arrive before their checkpoint (LangGraph saves checkpoints
            # in the background while the next step runs); they, like the writes of an
            # earlier put of the same id, belong to the entry.
            previous = self._remove(checkpoint.key)
            held = self._orphan_writes.pop(checkpoint.key, None)
            pending: _WriteSlots = dict(previous.pending_writes) if previous else {}
            event_ids = {event_id}
            if held is not None:
                event_ids |= held[0]
                add_writes(pending, held[1].values())
            if not complete:
                self._latest.pop(ns_key, None)
                if pending:
                    self._orphan_writes[checkpoint.key] = (event_ids, pending)
                return False
            checkpoint.blobs = {}
            size = len(checkpoint.checkpoint.data) + sum(
                len(w.value.data) for w in pending.values()
            )
            self._entries[checkpoint.key] = _Entry(checkpoint, event_ids, size, False, pending)
            self._bytes += size
            if checkpoint.checkpoint_id >= self._latest.get(ns_key, ""):
                self._latest[ns_key] = checkpoint.checkpoint_id
            self._evict_confirmed()
            return True

    def _hold_blob(self, ref: _BlobRef, value: StoredValue | None) -> None:
        """Count one more reference; a new value replaces the old one (the later write
        wins, as it does in Kusto's answer)."""
        held = self._blobs.get(ref)
        if held is None:
            assert value is not None
            self._blobs[ref] = (value, 1)
            self._bytes += len(value.data)
            return
        if value is not None:
            self._bytes += len(value.data) - len(held[0].data)
        self._blobs[ref] = (value or held[0], held[1] + 1)

    def _release_blob(self, ref: _BlobRef) -> None:
        value, count = self._blobs[ref]
        if count > 1:
            self._blobs[ref] = (value, count - 1)
        else:
            del self._blobs[ref]
            self._bytes -= len(value.data)

    def _remove(self, key: CheckpointKey) -> _Entry | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.size
            checkpoint = entry.checkpoint
            for channel, version in checkpoint.channel_versions.items():
                self._release_blob((key[0], key[1], channel, version))
        return entry

    def put_writes(self, key: CheckpointKey, writes: Iterable[StoredWrite], event_id: str) -> None:
        """Record writes; for a checkpoint not cached here they wait for Kusto to confirm them."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                event_ids, slots = self._orphan_writes.setdefault(key, (set(), {}))
                event_ids.add(event_id)
                add_writes(slots, writes)
                return
            added = add_writes(entry.pending_writes, writes)
            entry.size += added
            self._bytes += added
            entry.event_ids.add(event_id)
            entry.confirmed = False
            self._entries.move_to_end(key)

    def orphan_writes(self, key: CheckpointKey) -> list[StoredWrite]:
        """Writes this process made for a checkpoint it did not write itself."""
        with self._lock:
            held = self._orphan_writes.get(key)
            return [] if held is None else list(held[1].values())

    def get(self, key: CheckpointKey) -> StoredCheckpoint | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return self._merged(entry)

    def latest(self, thread_id: str, checkpoint_ns: str) -> StoredCheckpoint | None:
        with self._lock:
            checkpoint_id = self._latest.get((thread_id, checkpoint_ns))
            entry = self._entries.get((thread_id, checkpoint_ns, checkpoint_id or ""))
            return None if entry is None else self._merged(entry)

    def of_thread(self, thread_id: str | None) -> list[StoredCheckpoint]:
        with self._lock:
            return [
                self._merged(entry)
                for key, entry in self._entries.items()
                if thread_id is None or key[0] == thread_id
            ]

    def delete_thread(self, thread_id: str, seq: int) -> None:
        with self._lock:
            for key in [k for k in self._entries if k[0] == thread_id]:
                self._remove(key)
            for ns_key in [k for k in self._latest if k[0] == thread_id]:
                del self._latest[ns_key]
            for key in [k for k in self._orphan_writes if k[0] == thread_id]:
                del self._orphan_writes[key]
            self._deleted[thread_id] = seq

    def delete_runs(self, run_ids: Iterable[str], seq: int) -> None:
        runs = set(run_ids)
        with self._lock:
            for key in [
                k for k, e in self._entries.items() if e.checkpoint.metadata.get("run_id") in runs
            ]:
                self._remove(key)
                ns_key = (key[0], key[1])
                if self._latest.get(ns_key) == key[2]:
                    del self._latest[ns_key]
            for run_id in runs:
                self._deleted_runs[run_id] = seq

    def prune(self, thread_id: str, kept: Iterable[tuple[str, str]], seq: int) -> None:
        survivors = frozenset(kept)
        with self._lock:
            for key in [k for k in self._entries if k[0] == thread_id]:
                if (key[1], key[2]) not in survivors:
                    self._remove(key)
            for ns_key in [k for k in self._latest if k[0] == thread_id]:
                if (ns_key[1], self._latest[ns_key]) not in survivors:
                    del self._latest[ns_key]
            self._pruned[thread_id] = (seq, survivors)

    def hides(self, checkpoint: StoredCheckpoint) -> bool:
        """Whether a delete or prune this process made hides ``checkpoint`` read from Kusto.

        Kusto may not have ingested that delete yet; the sequence decides, as it does there.
        """
        seq = checkpoint.checkpoint.seq
        if seq < self._deleted.get(checkpoint.thread_id, 0):
            return True
        run_id = checkpoint.metadata.get("run_id")
        if run_id is not None and seq < self._deleted_runs.get(str(run_id), 0):
            return True
        pruned = self._pruned.get(checkpoint.thread_id)
        return (
            pruned is not None
            and seq < pruned[0]
            and (checkpoint.checkpoint_ns, checkpoint.checkpoint_id) not in pruned[1]
        )

    def unconfirmed_event_ids(self, limit: int) -> list[str]:
        with self._lock:
            ids: list[str] = []
            for entry in self._entries.values():
                if not entry.confirmed:
                    ids.extend(entry.event_ids)
            for event_ids, _ in self._orphan_writes.values():
                ids.extend(event_ids)
            return ids[:limit]

    def confirm(self, visible_event_ids: set[str]) -> None:
        """Mark entries whose every event is queryable in Kusto; they become evictable."""
        with self._lock:
            for entry in self._entries.values():
                if not entry.confirmed and entry.event_ids <= visible_event_ids:
                    entry.confirmed = True
            for key in [
                k for k, (ids, _) in self._orphan_writes.items() if ids <= visible_event_ids
            ]:
                del self._orphan_writes[key]
            self._evict_confirmed()

    def has_unconfirmed(self) -> bool:
        with self._lock:
            return bool(self._orphan_writes) or any(not e.confirmed for e in self._entries.values())

    def over_bound(self) -> bool:
        return len(self._entries) > self.max_entries or self._bytes > self.max_bytes

    def _evict_confirmed(self) -> None:
        if not self.over_bound():
            return
        for key in [k for k, e in self._entries.items() if e.confirmed]:
            self._remove(key)
            ns_key = (key[0], key[1])
            if self._latest.get(ns_key) == key[2]:
                del self._latest[ns_key]
            if not self.over_bound():
                return

    def _merged(self, entry: _Entry) -> StoredCheckpoint:
        checkpoint = entry.checkpoint
        thread_id, checkpoint_ns = checkpoint.thread_id, checkpoint.checkpoint_ns
        return StoredCheckpoint(
            thread_id=checkpoint.thread_id,
            checkpoint_ns=checkpoint.checkpoint_ns,
            checkpoint_id=checkpoint.checkpoint_id,
            parent_checkpoint_id=checkpoint.parent_checkpoint_id,
            checkpoint=checkpoint.checkpoint,
            metadata=checkpoint.metadata,
            channel_versions=checkpoint.channel_versions,
            blobs={
                channel: self._blobs[(thread_id, checkpoint_ns, channel, version)][0]
                for channel, version in checkpoint.channel_versions.items()
            },
            writes=sorted(entry.pending_writes.values(), key=lambda w: w.sort_key),
        )
