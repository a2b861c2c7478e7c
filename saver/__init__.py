"""LangGraph checkpointer on Azure Data Explorer (Kusto) through a durable outbox queue.

Writes become events on the outbox queue (never a wait on Kusto, unless ``strong``);
reads come from the read cache first, then from one KQL query.
"""

from __future__ import annotations

import builtins
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from azure.kusto.data.exceptions import KustoServiceError
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    DeltaChannelHistory,
)
from langgraph.checkpoint.kusto.outbox import OutboxSender, open_sender
from langgraph.checkpoint.kusto.shared.assembly import StoredCheckpoint, assemble
from langgraph.checkpoint.kusto.shared.assembly import channel_history as assemble_channel_history
from langgraph.checkpoint.kusto.shared.envelope import Event
from langgraph.checkpoint.serde.base import SerializerProtocol

from .aio import AsyncKustoSaver
from .base import (
    POLL_MAX,
    POLL_START,
    BaseKustoSaver,
    Consistency,
    EventDeadLetteredError,
    IngestionTimeoutError,
    IngestionWait,
    check_list_arguments,
    checkpoint_address,
    namespace_of,
    one_namespace,
    prune_targets,
    query_time_left,
    reachability_explained,
    refuse_event_loop_thread,
    schema_check_explained,
    schema_may_explain,
    schema_verdict_only,
    string_ids,
    thread_id_argument,
)
from .kusto import DEFAULT_QUERY_TIMEOUT, KustoQueries
from .queries import Query, channel_history, newest_seq
from .schema import SHOW_SCHEMA, apply_provision, verify_schema
from .settings import resolve_arguments

__all__ = [
    "AsyncKustoSaver",
    "Consistency",
    "EventDeadLetteredError",
    "IngestionTimeoutError",
    "KustoSaver",
]


def _no_async(method: str) -> NotImplementedError:
    return NotImplementedError(
        f"KustoSaver is synchronous and does not support async methods ({method}). Use "
        "AsyncKustoSaver for graph.ainvoke/astream (`async with "
        "AsyncKustoSaver.from_conn_string(...) as saver:`), or graph.invoke/stream with "
        "KustoSaver."
    )


class KustoSaver(BaseKustoSaver):
    """Synchronous checkpointer. Use ``from_conn_string`` to build one with its connections.

    Its async methods raise ``NotImplementedError`` pointing at ``AsyncKustoSaver`` (as
    SqliteSaver's point at AsyncSqliteSaver); LangGraph's own would say nothing."""

    def __init__(
        self,
        outbox: OutboxSender,
        queries: KustoQueries,
        *,
        consistency: Consistency | str = Consistency.SESSION,
        serde: SerializerProtocol | None = None,
        **options: Any,
    ) -> None:
        super().__init__(consistency=consistency, serde=serde, **options)
        self.outbox = outbox
        self.queries = queries
        self._confirming: threading.Thread | None = None
        self._confirming_lock = threading.Lock()
        self._closing = False

    @classmethod
    @contextmanager
    def from_conn_string(
        cls,
        queue: str | None = None,
        cluster: str | None = None,
        database: str | None = None,
        *,
        consistency: Consistency | str = Consistency.SESSION,
        credential: Any | None = None,
        serde: SerializerProtocol | None = None,
        query_timeout: float = DEFAULT_QUERY_TIMEOUT,
        **options: Any,
    ) -> Iterator[KustoSaver]:
        """A saver with its queue and Kusto connections, closed on exit.

        Unset arguments come from ``LANGGRAPH_KUSTO_QUEUE`` / ``_CLUSTER`` / ``_DATABASE``,
        then the local defaults (``langgraph-kusto local up``). Each Kusto query is given
        up after ``query_timeout`` seconds (``KustoNetworkError``).
        """
        settings = resolve_arguments(queue, cluster, database)
        # each connection is closed, last opened first, even when a later one or the
        # saver fails to open (a bad queue URL, a bad option)
        with ExitStack() as opened:
            queries = KustoQueries(  # first: a bad cluster URL then creates no queue file
                settings.cluster, settings.database, credential, query_timeout=query_timeout
            )
            opened.callback(queries.close)
            outbox = open_sender(settings.queue)
            opened.callback(outbox.close)
            saver = cls(outbox, queries, consistency=consistency, serde=serde, **options)
            try:
                yield saver
            finally:
                # A confirmation round still running only freed room: it ends on its own
                # (within query_timeout), without a warning about the closed connection.
                saver._closing = True

    def setup(self, *, provision: bool = False) -> None:
        """Check the schema; with ``provision=True`` apply provision.kql first."""
        refuse_event_loop_thread()
        with reachability_explained():
            if provision:
                apply_provision(self.queries)
            with schema_check_explained(self.queries.database):
                rows = self.queries.command(SHOW_SCHEMA)
        verify_schema(rows)

    # -- writes -------------------------------------------------------------

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        refuse_event_loop_thread()
        event, next_config = self._put_event(config, checkpoint, metadata, new_versions)
        self._publish(event)
        return next_config

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        refuse_event_loop_thread()
        event = self._writes_event(config, writes, task_id, task_path)
        if event.writes:  # an event without rows would never be confirmed by Kusto
            self._publish(event)

    def delete_thread(self, thread_id: str) -> None:
        refuse_event_loop_thread()
        if self.consistency is Consistency.STRONG:  # rows of replicas whose clocks run ahead
            checked = thread_id_argument(thread_id, "thread_id")
            self._observe_newest(self._run_read(newest_seq(checked)))
        self._publish(self._delete_thread_event(thread_id))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        refuse_event_loop_thread()
        if runs := string_ids(run_ids, "run_ids"):
            self._publish(self._delete_runs_event(runs))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        refuse_event_loop_thread()
        source_thread_id = thread_id_argument(source_thread_id, "source_thread_id")
        target_thread_id = thread_id_argument(target_thread_id, "target_thread_id")
        source = self._stored({"configurable": {"thread_id": source_thread_id}})
        self._publish(*self._copy_events(source, target_thread_id))

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        refuse_event_loop_thread()
        for thread_id in prune_targets(thread_ids, strategy):
            if strategy == "delete":
                self.delete_thread(thread_id)
                continue
            checkpoints = self._stored({"configurable": {"thread_id": thread_id}})
            if checkpoints:
                self._publish(self._prune_event(thread_id, checkpoints))

    def get_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        refuse_event_loop_thread()
        if not channels:
            return {}
        scope = namespace_of(config)  # the walk may reach any checkpoint of it
        cached_scope = self._cached_scope(scope)
        self._wait_ingested(self._read_wait(scope, single=True))
        rows = self._run_read(channel_history(**scope["configurable"], channels=channels))
        return self._history(assemble_channel_history(rows), cached_scope, config, channels)

    # -- reads --------------------------------------------------------------

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        refuse_event_loop_thread()
        address = checkpoint_address(config)
        cached = self._cached_tuple(address)
        if cached is not None:
            return cached
        config = one_namespace(config)
        cached_scope = self._cached_scope(config)
        self._wait_ingested(self._read_wait(config, single=True))
        found = self._merge(
            self._select(self._tuple_query(address)), cached_scope, config, None, None, 1
        )
        return self._to_tuple(found[0]) if found else None

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        refuse_event_loop_thread()
        for stored in self._stored(config, filter=filter, before=before, limit=limit):
            yield self._to_tuple(stored)

    # -- I/O edges ----------------------------------------------------------

    def _select(self, query: Query) -> builtins.list[StoredCheckpoint]:
        return assemble(self._run_read(query))

    def _run_read(self, query: Query, within: float | None = None) -> builtins.list[dict[str, Any]]:
        """Kusto's rows for a read, asked within ``within`` seconds if given. Kusto refusing
        it because the schema was never provisioned (or is out of date) is ``SchemaError``,
        which says how to provision: the schema is checked only then."""
        with reachability_explained():
            try:
                return self.queries.run(query, within)
            except KustoServiceError as refusal:
                if schema_may_explain(refusal):
                    with schema_verdict_only():
                        self.setup()
                raise

    def _stored(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> builtins.list[StoredCheckpoint]:
        check_list_arguments(config, filter, before)
        cached_scope = self._cached_scope(config)
        self._wait_ingested(self._read_wait(config, single=False))
        query = self._list_query(config, filter, before, limit)
        return self._merge(self._select(query), cached_scope, config, filter, before, limit)

    def _publish(self, *events: Event) -> None:
        """Send the events' messages in one call; in ``strong`` mode wait for Kusto."""
        if not events:
            return
        reserved = self._make_room(len(events))
        try:
            self.outbox.send([m for event in events for m in self._messages(event)])
        except BaseException:
            self._release(reserved)
            raise
        if self.consistency is Consistency.STRONG:
            self._wait_ingested(self._write_wait(events))
        for event in events:
            self._remember(event)
        if self._confirmation_due():
            self._confirm_in_background()

    def _confirm_in_background(self) -> None:
        """A confirmation round on a thread of its own, unless one is still running: it
        only frees the cache's room, and a write never waits on Kusto (unless ``strong``).
        Inline, every write waited ``query_timeout`` while Kusto hung."""
        with self._confirming_lock:
            if self._confirming is not None and self._confirming.is_alive():
                return
            self._confirming = threading.Thread(
                target=self._confirm_for_room, name="langgraph-kusto-confirm", daemon=True
            )
            self._confirming.start()

    def _confirm(
        self, events: Mapping[str, int], within: float | None = None
    ) -> tuple[set[str], dict[str, str]]:
        """Which of ``events`` (id -> seq) Kusto holds, and which of this saver's events
        the ingestor dead-lettered (id -> reason); asked within ``within`` seconds."""
        return self._settle(self._run_read(self._ingested_query(events), within))

    def _confirm_for_room(self, within: float | None = None) -> None:
        """One confirmation round to free the cache's room, given up after ``within``
        seconds; Kusto's errors are logged."""
        assert self.cache is not None
        if pending := self.cache.pending_events():
            try:
                self._confirm(pending, within)
            except Exception as error:
                if not self._closing:
                    self._confirmation_failed(error)

    def _make_room(self, events: int) -> int:
        """Reserve the cache's room for remembering ``events`` until Kusto confirms them.

        When this process is so far ahead of the ingestor that its unconfirmed events fill
        the byte bound, wait for Kusto to confirm some (backing off, at most
        ``strong_timeout``); the write waiting for room is not sent before. Returns the
        number of events reserved (none without a cache)."""
        cache = self.cache
        if cache is None:
            return 0
        if cache.reserve(events):
            return events
        deadline = time.monotonic() + self.strong_timeout
        delay = POLL_START
        while True:
            if self._room_poll_due():
                self._confirm_for_room(query_time_left(deadline))
            if cache.reserve(events):
                return events
            if time.monotonic() > deadline:
                raise self._refused_for_room(cache.pending_count())
            time.sleep(delay)
            delay = min(delay * 2, POLL_MAX)

    def _wait_ingested(self, wait: IngestionWait) -> None:
        """Poll Kusto until it holds what ``wait`` awaits, backing off."""
        delay = POLL_START
        while awaited := wait.outstanding():
            try:
                answer = self._confirm(awaited, wait.poll_timeout())
            except Exception as error:
                if not wait.retries(error):
                    raise
            else:
                wait.answered(*answer)
            if (pause := wait.next_pause(delay)) is None:
                return
            time.sleep(pause)
            delay = min(delay * 2, POLL_MAX)

    def wait_for_ingestion(self, timeout: float | None = None) -> None:
        """Wait until every event this saver published is queryable in Kusto.

        For handing a thread to another process, or before analysing it with KQL. Raises
        ``IngestionTimeoutError`` after ``timeout`` seconds (default ``strong_timeout``;
        Kusto not answering is asked again until then), or at once
        ``EventDeadLetteredError`` if the ingestor dead-lettered one of them.
        ``strong`` savers are always caught up; ``eventual`` savers track nothing.
        """
        refuse_event_loop_thread()
        if (wait := self._pending_wait(timeout)) is not None:
            self._wait_ingested(wait)

    # -- async API: not this saver's ------------------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        raise _no_async("aget_tuple")

    def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        raise _no_async("alist")

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        raise _no_async("aput")

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        raise _no_async("aput_writes")

    async def adelete_thread(self, thread_id: str) -> None:
        raise _no_async("adelete_thread")

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        raise _no_async("adelete_for_runs")

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        raise _no_async("acopy_thread")

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        raise _no_async("aprune")

    async def aget_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        raise _no_async("aget_delta_channel_history")
