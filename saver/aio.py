"""The asyncio twin of ``KustoSaver``: same events, same cache, async I/O edges."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, TypeVar

from azure.kusto.data.exceptions import KustoServiceError
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    DeltaChannelHistory,
)
from langgraph.checkpoint.kusto.outbox import AsyncOutboxSender, open_async_sender
from langgraph.checkpoint.kusto.shared.assembly import StoredCheckpoint, assemble
from langgraph.checkpoint.kusto.shared.assembly import channel_history as assemble_channel_history
from langgraph.checkpoint.kusto.shared.envelope import Event
from langgraph.checkpoint.serde.base import SerializerProtocol

from .base import (
    POLL_MAX,
    POLL_START,
    BaseKustoSaver,
    Consistency,
    IngestionWait,
    check_list_arguments,
    checkpoint_address,
    namespace_of,
    one_namespace,
    prune_targets,
    query_time_left,
    reachability_explained,
    schema_check_explained,
    schema_may_explain,
    schema_verdict_only,
    string_ids,
    thread_id_argument,
)
from .kusto import DEFAULT_QUERY_TIMEOUT, AsyncKustoQueries
from .queries import Query, channel_history, newest_seq
from .schema import SHOW_SCHEMA, provision_commands, verify_schema
from .settings import resolve_arguments

T = TypeVar("T")


class AsyncKustoSaver(BaseKustoSaver):
    """Asynchronous checkpointer. Use ``from_conn_string`` to build one with its connections.

    Its sync methods work from other threads (they hop onto this saver's loop) and
    refuse to run on the loop's own thread, where they would deadlock.
    """

    def __init__(
        self,
        outbox: AsyncOutboxSender,
        queries: AsyncKustoQueries,
        *,
        consistency: Consistency | str = Consistency.SESSION,
        serde: SerializerProtocol | None = None,
        **options: Any,
    ) -> None:
        super().__init__(consistency=consistency, serde=serde, **options)
        self.outbox = outbox
        self.queries = queries
        self.loop = asyncio.get_running_loop()
        self._confirming: asyncio.Future[None] | None = None

    @classmethod
    @asynccontextmanager
    async def from_conn_string(
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
    ) -> AsyncIterator[AsyncKustoSaver]:
        """A saver with its queue and Kusto connections, closed on exit.

        Unset arguments come from ``LANGGRAPH_KUSTO_QUEUE`` / ``_CLUSTER`` / ``_DATABASE``,
        then the local defaults (``langgraph-kusto local up``). Each Kusto query is given
        up after ``query_timeout`` seconds (``KustoNetworkError``).
        """
        settings = resolve_arguments(queue, cluster, database)
        # each connection is closed, last opened first, even when a later one or the
        # saver fails to open (a bad queue URL, a bad option)
        async with AsyncExitStack() as opened:
            queries = AsyncKustoQueries(  # first: a bad cluster URL then creates no queue file
                settings.cluster, settings.database, credential, query_timeout=query_timeout
            )
            opened.push_async_callback(queries.close)
            outbox = open_async_sender(settings.queue)
            opened.push_async_callback(outbox.close)
            saver = cls(outbox, queries, consistency=consistency, serde=serde, **options)
            try:
                yield saver
            finally:
                if saver._confirming is not None:
                    saver._confirming.cancel()  # only frees room, and the connection closes

    async def setup(self, *, provision: bool = False) -> None:
        """Check the schema; with ``provision=True`` apply provision.kql first."""
        with reachability_explained():
            if provision:
                for command in provision_commands():
                    await self.queries.command(command)
            with schema_check_explained(self.queries.database):
                rows = await self.queries.command(SHOW_SCHEMA)
        verify_schema(rows)

    # -- writes -------------------------------------------------------------

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        event, next_config = self._put_event(config, checkpoint, metadata, new_versions)
        await self._publish(event)
        return next_config

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        event = self._writes_event(config, writes, task_id, task_path)
        if event.writes:  # an event without rows would never be confirmed by Kusto
            await self._publish(event)

    async def adelete_thread(self, thread_id: str) -> None:
        if self.consistency is Consistency.STRONG:  # rows of replicas whose clocks run ahead
            checked = thread_id_argument(thread_id, "thread_id")
            self._observe_newest(await self._run_read(newest_seq(checked)))
        await self._publish(self._delete_thread_event(thread_id))

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        if runs := string_ids(run_ids, "run_ids"):
            await self._publish(self._delete_runs_event(runs))

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        source_thread_id = thread_id_argument(source_thread_id, "source_thread_id")
        target_thread_id = thread_id_argument(target_thread_id, "target_thread_id")
        source = await self._stored({"configurable": {"thread_id": source_thread_id}})
        await self._publish(*self._copy_events(source, target_thread_id))

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        for thread_id in prune_targets(thread_ids, strategy):
            if strategy == "delete":
                await self.adelete_thread(thread_id)
                continue
            checkpoints = await self._stored({"configurable": {"thread_id": thread_id}})
            if checkpoints:
                await self._publish(self._prune_event(thread_id, checkpoints))

    async def aget_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        if not channels:
            return {}
        scope = namespace_of(config)  # the walk may reach any checkpoint of it
        cached_scope = self._cached_scope(scope)
        await self._wait_ingested(self._read_wait(scope, single=True))
        rows = await self._run_read(channel_history(**scope["configurable"], channels=channels))
        return self._history(assemble_channel_history(rows), cached_scope, config, channels)

    # -- reads --------------------------------------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        address = checkpoint_address(config)
        cached = self._cached_tuple(address)
        if cached is not None:
            return cached
        config = one_namespace(config)
        cached_scope = self._cached_scope(config)
        await self._wait_ingested(self._read_wait(config, single=True))
        found = self._merge(
            await self._select(self._tuple_query(address)), cached_scope, config, None, None, 1
        )
        return self._to_tuple(found[0]) if found else None

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        for stored in await self._stored(config, filter=filter, before=before, limit=limit):
            yield self._to_tuple(stored)

    # -- sync API, bridged onto the saver's loop ------------------------------

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return self._bridge(self.aget_tuple(config))

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        async def collect() -> list[CheckpointTuple]:
            return [
                item async for item in self.alist(config, filter=filter, before=before, limit=limit)
            ]

        yield from self._bridge(collect())

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return self._bridge(self.aput(config, checkpoint, metadata, new_versions))

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        self._bridge(self.aput_writes(config, writes, task_id, task_path))

    def delete_thread(self, thread_id: str) -> None:
        self._bridge(self.adelete_thread(thread_id))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self._bridge(self.adelete_for_runs(run_ids))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._bridge(self.acopy_thread(source_thread_id, target_thread_id))

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self._bridge(self.aprune(thread_ids, strategy=strategy))

    def get_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        return self._bridge(self.aget_delta_channel_history(config=config, channels=channels))

    def _bridge(self, coroutine: Any) -> Any:
        try:
            if asyncio.get_running_loop() is self.loop:
                coroutine.close()
                raise RuntimeError(
                    "AsyncKustoSaver's synchronous methods cannot run on its own event loop's "
                    "thread (they would deadlock); use the a* methods, e.g. "
                    "`await saver.aget_tuple(...)`, or graph.ainvoke instead of graph.invoke."
                )
        except RuntimeError as exc:
            if "no running event loop" not in str(exc):
                raise
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    # -- I/O edges ----------------------------------------------------------

    async def _select(self, query: Query) -> builtins.list[StoredCheckpoint]:
        return assemble(await self._run_read(query))

    async def _run_read(self, query: Query) -> builtins.list[dict[str, Any]]:
        """Kusto's rows for a read. Kusto refusing it because the schema was never
        provisioned (or is out of date) is ``SchemaError``, which says how to provision:
        the schema is checked only then."""
        with reachability_explained():
            try:
                return await self.queries.run(query)
            except KustoServiceError as refusal:
                if schema_may_explain(refusal):
                    with schema_verdict_only():
                        await self.setup()
                raise

    async def _stored(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> builtins.list[StoredCheckpoint]:
        check_list_arguments(config, filter, before)
        cached_scope = self._cached_scope(config)
        await self._wait_ingested(self._read_wait(config, single=False))
        query = self._list_query(config, filter, before, limit)
        return self._merge(await self._select(query), cached_scope, config, filter, before, limit)

    async def _publish(self, *events: Event) -> None:
        """Send the events' messages in one call; in ``strong`` mode wait for Kusto."""
        if not events:
            return
        messages = [m for event in events for m in self._messages(event)]
        reserved = await self._make_room(len(events))
        try:
            # The senders hand back a future, not a task: a task per write cost ~60 µs.
            send = asyncio.ensure_future(self.outbox.send(messages))
            await asyncio.shield(send)
        except asyncio.CancelledError:
            # The caller gave up, but a queue cannot take a send back: what it commits is
            # remembered when it ends, or this process would read older state than it wrote.
            send.add_done_callback(lambda sent: self._settle_send(sent, events, reserved))
            raise
        except BaseException:
            self._release(reserved)
            raise
        if self.consistency is Consistency.STRONG:
            await self._wait_ingested(self._write_wait(events))
        for event in events:
            self._remember(event)
        if self._confirmation_due() and self._confirming is None:
            # In the background: a write never waits on Kusto (unless ``strong``).
            self._confirming = asyncio.ensure_future(self._confirm_for_room())
            self._confirming.add_done_callback(self._confirmed)

    def _settle_send(
        self, sent: asyncio.Future[None], events: Sequence[Event], reserved: int
    ) -> None:
        """After a send whose caller was cancelled: remember what it committed."""
        if sent.cancelled() or sent.exception() is not None:
            self._release(reserved)
        elif self.cache is not None:
            for event in events:
                self._remember(event)

    async def _confirm(self, events: Mapping[str, int]) -> tuple[set[str], dict[str, str]]:
        """Which of ``events`` (id -> seq) Kusto holds, and which of this saver's events
        the ingestor dead-lettered (id -> reason)."""
        return self._settle(await self._run_read(self._ingested_query(events)))

    async def _confirm_for_room(self, within: float | None = None) -> None:
        """One confirmation round to free the cache's room, given up after ``within``
        seconds; Kusto's errors are logged."""
        assert self.cache is not None
        if pending := self.cache.pending_events():
            try:
                async with asyncio.timeout(within):
                    await self._confirm(pending)
            except Exception as error:
                self._confirmation_failed(error)

    def _confirmed(self, _: asyncio.Future[None]) -> None:
        self._confirming = None

    async def _make_room(self, events: int) -> int:
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
                await self._confirm_for_room(query_time_left(deadline))
            if cache.reserve(events):
                return events
            if time.monotonic() > deadline:
                raise self._refused_for_room(cache.pending_count())
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX)

    async def _wait_ingested(self, wait: IngestionWait) -> None:
        """Poll Kusto until it holds what ``wait`` awaits, backing off."""
        delay = POLL_START
        while awaited := wait.outstanding():
            try:
                # An await can be given up at any moment: no need to hand the bound to the
                # request, as the sync saver must.
                async with asyncio.timeout(wait.poll_timeout()):
                    answer = await self._confirm(awaited)
            except Exception as error:
                if not wait.retries(error):
                    raise
            else:
                wait.answered(*answer)
            if (pause := wait.next_pause(delay)) is None:
                return
            await asyncio.sleep(pause)
            delay = min(delay * 2, POLL_MAX)

    async def wait_for_ingestion(self, timeout: float | None = None) -> None:
        """Wait until every event this saver published is queryable in Kusto.

        For handing a thread to another process, or before analysing it with KQL. Raises
        ``IngestionTimeoutError`` after ``timeout`` seconds (default ``strong_timeout``;
        Kusto not answering is asked again until then), or at once
        ``EventDeadLetteredError`` if the ingestor dead-lettered one of them.
        ``strong`` savers are always caught up; ``eventual`` savers track nothing.
        """
        if (wait := self._pending_wait(timeout)) is not None:
            await self._wait_ingested(wait)
