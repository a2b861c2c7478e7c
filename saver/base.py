"""What the sync and async savers share: every line that is not I/O."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    get_checkpoint_id,
    get_serializable_checkpoint_metadata,
)
from langgraph.checkpoint.kusto.outbox import OutboxMessage
from langgraph.checkpoint.kusto.shared.assembly import StoredCheckpoint, StoredWrite
from langgraph.checkpoint.kusto.shared.envelope import Blob, Event, EventKind, Write, encode_event
from langgraph.checkpoint.kusto.shared.framing import (
    DEFAULT_MAX_MESSAGE_BYTES,
    encode_frame,
    split_frames,
)
from langgraph.checkpoint.kusto.shared.ids import SequenceClock, new_event_id
from langgraph.checkpoint.kusto.shared.rows import StoredValue
from langgraph.checkpoint.serde.base import SerializerProtocol

from .cache import ReadCache, add_writes
from .queries import Query, select_checkpoints


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
CONFIRM_BATCH = 500
CONFIRM_INTERVAL = 1.0
POLL_START, POLL_MAX = 0.02, 0.5
EMPTY_TYPE = "empty"
"""Type tag of a channel that has a version but no value (LangGraph's own convention)."""


class IngestionTimeoutError(TimeoutError):
    """A ``strong`` write was not queryable in Kusto in time; it is still queued."""


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
        self.max_message_bytes = max_message_bytes
        self.strong_timeout = strong_timeout
        self.cache: ReadCache | None = None
        if self.consistency is Consistency.SESSION:
            self.cache = ReadCache(
                **{
                    k: v
                    for k, v in (
                        ("max_entries", cache_max_entries),
                        ("max_bytes", cache_max_bytes),
                    )
                    if v is not None
                }
            )
        self._clock = SequenceClock()

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
    ) -> tuple[Event, RunnableConfig, StoredCheckpoint]:
        configurable = config["configurable"]
        thread_id = _require_str(configurable, "thread_id")
        checkpoint_ns = configurable.get("checkpoint_ns") or ""
        values = checkpoint.get("channel_values", {})
        stripped = {k: v for k, v in checkpoint.items() if k != "channel_values"}
        checkpoint_type, checkpoint_data = self.serde.dumps_typed(stripped)
        blobs = tuple(
            Blob(channel, str(version), *self._dump_value(values, channel))
            for channel, version in new_versions.items()
        )
        serializable_metadata = _json_safe(get_serializable_checkpoint_metadata(config, metadata))
        event = Event(
            kind=EventKind.PUT,
            event_id=new_event_id(),
            seq=self._clock.next(),
            published_at=time.time(),
            thread_id=thread_id,
            checkpoint_ns=checkpoint_ns,
            checkpoint_id=checkpoint["id"],
            parent_checkpoint_id=configurable.get("checkpoint_id") or "",
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
                "checkpoint_id": checkpoint["id"],
            }
        }
        stored = StoredCheckpoint(
            thread_id=thread_id,
            checkpoint_ns=checkpoint_ns,
            checkpoint_id=checkpoint["id"],
            parent_checkpoint_id=event.parent_checkpoint_id,
            checkpoint=StoredValue(event.event_id, event.seq, checkpoint_type, checkpoint_data),
            metadata=serializable_metadata,
            channel_versions=event.channel_versions,
            blobs={
                blob.channel: StoredValue(event.event_id, event.seq, blob.type, blob.data)
                for blob in blobs
            },
        )
        return event, next_config, stored

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
        configurable = config["configurable"]
        serialized = []
        for idx, (channel, value) in enumerate(writes):
            value_type, data = self.serde.dumps_typed(value)
            serialized.append(
                Write(
                    task_id, task_path, WRITES_IDX_MAP.get(channel, idx), channel, value_type, data
                )
            )
        return Event(
            kind=EventKind.PUT_WRITES,
            event_id=new_event_id(),
            seq=self._clock.next(),
            published_at=time.time(),
            thread_id=_require_str(configurable, "thread_id"),
            checkpoint_ns=configurable.get("checkpoint_ns") or "",
            checkpoint_id=_require_str(configurable, "checkpoint_id"),
            writes=tuple(serialized),
        )

    def _delete_thread_event(self, thread_id: str) -> Event:
        if not isinstance(thread_id, str):
            raise TypeError(f"thread_id must be a string, got {type(thread_id).__name__}")
        return Event(
            kind=EventKind.DELETE_THREAD,
            event_id=new_event_id(),
            seq=self._clock.next(),
            published_at=time.time(),
            thread_id=thread_id,
        )

    def _messages(self, event: Event) -> list[OutboxMessage]:
        frames = split_frames(event.event_id, encode_event(event), self.max_message_bytes)
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

    def _remember_put(self, event: Event, stored: StoredCheckpoint) -> None:
        if self.cache is not None:
            self.cache.put(stored, event.event_id)

    def _remember_writes(self, event: Event) -> None:
        if self.cache is None:
            return
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
        self.cache.put_writes(key, writes, event.event_id)

    def _remember_delete(self, event: Event) -> None:
        if self.cache is not None:
            self.cache.delete_thread(event.thread_id, event.seq)

    # -- reads ------------------------------------------------------------

    def _cached_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        if self.cache is None:
            return None
        configurable = config["configurable"]
        thread_id = configurable["thread_id"]
        checkpoint_ns = configurable.get("checkpoint_ns") or ""
        checkpoint_id = get_checkpoint_id(config)
        if checkpoint_id:
            stored = self.cache.get((thread_id, checkpoint_ns, checkpoint_id))
        else:
            stored = self.cache.latest(thread_id, checkpoint_ns)
        return None if stored is None else self._to_tuple(stored)

    @staticmethod
    def _tuple_query(config: RunnableConfig) -> Query:
        configurable = config["configurable"]
        return select_checkpoints(
            thread_id=_require_str(configurable, "thread_id"),
            checkpoint_ns=configurable.get("checkpoint_ns") or "",
            checkpoint_id=get_checkpoint_id(config),
            limit=1,
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

    def _merge(
        self,
        from_kusto: Iterable[StoredCheckpoint],
        config: RunnableConfig | None,
        filter: dict[str, Any] | None,
        before: RunnableConfig | None,
        limit: int | None,
    ) -> list[StoredCheckpoint]:
        """Kusto's answer, minus what this process deleted, plus what it wrote but Kusto lacks."""
        merged: dict[tuple[str, str, str], StoredCheckpoint] = {}
        for stored in from_kusto:
            if self._visible(stored):
                merged[stored.key] = stored
                if self.cache is not None:
                    orphans = self.cache.orphan_writes(stored.key)
                    stored.writes = _merged_writes(stored.writes, orphans)
        if self.cache is not None:
            configurable = (config or {}).get("configurable", {})
            before_id = get_checkpoint_id(before) if before else None
            for stored in self.cache.of_thread(configurable.get("thread_id")):
                if _matches(stored, configurable, filter, before_id):
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
        return self.cache is None or stored.checkpoint.seq > self.cache.deleted_seq(
            stored.thread_id
        )

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
            metadata=copy.deepcopy(stored.metadata),  # type: ignore[arg-type]
            parent_config=parent_config,
            pending_writes=[
                (w.task_id, w.channel, self.serde.loads_typed((w.value.type, w.value.data)))
                for w in stored.writes
            ],
        )


def _require_str(configurable: dict[str, Any], key: str) -> str:
    value = configurable.get(key)
    if not isinstance(value, str) or (key == "thread_id" and not value):
        raise ValueError(
            f"config['configurable'][{key!r}] must be a non-empty string, got {value!r}"
        )
    return value


def _json_safe(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata as JSON values (what lands in Kusto's dynamic column)."""
    return json.loads(json.dumps(metadata, default=str))


def _matches(
    stored: StoredCheckpoint,
    configurable: dict[str, Any],
    filter: dict[str, Any] | None,
    before_id: str | None,
) -> bool:
    if "checkpoint_ns" in configurable and stored.checkpoint_ns != configurable["checkpoint_ns"]:
        return False
    if configurable.get("checkpoint_id") and stored.checkpoint_id != configurable["checkpoint_id"]:
        return False
    if before_id and stored.checkpoint_id >= before_id:
        return False
    return not filter or all(stored.metadata.get(k) == v for k, v in filter.items())


def _merged_writes(
    first: Iterable[StoredWrite], second: Iterable[StoredWrite]
) -> list[StoredWrite]:
    """Pending writes from Kusto and the cache together, resolved as LangGraph does."""
    slots: dict[tuple[str, int], StoredWrite] = {}
    add_writes(slots, sorted([*first, *second], key=lambda w: w.value.seq))
    return sorted(slots.values(), key=lambda w: w.sort_key)


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
