"""The read cache: read-your-writes for ``session`` consistency, bounded in entries and bytes.

It holds what this process wrote, in serialized form, so every read hands out fresh
objects. The second read of an entry (since it last changed) also stores a *snapshot*:
the whole checkpoint tuple serialized as one value by the saver, so later reads are a
single decode. Not the first: an agent reads most checkpoints once, at the start of its
next run, and making a snapshot costs about as much as that read.

Eviction is least-recently-used. Evicting an entry whose events Kusto has not
confirmed yet would let a later read return older state than this process wrote, so the
cache remembers such keys as *awaited*: a read of them first waits until Kusto has
ingested those events. Kusto confirms events in bulk (``confirm``). What the cache
remembers of an unconfirmed event counts against the byte bound too: with the worker far
behind or down, that bookkeeping alone can fill the bound, and the saver then waits for
confirmations before it publishes more (``reserve``).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from langgraph.checkpoint.kusto.shared.assembly import (
    CheckpointKey,
    StoredCheckpoint,
    StoredWrite,
    add_writes,
)
from langgraph.checkpoint.kusto.shared.rows import StoredValue, run_id_of

DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_MAX_BYTES = 256 * 1024 * 1024

ENTRY_OVERHEAD_BYTES = 1_200
"""Python objects around one cached checkpoint (keys, dicts, ids), counted against the
byte bound so that it bounds the process's memory, not just the payloads. Measured on
CPython 3.11 with small metadata: ~1.2 KB per entry plus ~0.4 KB per distinct blob."""
BLOB_OVERHEAD_BYTES = 400
PENDING_EVENT_BYTES = 1_100
"""What the cache remembers of one unconfirmed event: its id and sequence and, once its
entry is evicted, the awaited key and the index back to it. Measured on CPython 3.11:
~1,090 bytes for an event of an evicted entry (10,000 threads); ~400 for a thread
delete, ~500 for a run delete of one run, ~920 for a prune keeping one checkpoint."""
RECORD_ITEM_BYTES = 300
"""Each run id of an unconfirmed run delete, and each checkpoint an unconfirmed prune
keeps, beyond the first (``PENDING_EVENT_BYTES`` covers one). Measured on CPython 3.11:
~190 bytes a run id, ~280 a kept checkpoint (with its own namespace string)."""

_WriteSlots = dict[tuple[str, int], StoredWrite]
Snapshot = tuple[str, bytes]
"""A whole checkpoint tuple as one ``(encoding, bytes)`` value, made by the saver."""
SnapshotFunction = Callable[[StoredCheckpoint], Snapshot | None]
_NO_SNAPSHOT: Snapshot = ("", b"")
"""Marks an entry the snapshot function declined, so it is not asked again."""
_R = TypeVar("_R")
_BlobRef = tuple[str, str, str, str]
"""(thread_id, checkpoint_ns, channel, version): blobs are shared by the checkpoints
that reference them, as in the official savers, and counted once."""


@dataclass(slots=True)
class _Orphans:
    """Writes this process made to a checkpoint the cache does not hold."""

    event_ids: set[str] = field(default_factory=set)
    slots: _WriteSlots = field(default_factory=dict)
    size: int = BLOB_OVERHEAD_BYTES
    used: int = 0


@dataclass(slots=True)
class _Records(Generic[_R]):
    """This process's deletes (or prunes) of one kind, by thread or run id.

    A put published before one but applied after it stays hidden, and so do the rows it
    hides that Kusto returns before ingesting it. So a record stays while Kusto has not
    confirmed its event (the byte bound covers those); of the confirmed ones, the newest
    ``limit`` stay, for puts that Kusto ingests late."""

    limit: int
    by_key: dict[str, tuple[str, _R]] = field(default_factory=dict)
    """key -> (event id, record) of the latest delete or prune of it."""
    unconfirmed: dict[str, list[str]] = field(default_factory=dict)
    """event id -> the keys it recorded, until Kusto confirms it."""
    confirmed: OrderedDict[str, None] = field(default_factory=OrderedDict)
    """Keys whose latest record Kusto has, oldest confirmation first: the first let go."""

    def get(self, key: str) -> _R | None:
        held = self.by_key.get(key)
        return None if held is None else held[1]

    def add(self, key: str, record: _R, event_id: str) -> None:
        self.by_key[key] = (event_id, record)
        self.confirmed.pop(key, None)
        self.unconfirmed.setdefault(event_id, []).append(key)

    def confirm(self, event_id: str) -> None:
        """Kusto has ``event_id``: its records go once ``limit`` are confirmed after them."""
        for key in self.unconfirmed.pop(event_id, ()):
            held = self.by_key.get(key)
            if held is not None and held[0] == event_id:  # not replaced by a later one
                self.confirmed[key] = None
        while len(self.confirmed) > self.limit:
            del self.by_key[self.confirmed.popitem(last=False)[0]]


@dataclass(slots=True)
class _Entry:
    checkpoint: StoredCheckpoint
    event_ids: set[str]
    size: int
    pending_writes: _WriteSlots = field(default_factory=dict)
    snapshot: Snapshot | None = None
    read_once: bool = False
    """Read once since it last changed, without a snapshot: the next read makes one."""
    used: int = 0
    """When it was last used, on the clock ``_use`` advances (entries and orphan writes
    share it, so eviction is least-recently-used across both)."""


class ReadCache:
    """Thread-safe. Every operation is O(1) amortized or O(entries of one thread), but
    ``delete_runs`` (runs span threads) and ``of_thread(None)``."""

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        snapshot: SnapshotFunction | None = None,
    ) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("cache bounds must be positive")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._snapshot = snapshot
        self._entries: OrderedDict[CheckpointKey, _Entry] = OrderedDict()
        self._thread_keys: dict[str, dict[CheckpointKey, None]] = {}
        """thread -> the keys of its entries, so that a thread's reads, deletes and prunes
        touch its entries only: scanning 10,000 entries took ~3 ms, holding the lock."""
        self._latest: dict[tuple[str, str], str] = {}
        self._blobs: dict[_BlobRef, tuple[StoredValue, int]] = {}
        self._orphan_writes: OrderedDict[CheckpointKey, _Orphans] = OrderedDict()
        self._dropped_orphans: OrderedDict[CheckpointKey, None] = OrderedDict()
        """Keys whose orphan writes were let go (Kusto holds them, or the bound evicted
        them): a later put of such a checkpoint is not served whole from the cache."""
        self._forgotten_orphans_up_to = ""
        """The newest checkpoint id of the keys ``_dropped_orphans`` no longer holds (it
        keeps ``max_entries``): a later put of a checkpoint no newer is not served whole
        either, as it may be one of them (ids are time-ordered, so puts of new checkpoints
        are served)."""
        self._pending: dict[str, int] = {}
        """Events published but not yet confirmed in Kusto: event id -> sequence."""
        self._awaited: dict[str, dict[tuple[str, str], set[str]]] = {}
        """thread -> (ns, checkpoint id) -> unconfirmed events of an evicted entry."""
        self._waiting_on: dict[str, set[CheckpointKey]] = {}
        """event id -> the awaited keys and orphan writes that wait on it, so confirming
        costs O(events confirmed), not O(keys awaited): with the worker 60k events behind,
        a confirm round held the lock for 257 ms."""
        self._deleted: _Records[int] = _Records(max_entries)
        """thread -> seq of this process's latest delete of it."""
        self._deleted_runs: _Records[int] = _Records(max_entries)
        self._pruned: _Records[tuple[int, frozenset[tuple[str, str]]]] = _Records(max_entries)
        self._hiding: dict[str, tuple[str | None, float, int]] = {}
        """Unconfirmed run deletes (scope None: any thread) and prunes (scope: their
        thread), with when they were made and the bytes charged for their records beyond
        ``PENDING_EVENT_BYTES``. Unlike a thread delete within its thread, they hide rows
        *between* visible ones, so Kusto's ``top`` must apply them: reads of their scope
        wait until Kusto holds them."""
        self._deleting: dict[str, float] = {}
        """Unconfirmed thread deletes, with when they were made. Within their thread they
        hide every older row, so the cache's own filter serves its reads; but they hide
        rows between other threads' rows too, so reads of all threads wait for them."""
        self._record_bytes = 0
        """The bytes charged in ``_hiding``: like pending events, they cannot be evicted."""
        self._dead_lettered: dict[str, str] = {}
        """Unconfirmed events the ingestor dead-lettered: event id -> reason. They stay
        pending (reads of what they wrote cannot be answered) until replayed."""
        self._reserved = 0
        """Events a publisher has room for (``reserve``) but has not remembered yet."""
        self._bytes = 0
        self._uses = 0
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    # -- writes -------------------------------------------------------------

    def put(self, checkpoint: StoredCheckpoint, event_id: str, seq: int) -> bool:
        """Cache a checkpoint this process wrote.

        Blobs of channels it did not change come from the checkpoints cached before it.
        If one is not cached, the checkpoint cannot be served whole from here: it is
        awaited instead (reads wait for Kusto). ``False`` says so.
        """
        thread_id, checkpoint_ns = checkpoint.thread_id, checkpoint.checkpoint_ns
        ns_key = (thread_id, checkpoint_ns)
        refs = {
            channel: (thread_id, checkpoint_ns, channel, version)
            for channel, version in checkpoint.channel_versions.items()
        }
        with self._lock:
            self._add_pending(event_id, seq)
            if self._hides(checkpoint):
                # Published before a delete this process made, but applied after it (its
                # send took longer): Kusto hides it by sequence, and so does the cache.
                self._evict()
                return False
            complete = all(c in checkpoint.blobs or ref in self._blobs for c, ref in refs.items())
            if checkpoint.key in self._dropped_orphans:
                del self._dropped_orphans[checkpoint.key]
                complete = False  # some of its writes are only in Kusto now
            elif checkpoint.checkpoint_id <= self._forgotten_orphans_up_to:
                complete = False  # some of its writes may be only in Kusto
            if complete:
                # Hold the new references before releasing an earlier put's, which may be
                # the only holder of a blob this checkpoint inherits.
                for channel, ref in refs.items():
                    self._hold_blob(ref, checkpoint.blobs.get(channel))
            # Pending writes may arrive before their checkpoint (LangGraph saves checkpoints
            # in the background while the next step runs); they, like the writes of an
            # earlier put of the same id, belong to the entry.
            previous = self._pop_entry(checkpoint.key) if checkpoint.key in self._entries else None
            if previous is not None:
                self._release(previous)
            held = self._orphan_writes.pop(checkpoint.key, None)
            pending: _WriteSlots = dict(previous.pending_writes) if previous else {}
            event_ids = {event_id} | (previous.event_ids if previous else set())
            if held is not None:
                self._bytes -= held.size
                event_ids |= held.event_ids
                add_writes(pending, held.slots.values())
            if not complete:
                self._await(checkpoint.key, event_ids)
                if self._latest.get(ns_key, "") <= checkpoint.checkpoint_id:
                    self._latest.pop(ns_key, None)
                self._evict()
                return False
            checkpoint.blobs = {}
            size = (
                ENTRY_OVERHEAD_BYTES
                + len(checkpoint.checkpoint.data)
                + sum(len(w.value.data) for w in pending.values())
            )
            self._add_entry(
                checkpoint.key, _Entry(checkpoint, event_ids, size, pending, used=self._use())
            )
            self._bytes += size
            if checkpoint.checkpoint_id >= self._latest.get(ns_key, ""):
                self._latest[ns_key] = checkpoint.checkpoint_id
            self._evict()
            return True

    def put_writes(
        self, key: CheckpointKey, writes: Iterable[StoredWrite], event_id: str, seq: int
    ) -> None:
        """Record pending writes; for a checkpoint not cached they wait for Kusto."""
        with self._lock:
            self._add_pending(event_id, seq)
            entry = self._entries.get(key)
            if entry is None:
                orphans = self._orphan_writes.get(key)
                if orphans is None:
                    orphans = self._orphan_writes[key] = _Orphans()
                    self._bytes += orphans.size
                orphans.event_ids.add(event_id)
                self._waiting_on.setdefault(event_id, set()).add(key)
                grown = add_writes(orphans.slots, writes)
                orphans.size += grown
                self._bytes += grown
                self._orphan_writes.move_to_end(key)
                orphans.used = self._use()
                self._evict()
                return
            self._drop_snapshot(entry)
            grown = add_writes(entry.pending_writes, writes)
            entry.size += grown
            self._bytes += grown
            entry.event_ids.add(event_id)
            self._touch(key)
            self._evict()

    def delete_thread(self, thread_id: str, event_id: str, seq: int) -> None:
        with self._lock:
            self._drop(self._keys_of(thread_id))
            for key in [k for k in self._orphan_writes if k[0] == thread_id]:
                self._bytes -= self._orphan_writes.pop(key).size
            self._awaited.pop(thread_id, None)
            self._add_pending(event_id, seq)
            self._deleted.add(thread_id, seq, event_id)
            self._deleting[event_id] = time.monotonic()
            self._evict()

    def delete_runs(self, run_ids: Iterable[str], event_id: str, seq: int) -> None:
        runs = set(run_ids)
        with self._lock:
            self._drop(
                key
                for key, entry in self._entries.items()
                if run_id_of(entry.checkpoint.metadata) in runs
            )
            self._add_pending(event_id, seq)
            self._hide_until_confirmed(event_id, None, len(runs))
            for run_id in runs:
                self._deleted_runs.add(run_id, seq, event_id)
            self._evict()

    def prune(
        self, thread_id: str, kept: Iterable[tuple[str, str]], event_id: str, seq: int
    ) -> None:
        survivors = frozenset(kept)
        with self._lock:
            self._drop(
                key
                for key in self._keys_of(thread_id)
                if self._prunes(self._entries[key].checkpoint, seq, survivors)
            )
            for key in self._keys_of(thread_id):  # a survivor whose parent goes: none
                entry = self._entries[key]
                parent = (key[1], entry.checkpoint.parent_checkpoint_id)
                orphaned = parent[1] and parent not in survivors
                if key[1:] in survivors and orphaned:
                    entry.checkpoint = replace(entry.checkpoint, parent_checkpoint_id="")
                    self._drop_snapshot(entry)
            self._add_pending(event_id, seq)
            self._hide_until_confirmed(event_id, thread_id, len(survivors))
            self._pruned.add(thread_id, (seq, survivors), event_id)
            self._evict()

    # -- reads --------------------------------------------------------------

    def get(self, key: CheckpointKey) -> Snapshot | StoredCheckpoint | None:
        """The entry's snapshot (made on its second read) or, without one, its stored form."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._touch(key)
            return self._read(entry)

    def latest(self, thread_id: str, checkpoint_ns: str) -> Snapshot | StoredCheckpoint | None:
        with self._lock:
            checkpoint_id = self._latest.get((thread_id, checkpoint_ns))
            if checkpoint_id is None:
                return None
            key = (thread_id, checkpoint_ns, checkpoint_id)
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._touch(key)
            return self._read(entry)

    def of_thread(self, thread_id: str | None) -> list[StoredCheckpoint]:
        """What the cache holds of ``thread_id``, or of every thread for ``None``."""
        with self._lock:
            if thread_id is None:
                return [self._merged(entry) for entry in self._entries.values()]
            return [self._merged(self._entries[key]) for key in self._keys_of(thread_id)]

    def orphan_writes(self, key: CheckpointKey) -> list[StoredWrite]:
        """Writes this process made for a checkpoint it did not write itself."""
        with self._lock:
            held = self._orphan_writes.get(key)
            return [] if held is None else list(held.slots.values())

    def hides(self, checkpoint: StoredCheckpoint) -> bool:
        """Whether a delete or prune this process made hides ``checkpoint`` read from Kusto.

        Kusto may not have ingested that delete yet; the sequence decides, as it does there.
        """
        with self._lock:
            return self._hides(checkpoint)

    def deleted_seq(self, thread_id: str) -> int:
        """The sequence number of this process's latest delete of the thread (0: none): what
        it hides is every row of the thread numbered below it."""
        with self._lock:
            return self._deleted.get(thread_id) or 0

    def awaited(
        self,
        thread_id: str | None,
        checkpoint_ns: str | None,
        checkpoint_id: str | None,
        hides_since: float = -math.inf,
    ) -> dict[str, int]:
        """Events Kusto must hold before a read of this scope may trust it (id -> seq).

        Run deletes and prunes made before ``hides_since`` (``time.monotonic()``) are no
        longer waited for: one that never reaches Kusto (dead-lettered) must not block
        reads for good."""
        with self._lock:
            threads = (
                self._awaited.values()
                if thread_id is None
                else ([self._awaited[thread_id]] if thread_id in self._awaited else [])
            )
            found: dict[str, int] = {}
            for by_checkpoint in threads:
                for (ns, cid), event_ids in by_checkpoint.items():
                    if checkpoint_ns is not None and ns != checkpoint_ns:
                        continue
                    if checkpoint_id and cid != checkpoint_id:
                        continue
                    found.update((e, self._pending[e]) for e in event_ids if e in self._pending)
            found.update(
                (event_id, self._pending[event_id])
                for event_id, (scope, made, _) in self._hiding.items()
                if made >= hides_since
                and (scope is None or thread_id is None or scope == thread_id)
            )
            if thread_id is None:
                found.update(
                    (event_id, self._pending[event_id])
                    for event_id, made in self._deleting.items()
                    if made >= hides_since
                )
            return found

    # -- confirmation from Kusto ----------------------------------------------

    def pending_count(self) -> int:
        return len(self._pending)

    def pending_events(self) -> dict[str, int]:
        with self._lock:
            return dict(self._pending)

    def confirm(self, ingested_event_ids: Iterable[str]) -> None:
        """Events Kusto has ingested: their entries become plain evictable entries."""
        with self._lock:
            pending = self._pending
            for event_id in ingested_event_ids:
                if pending.pop(event_id, None) is None:
                    continue
                self._bytes -= PENDING_EVENT_BYTES
                self._dead_lettered.pop(event_id, None)
                hidden = self._hiding.pop(event_id, None)
                if hidden is not None:
                    self._record_bytes -= hidden[2]
                    self._bytes -= hidden[2]
                self._deleting.pop(event_id, None)
                self._deleted.confirm(event_id)
                self._deleted_runs.confirm(event_id)
                self._pruned.confirm(event_id)
                for key in self._waiting_on.pop(event_id, ()):
                    by_checkpoint = self._awaited.get(key[0], {})
                    waiting = by_checkpoint.get((key[1], key[2]))
                    if waiting is not None:
                        waiting.discard(event_id)
                        if not waiting:
                            del by_checkpoint[(key[1], key[2])]
                            if not by_checkpoint:
                                del self._awaited[key[0]]
                    held = self._orphan_writes.get(key)
                    if held is not None and not held.event_ids & pending.keys():
                        self._drop_orphans(key)

    def dead_letter(self, reasons: Mapping[str, str]) -> None:
        """Note which unconfirmed events the ingestor dead-lettered (event id -> reason)."""
        with self._lock:
            self._dead_lettered.update(
                (event_id, reason)
                for event_id, reason in reasons.items()
                if event_id in self._pending
            )

    def dead_lettered(self) -> dict[str, str]:
        with self._lock:
            return dict(self._dead_lettered)

    def over_bound(self) -> bool:
        return len(self._entries) > self.max_entries or self._bytes > self.max_bytes

    def reserve(self, events: int) -> bool:
        """Make room for ``events`` more unconfirmed events, before they are sent, if they
        fit the byte bound with entries evicted (what is remembered of unconfirmed events
        cannot be). A publish larger than the whole bound fits when nothing else is
        unconfirmed. Each reserved event is then remembered, or ``release``d."""
        with self._lock:
            unconfirmed = len(self._pending) + self._reserved
            unevictable = unconfirmed * PENDING_EVENT_BYTES + self._record_bytes
            if unconfirmed and unevictable + events * PENDING_EVENT_BYTES > self.max_bytes:
                return False
            self._reserved += events
            self._bytes += events * PENDING_EVENT_BYTES
            self._evict()
            return True

    def release(self, events: int) -> None:
        """Give back room reserved for events that were not sent."""
        with self._lock:
            returned = min(events, self._reserved)  # the rest went to events remembered
            self._reserved -= returned
            self._bytes -= returned * PENDING_EVENT_BYTES

    # -- internals (lock held) --------------------------------------------------

    def _hides(self, checkpoint: StoredCheckpoint) -> bool:
        seq = checkpoint.checkpoint.seq
        if seq < (self._deleted.get(checkpoint.thread_id) or 0):
            return True
        run_id = run_id_of(checkpoint.metadata)
        if run_id and seq < (self._deleted_runs.get(run_id) or 0):
            return True
        pruned = self._pruned.get(checkpoint.thread_id)
        return pruned is not None and self._prunes(checkpoint, pruned[0], pruned[1])

    @staticmethod
    def _prunes(
        checkpoint: StoredCheckpoint, seq: int, survivors: frozenset[tuple[str, str]]
    ) -> bool:
        """As Kusto applies a prune: older than it, in a namespace it names, not kept."""
        return (
            checkpoint.checkpoint.seq < seq
            and (checkpoint.checkpoint_ns, checkpoint.checkpoint_id) not in survivors
            and any(ns == checkpoint.checkpoint_ns for ns, _ in survivors)
        )

    def _use(self) -> int:
        self._uses += 1
        return self._uses

    def _touch(self, key: CheckpointKey) -> None:
        self._entries.move_to_end(key)
        self._entries[key].used = self._use()

    def _evict(self) -> None:
        """Least recently used first, entries and orphan writes alike."""
        while self.over_bound() and (self._entries or self._orphan_writes):
            entry_key = next(iter(self._entries), None)
            orphan_key = next(iter(self._orphan_writes), None)
            if entry_key is not None and (
                orphan_key is None
                or len(self._entries) > self.max_entries
                or self._entries[entry_key].used < self._orphan_writes[orphan_key].used
            ):
                self._evict_entry(entry_key)
            else:
                assert orphan_key is not None
                self._await(orphan_key, self._orphan_writes[orphan_key].event_ids)
                self._drop_orphans(orphan_key)

    def _add_entry(self, key: CheckpointKey, entry: _Entry) -> None:
        self._entries[key] = entry
        self._thread_keys.setdefault(key[0], {})[key] = None

    def _pop_entry(self, key: CheckpointKey) -> _Entry:
        keys = self._thread_keys[key[0]]
        del keys[key]
        if not keys:
            del self._thread_keys[key[0]]
        return self._entries.pop(key)

    def _keys_of(self, thread_id: str) -> list[CheckpointKey]:
        return list(self._thread_keys.get(thread_id, ()))

    def _evict_entry(self, key: CheckpointKey) -> None:
        entry = self._pop_entry(key)
        self._release(entry)
        self._await(key, entry.event_ids)
        ns_key = (key[0], key[1])
        if self._latest.get(ns_key) == key[2]:
            del self._latest[ns_key]

    def _add_pending(self, event_id: str, seq: int) -> None:
        if event_id not in self._pending:
            if self._reserved > 0:
                self._reserved -= 1  # its bytes were counted when its room was reserved
            else:
                self._bytes += PENDING_EVENT_BYTES
        self._pending[event_id] = seq

    def _hide_until_confirmed(self, event_id: str, scope: str | None, records: int) -> None:
        """Note a run delete (of ``records`` runs) or prune (keeping ``records`` checkpoints)
        in ``_hiding``, charging its records until Kusto confirms it."""
        charged = max(records - 1, 0) * RECORD_ITEM_BYTES
        self._hiding[event_id] = (scope, time.monotonic(), charged)
        self._record_bytes += charged
        self._bytes += charged

    def _drop_orphans(self, key: CheckpointKey) -> None:
        self._bytes -= self._orphan_writes.pop(key).size
        self._dropped_orphans[key] = None
        while len(self._dropped_orphans) > self.max_entries:
            forgotten, _ = self._dropped_orphans.popitem(last=False)
            self._forgotten_orphans_up_to = max(self._forgotten_orphans_up_to, forgotten[2])

    def _await(self, key: CheckpointKey, event_ids: set[str]) -> None:
        unconfirmed = event_ids & self._pending.keys()
        if not unconfirmed:
            return
        by_checkpoint = self._awaited.setdefault(key[0], {})
        by_checkpoint.setdefault((key[1], key[2]), set()).update(unconfirmed)
        for event_id in unconfirmed:
            self._waiting_on.setdefault(event_id, set()).add(key)

    def _drop(self, keys: Iterable[CheckpointKey]) -> None:
        for key in list(keys):
            self._release(self._pop_entry(key))
            ns_key = (key[0], key[1])
            if self._latest.get(ns_key) == key[2]:
                del self._latest[ns_key]

    def _release(self, entry: _Entry) -> None:
        self._bytes -= entry.size
        checkpoint = entry.checkpoint
        for channel, version in checkpoint.channel_versions.items():
            ref = (checkpoint.thread_id, checkpoint.checkpoint_ns, channel, version)
            value, count = self._blobs[ref]
            if count > 1:
                self._blobs[ref] = (value, count - 1)
            else:
                del self._blobs[ref]
                self._bytes -= BLOB_OVERHEAD_BYTES + len(value.data)

    def _hold_blob(self, ref: _BlobRef, value: StoredValue | None) -> None:
        """Count one more reference; a new value replaces the old one (the later write
        wins, as it does in Kusto's answer)."""
        held = self._blobs.get(ref)
        if held is None:
            assert value is not None
            self._blobs[ref] = (value, 1)
            self._bytes += BLOB_OVERHEAD_BYTES + len(value.data)
            return
        if value is not None:
            self._bytes += len(value.data) - len(held[0].data)
        self._blobs[ref] = (value or held[0], held[1] + 1)

    def _read(self, entry: _Entry) -> Snapshot | StoredCheckpoint:
        if entry.snapshot is None and self._snapshot is not None and entry.read_once:
            merged = self._merged(entry)
            entry.snapshot = self._snapshot(merged) or _NO_SNAPSHOT
            entry.size += len(entry.snapshot[1])
            self._bytes += len(entry.snapshot[1])
            self._evict()
            return merged if entry.snapshot is _NO_SNAPSHOT else entry.snapshot
        if entry.snapshot is None or entry.snapshot is _NO_SNAPSHOT:
            entry.read_once = True
            return self._merged(entry)
        return entry.snapshot

    def _drop_snapshot(self, entry: _Entry) -> None:
        """The entry changed: its snapshot, if any, is stale, and so is its first read."""
        entry.read_once = False
        if entry.snapshot is not None:
            entry.size -= len(entry.snapshot[1])
            self._bytes -= len(entry.snapshot[1])
            entry.snapshot = None

    def _merged(self, entry: _Entry) -> StoredCheckpoint:
        checkpoint = entry.checkpoint
        thread_id, checkpoint_ns = checkpoint.thread_id, checkpoint.checkpoint_ns
        return StoredCheckpoint(
            thread_id=thread_id,
            checkpoint_ns=checkpoint_ns,
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
