"""What the sync and async savers share: every line that is not I/O."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import pickle
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import StrEnum
from typing import Any
from urllib.parse import urlparse

import ormsgpack
from azure.kusto.data.exceptions import KustoNetworkError, KustoServiceError
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    DeltaChannelHistory,
    PendingWrite,
    get_checkpoint_id,
    get_serializable_checkpoint_metadata,
)
from langgraph.checkpoint.kusto.outbox import OutboxMessage
from langgraph.checkpoint.kusto.shared.assembly import (
    ChannelHistory,
    StoredCheckpoint,
    StoredWrite,
    add_writes,
)
from langgraph.checkpoint.kusto.shared.envelope import Blob, Event, EventKind, Write, encode_event
from langgraph.checkpoint.kusto.shared.framing import (
    DEFAULT_MAX_MESSAGE_BYTES,
    encode_frame,
    split_frames,
)
from langgraph.checkpoint.kusto.shared.ids import EventIds, SequenceClock
from langgraph.checkpoint.kusto.shared.rows import (
    MAX_DYNAMIC_BYTES,
    TABLE,
    StoredValue,
    dynamic_bytes,
    metadata_pairs,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from .cache import ReadCache, Snapshot
from .kusto import MIN_QUERY_TIMEOUT, is_local_cluster, is_transient
from .queries import Query, ingested_events, select_checkpoints
from .schema import SchemaError, schema_error
from .settings import DATABASE_ENV


class Consistency(StrEnum):
    """How fresh reads are, named as Azure Cosmos DB users know it.

    - ``session``: this process reads its own writes at once (read cache); other
      processes see them once the worker has ingested them.
    - ``strong``: a write returns only once it is queryable in Kusto; reads always go
      to Kusto. For handing a thread from one replica to another.
    - ``eventual``: no cache, no waiting; reads see what Kusto has ingested.
    """

    SESSION = "session"
    STRONG = "strong"
    EVENTUAL = "eventual"


DEFAULT_STRONG_TIMEOUT = 120.0
MIN_MESSAGE_BYTES = 1024
"""The smallest ``max_message_bytes``: room for a frame's own bytes (``FRAME_OVERHEAD_BYTES``
and the event id) and some data, so an event is not cut into thousands of messages."""
CONFIRM_INTERVAL = 1.0
PENDING_LIMIT = 10_000
"""Unconfirmed events the cache tracks before it asks Kusto which it has ingested."""
POLL_START, POLL_MAX = 0.02, 0.5
EMPTY_TYPE = "empty"
"""Type tag of a channel that has a version but no value (LangGraph's own convention)."""
PLAIN_SNAPSHOT, PICKLED_SNAPSHOT = "msgpack", "pickle"
"""How a cache snapshot is encoded (``_snapshot``)."""

logger = logging.getLogger("langgraph.checkpoint.kusto.saver")


class IngestionTimeoutError(TimeoutError):
    """Kusto did not ingest this process's events in time (a ``strong`` write, a read
    waiting for this process's own writes, or a write refused because the ingestor is so
    far behind that remembering the unconfirmed events fills the cache's byte bound). The
    message says whether the write was sent."""


class EventDeadLetteredError(IngestionTimeoutError):
    """The ingestor dead-lettered events this process published, so what they wrote is not
    in Kusto until an operator replays them (``langgraph-kusto dlq``). Raised at once, not
    after ``strong_timeout``, by a read or wait that needs them; ``reasons`` maps each
    event id to the dead-letter reason."""

    def __init__(self, message: str, reasons: Mapping[str, str]) -> None:
        super().__init__(message)
        self.reasons = dict(reasons)


class IngestionWait:
    """One wait for Kusto to hold events this process published, without the I/O: each
    saver's ``_wait_ingested`` polls Kusto and reports here.

    Kusto not answering (unreachable, hung, throttling, server errors) is asked again,
    backing off, until the deadline; each query is bounded by the time left. A query Kusto
    refuses (a bad query, a missing table) raises at once. Past the deadline the wait
    raises ``IngestionTimeoutError``, chained from Kusto's last error if the last poll
    failed; the events are still queued."""

    def __init__(
        self,
        timeout: float,
        awaited: Callable[[], Mapping[str, int]],
        *,
        write_sent: bool = False,
    ) -> None:
        """``awaited`` says what to wait for (event id -> seq); it is asked every round, so
        what it stops naming is no longer waited for. ``write_sent``: the wait is a
        ``strong`` write's, whose events are on the queue."""
        self.timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._awaited = awaited
        self._write_sent = write_sent
        self._ingested: set[str] = set()
        self._last_error: Exception | None = None

    def outstanding(self) -> dict[str, int]:
        """What Kusto must still hold (event id -> seq)."""
        return {e: seq for e, seq in self._awaited().items() if e not in self._ingested}

    def poll_timeout(self) -> float:
        """A poll's bound (``query_time_left``)."""
        return query_time_left(self._deadline)

    def answered(self, ingested: set[str], dead: Mapping[str, str]) -> None:
        """Kusto's answer to a poll; raises ``EventDeadLetteredError`` for an awaited event
        the ingestor dead-lettered."""
        self._last_error = None
        self._ingested |= ingested
        outstanding = self.outstanding()
        if lost := {e: reason for e, reason in dead.items() if e in outstanding}:
            raise _dead_lettered(lost)

    def retries(self, error: Exception) -> bool:
        """Whether to poll again after a poll failed with ``error`` (Kusto did not answer)."""
        if not is_transient(error):
            return False
        if self._last_error is None:  # once per outage, not once per poll
            logger.warning(
                "Kusto did not answer a poll for ingested events; polling again until the "
                "wait's deadline",
                extra={
                    "error": type(error).__name__,
                    "seconds_left": round(max(self._deadline - time.monotonic(), 0.0), 1),
                },
            )
        self._last_error = error
        return True

    def next_pause(self, delay: float) -> float | None:
        """After a poll: ``None`` once nothing is outstanding, else how long to sleep
        before the next one (``delay``, but not past the deadline, so the last poll is
        made at it). Past the deadline, raises ``IngestionTimeoutError``."""
        if not (outstanding := self.outstanding()):
            return None
        left = self._deadline - time.monotonic()
        if left > 0:
            return min(delay, left)
        if self._write_sent:
            what = (
                f"This write was sent (it is on the queue and will be ingested), but after "
                f"{self.timeout:g}s Kusto does not hold its {_events(len(outstanding))}: "
                "other processes may not read it until then."
            )
        else:
            what = (
                f"After {self.timeout:g}s Kusto does not hold {_events(len(outstanding))} this "
                "process published; they are still queued."
            )
        if self._last_error is None:
            why = "Is the ingestor worker running?"
        else:
            why = f"Kusto did not answer the last poll ({type(self._last_error).__name__})."
        raise IngestionTimeoutError(f"{what} {why}") from self._last_error


def query_time_left(deadline: float) -> float:
    """The bound of a query made before ``deadline`` (``time.monotonic()``): the time left,
    but at least what the SDK can time, so a wait on a hung Kusto ends less than
    ``MIN_QUERY_TIMEOUT`` after its deadline."""
    return max(deadline - time.monotonic(), MIN_QUERY_TIMEOUT)


def _events(count: int) -> str:
    return "1 event" if count == 1 else f"{count} events"


def _dead_lettered(reasons: Mapping[str, str]) -> EventDeadLetteredError:
    return EventDeadLetteredError(
        f"The ingestor dead-lettered {_events(len(reasons))} this process published "
        f"({', '.join(sorted(set(reasons.values())))}); what they wrote is not in Kusto "
        "until replayed (`langgraph-kusto dlq list`, then `dlq replay` once the cause is "
        "fixed).",
        reasons,
    )


class BaseKustoSaver(BaseCheckpointSaver[str]):
    """Event building, read assembly and the read cache; no I/O."""

    def __init__(
        self,
        *,
        consistency: Consistency | str = Consistency.SESSION,
        serde: SerializerProtocol | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        cache_max_entries: int | None = None,
        cache_max_bytes: int | None = None,
        strong_timeout: float = DEFAULT_STRONG_TIMEOUT,
    ) -> None:
        super().__init__(serde=serde)
        try:
            self.consistency = Consistency(consistency)
        except ValueError:
            raise ValueError(
                f"consistency must be one of {', '.join(c.value for c in Consistency)}, "
                f"got {consistency!r}"
            ) from None
        self.max_message_bytes = _checked_count(
            "max_message_bytes", max_message_bytes, MIN_MESSAGE_BYTES
        )
        self.strong_timeout = _checked_seconds("strong_timeout", strong_timeout)
        cache_bounds = {
            name: _checked_count(name, value, 1)
            for name, value in (
                ("cache_max_entries", cache_max_entries),
                ("cache_max_bytes", cache_max_bytes),
            )
            if value is not None
        }
        if cache_bounds and self.consistency is not Consistency.SESSION:
            # Silently ignored, a bound would look like it limits memory.
            raise ValueError(
                f"{' and '.join(cache_bounds)}: only consistency='session' has a read cache "
                f"to bound, got consistency={self.consistency.value!r}"
            )
        self.cache: ReadCache | None = None
        if self.consistency is Consistency.SESSION:
            self.cache = ReadCache(
                snapshot=self._snapshot,
                **{name.removeprefix("cache_"): value for name, value in cache_bounds.items()},
            )
        self._clock = SequenceClock()
        self._event_ids = EventIds()
        self._last_confirm = 0.0
        self._last_room_poll = 0.0

    # -- versions ---------------------------------------------------------

    def get_next_version(self, current: str | None, channel: None) -> str:
        """Zero-padded ``<counter>.<random>`` strings, like the official savers."""
        if current is None:
            current_v = 0
        elif isinstance(current, int):
            current_v = current
        else:
            current_v = int(current.split(".")[0])
        next_v = current_v + 1
        return f"{next_v:032}.{self._clock.next() % 10**16:016}"

    # -- events -----------------------------------------------------------

    def _put_event(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> tuple[Event, RunnableConfig]:
        thread_id, checkpoint_ns, parent_checkpoint_id = checkpoint_address(config)
        checkpoint_id = _require_str(checkpoint.get("id"), "checkpoint['id']")
        values = checkpoint.get("channel_values", {})
        stripped = {k: v for k, v in checkpoint.items() if k != "channel_values"}
        checkpoint_type, checkpoint_data = self.serde.dumps_typed(stripped)
        blobs = tuple(
            Blob(channel, str(version), *self._dump_value(values, channel))
            for channel, version in new_versions.items()
        )
        serializable_metadata = _json_safe(get_serializable_checkpoint_metadata(config, metadata))
        event = self._new_event(
            EventKind.PUT,
            thread_id=thread_id,
            checkpoint_ns=checkpoint_ns,
            checkpoint_id=checkpoint_id,
            parent_checkpoint_id=parent_checkpoint_id or "",
            checkpoint_type=checkpoint_type,
            checkpoint_data=checkpoint_data,
            channel_versions={k: str(v) for k, v in checkpoint["channel_versions"].items()},
            metadata=serializable_metadata,
            blobs=blobs,
        )
        next_config: RunnableConfig = {
            "configurable": {
                "thread_id": thread_id,
                "checkpoint_ns": checkpoint_ns,
                "checkpoint_id": checkpoint_id,
            }
        }
        return event, next_config

    def _dump_value(self, values: dict[str, Any], channel: str) -> tuple[str, bytes]:
        if channel in values:
            return self.serde.dumps_typed(values[channel])
        return (EMPTY_TYPE, b"")

    def _writes_event(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str,
    ) -> Event:
        thread_id, checkpoint_ns, _ = checkpoint_address(config)
        checkpoint_id = _require_str(
            config["configurable"].get("checkpoint_id"), "config['configurable']['checkpoint_id']"
        )
        if not isinstance(task_id, str) or not isinstance(task_path, str):
            # The worker would refuse the event as malformed, and no replay could fix it.
            raise ValueError(
                f"task_id and task_path must be strings, got {task_id!r} and {task_path!r}"
            )
        serialized = []
        for idx, write in enumerate(writes):
            if not (
                isinstance(write, tuple | list) and len(write) == 2 and isinstance(write[0], str)
            ):
                raise ValueError(f"writes must be (channel, value) pairs, got {write!r} at {idx}")
            channel, value = write
            value_type, data = self.serde.dumps_typed(value)
            serialized.append(
                Write(
                    task_id, task_path, WRITES_IDX_MAP.get(channel, idx), channel, value_type, data
                )
            )
        return self._new_event(
            EventKind.PUT_WRITES,
            thread_id=thread_id,
            checkpoint_ns=checkpoint_ns,
            checkpoint_id=checkpoint_id,
            writes=tuple(serialized),
        )

    def _new_event(self, kind: EventKind, *, seq: int | None = None, **fields: Any) -> Event:
        """An event with a fresh id, the next sequence number (unless given) and the
        publish time."""
        return Event(
            kind=kind,
            event_id=self._event_ids.next(),
            seq=self._clock.next() if seq is None else seq,
            published_at=time.time(),
            **fields,
        )

    def _observe_newest(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Kusto's answer to ``newest_seq``: what this process writes next sorts after it."""
        newest = rows[0].get("NewestSeq") if rows else None
        if newest is not None:
            self._clock.observe(int(newest))

    def _delete_thread_event(self, thread_id: str) -> Event:
        return self._new_event(
            EventKind.DELETE_THREAD,
            thread_id=thread_id_argument(thread_id, "thread_id"),
        )

    def _delete_runs_event(self, run_ids: Sequence[str]) -> Event:
        """Call with ``string_ids(...)``, never with no runs: an event without rows would
        never be confirmed by Kusto."""
        return self._new_event(
            EventKind.DELETE_RUNS,
            thread_id=RUNS_SESSION,
            run_ids=tuple(run_ids),
        )

    def _prune_event(self, thread_id: str, seen: Sequence[StoredCheckpoint]) -> Event:
        """``prune(keep_latest)`` of what this process sees of a thread.

        Its sequence is just above the newest checkpoint seen, so it hides only what it saw:
        a checkpoint another process published meanwhile and Kusto did not have yet
        survives, as a run appending to a thread during PostgresSaver's prune does."""
        seq = max(checkpoint.checkpoint.seq for checkpoint in seen) + 1
        self._clock.observe(seq)  # what this process writes next sorts after the prune
        return self._new_event(
            EventKind.PRUNE, seq=seq, thread_id=thread_id, kept=tuple(sorted(keep_latest(seen)))
        )

    def _copy_events(
        self, source: Sequence[StoredCheckpoint], target_thread_id: str
    ) -> list[Event]:
        """Put and put_writes events that recreate ``source`` under another thread id.

        Payloads are copied as stored bytes, never deserialized; each blob goes once, with
        the first checkpoint that references it (events of a thread ingest in order).
        """
        events: list[Event] = []
        sent: set[tuple[str, str, str]] = set()
        for stored in sorted(source, key=lambda c: (c.checkpoint_id, c.checkpoint_ns)):
            blobs = []
            for channel, value in stored.blobs.items():
                version = stored.channel_versions[channel]
                if (stored.checkpoint_ns, channel, version) not in sent:
                    sent.add((stored.checkpoint_ns, channel, version))
                    blobs.append(Blob(channel, version, value.type, value.data))
            events.append(
                self._new_event(
                    EventKind.PUT,
                    thread_id=target_thread_id,
                    checkpoint_ns=stored.checkpoint_ns,
                    checkpoint_id=stored.checkpoint_id,
                    parent_checkpoint_id=stored.parent_checkpoint_id,
                    checkpoint_type=stored.checkpoint.type,
                    checkpoint_data=stored.checkpoint.data,
                    channel_versions=dict(stored.channel_versions),
                    metadata=_fresh_json(stored.metadata),
                    blobs=tuple(blobs),
                )
            )
            if stored.writes:
                events.append(
                    self._new_event(
                        EventKind.PUT_WRITES,
                        thread_id=target_thread_id,
                        checkpoint_ns=stored.checkpoint_ns,
                        checkpoint_id=stored.checkpoint_id,
                        writes=tuple(
                            Write(
                                w.task_id, w.task_path, w.idx, w.channel, w.value.type, w.value.data
                            )
                            for w in stored.writes
                        ),
                    )
                )
        return events

    def _messages(self, event: Event) -> list[OutboxMessage]:
        try:
            envelope = encode_event(event)
        except TypeError as error:  # text with lone surrogates (UTF-8 has none), a non-str key
            raise ValueError(
                f"cannot publish this {event.kind.value} ({error}): thread ids, namespaces, "
                "checkpoint and task ids, and channel names must be strings UTF-8 can encode"
            ) from None
        frames = split_frames(event.event_id, envelope, self.max_message_bytes)
        return [
            OutboxMessage(
                body=encode_frame(frame),
                message_id=frame.message_id,
                session_id=event.thread_id,
                application_properties={"kind": event.kind.value, "part": frame.index},
            )
            for frame in frames
        ]

    # -- cache bookkeeping after a successful publish ---------------------

    def _remember_writes(self, event: Event) -> None:
        assert self.cache is not None
        writes = [
            StoredWrite(
                w.task_id,
                w.task_path,
                w.idx,
                w.channel,
                StoredValue(event.event_id, event.seq, w.type, w.data),
            )
            for w in event.writes
        ]
        key = (event.thread_id, event.checkpoint_ns, event.checkpoint_id)
        self.cache.put_writes(key, writes, event.event_id, event.seq)

    def _remember(self, event: Event) -> None:
        """Apply a published event to the read cache (read-your-writes)."""
        if self.cache is None:
            return
        if event.kind is EventKind.PUT:
            self.cache.put(_stored_of(event), event.event_id, event.seq)
        elif event.kind is EventKind.PUT_WRITES:
            self._remember_writes(event)
        elif event.kind is EventKind.DELETE_THREAD:
            self.cache.delete_thread(event.thread_id, event.event_id, event.seq)
        elif event.kind is EventKind.DELETE_RUNS:
            self.cache.delete_runs(event.run_ids, event.event_id, event.seq)
        elif event.kind is EventKind.PRUNE:
            self.cache.prune(event.thread_id, event.kept, event.event_id, event.seq)

    # -- confirmation: which published events Kusto holds --------------------

    def _confirmation_due(self) -> bool:
        cache = self.cache
        if cache is None or not (cache.over_bound() or cache.pending_count() > PENDING_LIMIT):
            return False
        now = time.monotonic()
        if now - self._last_confirm < CONFIRM_INTERVAL:
            return False
        self._last_confirm = now
        return True

    def _confirmation_failed(self, error: Exception) -> None:
        """A confirmation round only frees the cache's room, so Kusto being unreachable
        must not fail the write that ran it (its event is already on the queue): the
        next round asks again."""
        assert self.cache is not None
        logger.warning(
            "could not ask Kusto which events it has ingested; will ask again",
            extra={"error": type(error).__name__, "pending_events": self.cache.pending_count()},
        )

    def _release(self, reserved: int) -> None:
        """Give back the room ``_make_room`` reserved for events that were not sent."""
        if reserved:
            assert self.cache is not None
            self.cache.release(reserved)

    def _room_poll_due(self) -> bool:
        """Writes waiting for room share one confirmation round per ``POLL_MAX``: a round
        costs O(pending events) on the caller's thread (~45 ms at 244k), and many waiting
        coroutines polling each on their own would starve the event loop."""
        now = time.monotonic()
        if now - self._last_room_poll < POLL_MAX:
            return False
        self._last_room_poll = now
        return True

    def _ingested_query(self, events: Mapping[str, int]) -> Query:
        """Which of ``events`` (id -> seq) Kusto holds, and every dead-letter note of this
        saver's events: those already known dead-lettered are found by their notes."""
        known = self.cache.dead_lettered() if self.cache is not None else frozenset()
        seqs = [seq for event_id, seq in events.items() if event_id not in known]
        return ingested_events(self._event_ids.prefix, seqs)

    def _settle(self, rows: Iterable[Mapping[str, Any]]) -> tuple[set[str], dict[str, str]]:
        """The answer to ``_ingested_query``: (events Kusto holds, dead-lettered event id ->
        reason); the cache lets go of the former and notes the latter."""
        ingested: set[str] = set()
        dead: dict[str, str] = {}
        for row in rows:
            reason = str(row["DeadLetterReason"] or "")
            if reason:
                dead[str(row["EventId"])] = reason
            else:
                ingested.add(str(row["EventId"]))
        for event_id in ingested:
            dead.pop(event_id, None)  # replayed since
        if self.cache is not None:
            self.cache.confirm(ingested)
            self.cache.dead_letter(dead)
        return ingested, dead

    def _read_wait(self, config: RunnableConfig | None, *, single: bool) -> IngestionWait:
        """The wait before Kusto's answer about ``config`` can be trusted: for this
        process's unconfirmed writes of evicted cache entries (``IngestionTimeoutError``
        after ``strong_timeout``), and for its run deletes and prunes of that scope, each
        until ``strong_timeout`` after it was made (then the read answers without it)."""
        return IngestionWait(self.strong_timeout, lambda: self._awaited(config, single=single))

    def _write_wait(self, events: Sequence[Event]) -> IngestionWait:
        """A ``strong`` write's wait for its events, which are on the queue."""
        sent = {event.event_id: event.seq for event in events}
        return IngestionWait(self.strong_timeout, lambda: sent, write_sent=True)

    def _pending_wait(self, timeout: float | None) -> IngestionWait | None:
        """``wait_for_ingestion``'s wait: for every event published so far, or ``None`` for
        a ``strong`` saver, always caught up. ``timeout`` is checked in every mode, so a
        bad one is named rather than blamed on the worker or failing inside a query."""
        seconds = self.strong_timeout if timeout is None else _checked_seconds("timeout", timeout)
        if self.cache is None:
            if self.consistency is Consistency.STRONG:
                return None
            raise ValueError(
                "wait_for_ingestion needs consistency='session' (or 'strong'); "
                "an 'eventual' saver does not track what it published"
            )
        pending = self.cache.pending_events()
        return IngestionWait(seconds, lambda: pending)

    def _awaited(self, config: RunnableConfig | None, *, single: bool) -> dict[str, int]:
        """Events to wait for before Kusto's answer about ``config`` can be trusted. Asked
        again every poll: a run delete or prune drops out ``strong_timeout`` after it was
        made, so one that never reaches Kusto (dead-lettered) blocks reads no longer."""
        if self.cache is None:
            return {}
        configurable = (config or {}).get("configurable", {})
        checkpoint_ns = configurable.get("checkpoint_ns")
        return self.cache.awaited(
            configurable.get("thread_id"),
            (checkpoint_ns or "") if single else checkpoint_ns,
            configurable.get("checkpoint_id"),
            hides_since=time.monotonic() - self.strong_timeout,
        )

    def _refused_for_room(self, waiting_for: int) -> IngestionTimeoutError:
        assert self.cache is not None
        return IngestionTimeoutError(
            f"{waiting_for} events this process published are not in Kusto yet and "
            f"remembering them fills cache_max_bytes ({self.cache.max_bytes:,} bytes); "
            f"after waiting {self.strong_timeout}s for the ingestor this write was not "
            "sent. Is the ingestor worker running?"
        )

    # -- reads ------------------------------------------------------------

    def _cached_tuple(self, address: CheckpointAddress) -> CheckpointTuple | None:
        if self.cache is None:
            return None
        thread_id, checkpoint_ns, checkpoint_id = address
        if checkpoint_id:
            found = self.cache.get((thread_id, checkpoint_ns, checkpoint_id))
        else:
            found = self.cache.latest(thread_id, checkpoint_ns)
        if found is None:
            return None
        if isinstance(found, StoredCheckpoint):
            return self._to_tuple(found)
        kind, data = found
        if kind == PICKLED_SNAPSHOT:
            return CheckpointTuple._make(pickle.loads(data))
        fields = ormsgpack.unpackb(data)
        if fields[4]:  # pending writes decode as lists; LangGraph's are tuples
            fields[4] = [tuple(write) for write in fields[4]]
        return CheckpointTuple._make(fields)

    def _snapshot(self, stored: StoredCheckpoint) -> Snapshot | None:
        """The whole tuple as one value, so a cache hit is one decode (and hands out
        objects nobody else holds). ``None`` (the entry is then served value by value) if
        no snapshot carries its values back equal.

        Plain JSON-like values go by msgpack, the fastest decode (the benchmark's tuple:
        ~2.7 µs, against ~3.6 by the serde); anything else by pickle (a tuple holding four
        LangChain messages: ~25 µs, against ~90 by the serde), once one decode has given
        back equal values: an object can pickle and then not unpickle (an exception whose
        ``__init__`` takes other arguments than its ``args``). The bytes never leave this
        process: pickle only ever reads what this process wrote. The read that makes the
        snapshot is served from it too."""
        found = self._to_tuple(stored)
        writes = found.pending_writes
        fields = [*found[:4], None if writes is None else [list(write) for write in writes]]
        if _is_plain(fields):
            try:
                return PLAIN_SNAPSHOT, ormsgpack.packb(fields)
            except TypeError:  # an int beyond 64 bits, or deeper than msgpack nests
                pass
        try:
            pickled = pickle.dumps(list(found), protocol=pickle.HIGHEST_PROTOCOL)
            if pickle.loads(pickled) == list(found):
                return PICKLED_SNAPSHOT, pickled
        except Exception:  # a value pickle refuses either way
            pass
        return None

    @staticmethod
    def _tuple_query(address: CheckpointAddress) -> Query:
        thread_id, checkpoint_ns, checkpoint_id = address
        return select_checkpoints(
            thread_id=thread_id, checkpoint_ns=checkpoint_ns, checkpoint_id=checkpoint_id, limit=1
        )

    @staticmethod
    def _list_query(
        config: RunnableConfig | None,
        filter: dict[str, Any] | None,
        before: RunnableConfig | None,
        limit: int | None,
    ) -> Query:
        configurable = (config or {}).get("configurable", {})
        return select_checkpoints(
            thread_id=configurable.get("thread_id"),
            checkpoint_ns=configurable.get("checkpoint_ns"),
            checkpoint_id=configurable.get("checkpoint_id"),
            before_id=get_checkpoint_id(before) if before else None,
            metadata_filter=filter,
            limit=limit,
        )

    def _cached_scope(self, config: RunnableConfig | None) -> list[StoredCheckpoint]:
        """What the cache holds of a read's threads. Taken *before* the read waits or asks
        Kusto: an entry evicted meanwhile is then either here or awaited, never lost."""
        if self.cache is None:
            return []
        return self.cache.of_thread((config or {}).get("configurable", {}).get("thread_id"))

    def _merge(
        self,
        from_kusto: Iterable[StoredCheckpoint],
        cached: Iterable[StoredCheckpoint],
        config: RunnableConfig | None,
        filter: dict[str, Any] | None,
        before: RunnableConfig | None,
        limit: int | None,
    ) -> list[StoredCheckpoint]:
        """Kusto's answer plus what this process wrote but Kusto lacks (``cached``, from
        ``_cached_scope``), minus what it deleted."""
        merged: dict[tuple[str, str, str], StoredCheckpoint] = {}
        from_kusto = list(from_kusto)
        if from_kusto:
            # A Lamport clock across processes: what this process writes after reading
            # sorts after what it read, even when the writer's clock ran ahead of ours.
            self._clock.observe(max(stored.checkpoint.seq for stored in from_kusto))
        for stored in from_kusto:
            if self._visible(stored):
                merged[stored.key] = stored
                if self.cache is not None:
                    orphans = self.cache.orphan_writes(stored.key)
                    stored.writes = _merged_writes(stored.writes, orphans)
        if self.cache is not None:
            configurable = (config or {}).get("configurable", {})
            before_id = get_checkpoint_id(before) if before else None
            for stored in cached:
                if self._visible(stored) and _matches(stored, configurable, filter, before_id):
                    known = merged.get(stored.key)
                    if known is not None:
                        stored.writes = _merged_writes(known.writes, stored.writes)
                    merged[stored.key] = stored
        ordered = sorted(
            merged.values(),
            key=lambda c: (c.checkpoint_id, c.thread_id, c.checkpoint_ns),
            reverse=True,
        )
        return ordered if limit is None else ordered[: max(limit, 0)]

    def _visible(self, stored: StoredCheckpoint) -> bool:
        return self.cache is None or not self.cache.hides(stored)

    def _history(
        self,
        history: ChannelHistory,
        cached_scope: Iterable[StoredCheckpoint],
        config: RunnableConfig,
        channels: Sequence[str],
    ) -> dict[str, DeltaChannelHistory]:
        """Walk the parent chain in memory, as the base class defines the result.

        ``history`` is Kusto's answer; ``cached_scope`` (``_cached_scope``) and the writes
        this process made to checkpoints it did not write add what Kusto may lack."""
        configurable = config["configurable"]
        checkpoint_ns = configurable.get("checkpoint_ns") or ""
        if self.cache is not None:
            if deleted := self.cache.deleted_seq(configurable["thread_id"]):
                history.drop_before(deleted)  # what the delete hides, Kusto may still hold
            for stored in cached_scope:
                if stored.checkpoint_ns == checkpoint_ns and self._visible(stored):
                    history.add_checkpoint(stored, channels)
            for checkpoint_id in list(history.parents):
                key = (configurable["thread_id"], checkpoint_ns, checkpoint_id)
                history.add_writes(checkpoint_id, self.cache.orphan_writes(key), channels)
        target = get_checkpoint_id(config) or max(history.parents, default="")
        collected: dict[str, list[PendingWrite]] = {c: [] for c in channels}
        seeds: dict[str, Any] = {}
        remaining = set(channels)
        cursor = history.parents.get(target) or None
        visited: set[str] = set()
        while cursor and remaining and cursor in history.parents and cursor not in visited:
            visited.add(cursor)
            versions = history.versions.get(cursor, {})
            found_here: dict[str, Any] = {}
            for channel in remaining:
                blob = history.blobs.get((channel, versions.get(channel, "")))
                if blob is not None and blob.type != EMPTY_TYPE:
                    found_here[channel] = self.serde.loads_typed((blob.type, blob.data))
            for write in reversed(history.writes.get(cursor, [])):
                if write.channel in remaining:
                    value = self.serde.loads_typed((write.value.type, write.value.data))
                    collected[write.channel].append((write.task_id, write.channel, value))
            for channel, value in found_here.items():
                seeds[channel] = value
                remaining.discard(channel)
            cursor = history.parents.get(cursor) or None
        result: dict[str, DeltaChannelHistory] = {}
        for channel in channels:
            entry: DeltaChannelHistory = {"writes": list(reversed(collected[channel]))}
            if channel in seeds:
                entry["seed"] = seeds[channel]
            result[channel] = entry
        return result

    def _to_tuple(self, stored: StoredCheckpoint) -> CheckpointTuple:
        checkpoint: Checkpoint = self.serde.loads_typed(
            (stored.checkpoint.type, stored.checkpoint.data)
        )
        checkpoint["channel_values"] = {
            channel: self.serde.loads_typed((value.type, value.data))
            for channel, value in stored.blobs.items()
            if value.type != EMPTY_TYPE
        }
        config: RunnableConfig = {
            "configurable": {
                "thread_id": stored.thread_id,
                "checkpoint_ns": stored.checkpoint_ns,
                "checkpoint_id": stored.checkpoint_id,
            }
        }
        parent_config: RunnableConfig | None = None
        if stored.parent_checkpoint_id:
            parent_config = {
                "configurable": {
                    "thread_id": stored.thread_id,
                    "checkpoint_ns": stored.checkpoint_ns,
                    "checkpoint_id": stored.parent_checkpoint_id,
                }
            }
        return CheckpointTuple(
            config=config,
            checkpoint=checkpoint,
            metadata=_fresh_json(stored.metadata),  # type: ignore[arg-type]
            parent_config=parent_config,
            pending_writes=[
                (w.task_id, w.channel, self.serde.loads_typed((w.value.type, w.value.data)))
                for w in stored.writes
            ],
        )


RUNS_SESSION = "$delete_for_runs"
"""Queue session of ``delete_for_runs`` events, which belong to no single thread."""

PRUNE_STRATEGIES = ("keep_latest", "delete")
NOTHING_KEPT = ""
"""The checkpoint id ``keep_latest`` keeps in a namespace it empties (no id is empty)."""


def prune_targets(thread_ids: Iterable[str], strategy: str) -> list[str]:
    """The thread ids of a ``prune`` call, after checking its arguments."""
    if strategy not in PRUNE_STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(PRUNE_STRATEGIES)}, got {strategy!r}")
    return string_ids(thread_ids, "thread_ids")


def string_ids(values: Iterable[str], name: str) -> list[str]:
    """``values`` as a list (an iterator is read once), checked to be non-empty strings:
    an empty run id would match every checkpoint without a run (Kusto's ``RunId`` "")."""
    if isinstance(values, str):
        raise TypeError(f"{name} must be a sequence of strings, not a single string")
    ids = list(values)
    if not all(isinstance(value, str) for value in ids):
        raise TypeError(f"{name} must be a sequence of strings")
    if "" in ids:
        raise ValueError(f"{name} must not contain an empty string")
    return ids


def keep_latest(checkpoints: Sequence[StoredCheckpoint]) -> set[tuple[str, str]]:
    """What ``prune(strategy="keep_latest")`` keeps: per namespace the latest checkpoint,
    plus the ancestors a ``DeltaChannel`` still needs, as PostgresSaver keeps them.

    A subgraph call's namespace (``<node>:<task id>``, one per call) goes with the root
    checkpoint the call started from, once that one is saved and not kept; a
    ``checkpointer=True`` subgraph's namespace has no task id and keeps its latest. A
    namespace that keeps nothing is named with ``NOTHING_KEPT``, so the prune still covers
    it (Kusto prunes only the namespaces a prune names).

    A ``DeltaChannel`` (named in ``counters_since_delta_snapshot`` of the metadata) whose
    value at the latest checkpoint is stored empty is rebuilt by walking parents to its
    nearest snapshot, so every checkpoint on that walk is kept: pruning it would silently
    empty the channel. Other channels stored empty are just empty.
    """
    by_ns: dict[str, dict[str, StoredCheckpoint]] = {}
    for checkpoint in checkpoints:
        by_ns.setdefault(checkpoint.checkpoint_ns, {})[checkpoint.checkpoint_id] = checkpoint
    roots = by_ns.get("", {})
    kept: set[tuple[str, str]] = set()
    for ns, by_id in sorted(by_ns.items()):  # the root namespace "" first
        latest = by_id[max(by_id)]
        parents = latest.metadata.get("parents")
        root = parents.get("") if isinstance(parents, dict) else None
        if ":" in ns and root in roots and ("", root) not in kept:
            kept.add((ns, NOTHING_KEPT))
            continue
        kept.add((ns, latest.checkpoint_id))
        delta_channels = latest.metadata.get("counters_since_delta_snapshot") or {}
        unresolved = {c for c in delta_channels if _stored_empty(latest, c)}
        cursor = by_id.get(latest.parent_checkpoint_id)
        while unresolved and cursor is not None and (ns, cursor.checkpoint_id) not in kept:
            kept.add((ns, cursor.checkpoint_id))
            unresolved = {c for c in unresolved if _stored_empty(cursor, c)}
            cursor = by_id.get(cursor.parent_checkpoint_id)
    return kept


def _stored_empty(checkpoint: StoredCheckpoint, channel: str) -> bool:
    value = checkpoint.blobs.get(channel)
    return value is None or value.type == EMPTY_TYPE


def _fresh_json(value: dict[str, Any]) -> dict[str, Any]:
    """A private copy of JSON-safe data; a msgpack round trip is ~5x faster than deepcopy."""
    copied: dict[str, Any] = ormsgpack.unpackb(ormsgpack.packb(value))
    return copied


def _typed(value: StoredValue) -> tuple[str, bytes]:
    return (value.type, value.data)


def _stored_of(event: Event) -> StoredCheckpoint:
    """The cache's form of a put event: the same bytes the worker will ingest."""
    return StoredCheckpoint(
        thread_id=event.thread_id,
        checkpoint_ns=event.checkpoint_ns,
        checkpoint_id=event.checkpoint_id,
        parent_checkpoint_id=event.parent_checkpoint_id,
        checkpoint=StoredValue(
            event.event_id, event.seq, event.checkpoint_type, event.checkpoint_data
        ),
        metadata=event.metadata,
        channel_versions=dict(event.channel_versions),
        blobs={
            blob.channel: StoredValue(event.event_id, event.seq, blob.type, blob.data)
            for blob in event.blobs
        },
    )


def _checked_count(name: str, value: object, minimum: int) -> int:
    """An integer saver option, or ``ValueError`` naming it and its range."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    raise ValueError(f"{name} must be an integer of at least {minimum:,}, got {value!r}")


def _checked_seconds(name: str, value: object) -> float:
    """A saver option in seconds, or ``ValueError`` naming it and its range."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf:
        return value
    raise ValueError(f"{name} must be a finite number of seconds above 0, got {value!r}")


CheckpointAddress = tuple[str, str, str | None]
"""(thread id, namespace, checkpoint id or ``None`` for the latest) a config points at."""


_PLAIN_LEAVES = frozenset({str, int, float, bool, bytes, type(None)})


def _is_plain(value: Any) -> bool:
    """Whether msgpack carries ``value`` back exactly: a tree of lists and dicts with
    string keys, its leaves of exactly those types (a tuple comes back a list, a bytearray
    as bytes, a subclass as its base, and a list held twice as two lists)."""
    pending = [value]
    seen: set[int] = set()
    while pending:
        item = pending.pop()
        kind = type(item)
        if kind in _PLAIN_LEAVES:
            continue
        if id(item) in seen:  # shared, or even holding itself: pickle keeps that
            return False
        seen.add(id(item))
        if kind is list:
            pending.extend(item)
        elif kind is dict and all(type(key) is str for key in item):
            pending.extend(item.values())
        else:
            return False
    return True


def checkpoint_address(config: RunnableConfig) -> CheckpointAddress:
    """Where ``config`` points, checked: a config that names a thread (``get_tuple``,
    ``put``, ``put_writes``) passes here first, cached or not. A value of the wrong type
    raises ``ValueError`` naming it, rather than failing later (unhashable in the cache,
    refused by Kusto) or, written, dead-lettering the event. Type tests only: a cache hit
    (~2.5 µs) runs this."""
    try:  # free unless it raises, unlike testing the types of config and configurable
        configurable = config["configurable"]
        thread_id = configurable.get("thread_id")
        checkpoint_ns = configurable.get("checkpoint_ns", "")
        checkpoint_id = configurable.get("checkpoint_id")
    except (KeyError, TypeError, AttributeError):
        raise ValueError(
            "config must be a dict whose 'configurable' dict names the thread ('thread_id'), "
            f"got {config!r}"
        ) from None
    if (
        isinstance(thread_id, str)
        and thread_id
        and isinstance(checkpoint_ns, str)
        and (checkpoint_id is None or isinstance(checkpoint_id, str))
    ):  # the usual config, checked inline: calling the checks below costs a hit ~50 ns
        return thread_id, checkpoint_ns, checkpoint_id or None
    return (  # what is wrong, named (or a namespace of None, the root one)
        _require_str(thread_id, "config['configurable']['thread_id']"),
        _optional_str(checkpoint_ns, "config['configurable']['checkpoint_ns']") or "",
        _optional_str(checkpoint_id, "config['configurable']['checkpoint_id']") or None,
    )


def check_list_arguments(
    config: RunnableConfig | None, filter: dict[str, Any] | None, before: RunnableConfig | None
) -> None:
    """``list``'s arguments, checked before Kusto is asked (which refuses a non-string
    ``before`` id with a binder error); every config key is optional there."""
    configurable = (config or {}).get("configurable") or {}
    if configurable.get("thread_id") is not None:
        _require_str(configurable["thread_id"], "config['configurable']['thread_id']")
    _optional_str(configurable.get("checkpoint_ns"), "config['configurable']['checkpoint_ns']")
    _optional_str(configurable.get("checkpoint_id"), "config['configurable']['checkpoint_id']")
    if filter is not None and not isinstance(filter, dict):
        raise TypeError(
            f"filter must be a dict of metadata keys to values, got {type(filter).__name__}"
        )
    before_configurable = (before or {}).get("configurable") or {}
    _optional_str(
        before_configurable.get("checkpoint_id"), "before['configurable']['checkpoint_id']"
    )


def thread_id_argument(value: object, name: str) -> str:
    """A thread id passed as the argument ``name``: ``TypeError`` unless a string,
    ``ValueError`` if empty (the queue keys its sessions by it)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    return _require_str(value, name)


def _require_str(value: object, name: str) -> str:
    if isinstance(value, str) and value:
        return value
    raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def _optional_str(value: object, name: str) -> str | None:
    """``value`` if a string (``""`` included) or ``None`` (absent)."""
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"{name} must be a string, got {value!r}")


_ONLY_JSON_TYPES = (
    ormsgpack.OPT_PASSTHROUGH_BIG_INT
    | ormsgpack.OPT_PASSTHROUGH_DATACLASS
    | ormsgpack.OPT_PASSTHROUGH_DATETIME
    | ormsgpack.OPT_PASSTHROUGH_ENUM
    | ormsgpack.OPT_PASSTHROUGH_SUBCLASS
    | ormsgpack.OPT_PASSTHROUGH_TUPLE
    | ormsgpack.OPT_PASSTHROUGH_UUID
)
"""ormsgpack refuses what JSON has no type for (it would encode a datetime its own way)."""

_MSGPACK_BIN_HEADERS = (b"\xc4", b"\xc5", b"\xc6")


def _json_safe(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """A private copy of the metadata as JSON values (what lands in Kusto's dynamic
    column): what ``json.dumps(default=str)`` makes of it.

    Plain JSON metadata, LangGraph's own included, takes an ormsgpack round trip (~2 µs
    against ~11). It encodes bytes, which JSON turns into their ``str``, natively: a bin
    header byte in the encoding (also possible inside a number or a non-ASCII string)
    sends the metadata the slow way too."""
    try:
        packed = ormsgpack.packb(metadata, option=_ONLY_JSON_TYPES)
    except TypeError:
        packed = None
    if packed is not None and not any(header in packed for header in _MSGPACK_BIN_HEADERS):
        safe: dict[str, Any] = ormsgpack.unpackb(packed)
    else:
        safe = json.loads(json.dumps(metadata, default=str))
        try:
            packed = ormsgpack.packb(safe)
        except TypeError as error:  # an integer beyond 64 bits: JSON holds it, Kusto cannot
            raise ValueError(f"checkpoint metadata cannot be stored in Kusto: {error}") from None
    _check_metadata_size(safe, len(packed))
    return safe


def _check_metadata_size(metadata: dict[str, Any], packed_bytes: int) -> None:
    """``ValueError`` if Kusto would ingest the metadata's dynamic columns as null, which
    would lose it (``step`` and ``source`` too) for every other process. Their JSON is at
    most ~8 times the msgpack encoding (escapes, ``MetadataPairs``' quoting), so metadata
    well under the limit is not measured."""
    if packed_bytes * 8 + 16 * len(metadata) <= MAX_DYNAMIC_BYTES:
        return
    size = max(dynamic_bytes(metadata), dynamic_bytes(metadata_pairs(metadata)))
    if size > MAX_DYNAMIC_BYTES:
        raise ValueError(
            f"checkpoint metadata cannot be stored in Kusto: its JSON is {size:,} bytes, over "
            f"the {MAX_DYNAMIC_BYTES:,} Kusto keeps of a dynamic value; keep large values in "
            "the graph's state, not in metadata"
        )


def _matches(
    stored: StoredCheckpoint,
    configurable: dict[str, Any],
    filter: dict[str, Any] | None,
    before_id: str | None,
) -> bool:
    checkpoint_ns = configurable.get("checkpoint_ns")
    if checkpoint_ns is not None and stored.checkpoint_ns != checkpoint_ns:  # None: every one
        return False
    if configurable.get("checkpoint_id") and stored.checkpoint_id != configurable["checkpoint_id"]:
        return False
    if before_id and stored.checkpoint_id >= before_id:
        return False
    # The pairs Kusto matches on, so a filter means the same for cached and ingested rows.
    return not filter or set(metadata_pairs(filter)) <= set(metadata_pairs(stored.metadata))


def _merged_writes(
    first: Iterable[StoredWrite], second: Iterable[StoredWrite]
) -> list[StoredWrite]:
    """Pending writes from Kusto and the cache together, resolved as LangGraph does."""
    slots: dict[tuple[str, int], StoredWrite] = {}
    add_writes(slots, sorted([*first, *second], key=lambda w: w.value.seq))
    return sorted(slots.values(), key=lambda w: w.sort_key)


def namespace_of(config: RunnableConfig) -> RunnableConfig:
    """The whole namespace ``config`` points into (no checkpoint id)."""
    thread_id, checkpoint_ns, _ = checkpoint_address(config)
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": checkpoint_ns}}


def one_namespace(config: RunnableConfig) -> RunnableConfig:
    """``get_tuple``'s scope: one namespace, the root one unless the config names another."""
    configurable = config["configurable"]
    return {
        **config,
        "configurable": {**configurable, "checkpoint_ns": configurable.get("checkpoint_ns") or ""},
    }


@contextmanager
def reachability_explained() -> Iterator[None]:
    """A ``KustoNetworkError`` raised inside (Kusto did not answer) says what to do; for
    the local cluster, most often that ``langgraph-kusto local up`` is not running. Its
    type stays, so callers that catch it still do."""
    try:
        yield
    except KustoNetworkError as error:
        endpoint = urlparse(error.endpoint)
        cluster = f"{endpoint.scheme}://{endpoint.netloc}"
        if is_local_cluster(cluster):
            advice = (
                f"The local Kusto server is not running at {cluster} (or does not answer): "
                "start it with `langgraph-kusto local up`."
            )
        else:
            advice = (
                f"Kusto at {cluster} did not answer: check the cluster URL and that this "
                "machine can reach it (a query slower than query_timeout fails this way too)."
            )
        _add_advice(error, advice)
        raise


@contextmanager
def schema_check_explained(database: str) -> Iterator[None]:
    """Around ``setup``'s schema query: Kusto saying the table is missing becomes
    ``SchemaError`` (what provisioning fixes). Kusto not knowing ``database``, or not
    letting this identity use it, keeps Kusto's error and says to check the name:
    provisioning creates the table, not the database. Other errors pass unchanged."""
    try:
        yield
    except KustoNetworkError:
        raise
    except KustoServiceError as error:
        refusal = str(error)
        if f"'{TABLE}'" in refusal:
            raise schema_error("table not found") from error
        if f"'{database}'" in refusal:
            _add_advice(
                error,
                f"Check the database name {database!r} (database= or {DATABASE_ENV}) and that "
                "this identity may use it; `langgraph-kusto provision` creates the table, "
                "not the database.",
            )
        raise


def schema_may_explain(refusal: KustoServiceError) -> bool:
    """Whether Kusto's refusal of a read may come from a schema never provisioned (or out
    of date): not when Kusto did not answer or asked to be asked later."""
    return not is_transient(refusal)


@contextmanager
def schema_verdict_only() -> Iterator[None]:
    """Around the schema check after Kusto refused a read: a missing or outdated schema
    (``SchemaError``) replaces the refusal, since provisioning fixes it; the check failing
    for another reason says less than the refusal, which the caller raises instead."""
    try:
        yield
    except SchemaError:
        raise
    except Exception as failure:
        logger.debug(
            "could not check the schema after Kusto refused a read",
            extra={"error": type(failure).__name__},
        )


def _add_advice(error: KustoServiceError, advice: str) -> None:
    """Append ``advice`` to ``error``'s message in place: a new exception of the SDK's
    types cannot be given a message of its own."""
    error.message_text = f"{error.message_text}. {advice}"
    error.args = (error.message_text,)


def refuse_event_loop_thread() -> None:
    """A sync call on the loop's own thread would block the loop (and deadlock awaits)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        "KustoSaver's synchronous methods were called from a running event loop; "
        "use AsyncKustoSaver and its a* methods (e.g. `await saver.aget_tuple(...)`) "
        "or call graph.ainvoke/astream instead of invoke/stream."
    )
