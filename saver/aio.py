"""The asyncio twin of ``KustoSaver``: same events, same cache, async I/O edges."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
)
from langgraph.checkpoint.kusto.outbox import OutboxSender, open_queue
from langgraph.checkpoint.kusto.shared.assembly import StoredCheckpoint, assemble
from langgraph.checkpoint.kusto.shared.envelope import Event
from langgraph.checkpoint.serde.base import SerializerProtocol

from .base import (
    CONFIRM_BATCH,
    CONFIRM_INTERVAL,
    POLL_MAX,
    POLL_START,
    BaseKustoSaver,
    Consistency,
    IngestionTimeoutError,
)
from .kusto import AsyncKustoQueries
from .queries import Query, visible_events
from .schema import SHOW_SCHEMA, provision_commands, schema_error, verify_schema
from .settings import resolve

T = TypeVar("T")


class AsyncKustoSaver(BaseKustoSaver):
    """Asynchronous checkpointer. Use ``from_conn_string`` to build one with its connections.

    Its sync methods work from other threads (they hop onto this saver's loop) and
    refuse to run on the loop's own thread, where they would deadlock.
    """

    def __init__(
        self,
        outbox: OutboxSender,
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
        self._last_confirm = 0.0

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
        **options: Any,
    ) -> AsyncIterator[AsyncKustoSaver]:
        """A saver with its queue and Kusto connections, closed on exit.

        Unset arguments come from ``LANGGRAPH_KUSTO_QUEUE`` / ``_CLUSTER`` / ``_DATABASE``,
        then the local defaults (``langgraph-kusto local up``).
        """
        settings = resolve(queue, cluster, database)
        outbox = open_queue(settings.queue)
        queries = AsyncKustoQueries(settings.cluster, settings.database, credential)
        try:
            yield cls(outbox, queries, consistency=consistency, serde=serde, **options)
        finally:
            await queries.close()
            outbox.close()

    async def setup(self, *, provision: bool = False) -> None:
        """Check the schema; with ``provision=True`` apply provision.kql first."""
        if provision:
            for command in provision_commands():
                await self.queries.command(command)
        try:
            rows = await self.queries.command(SHOW_SCHEMA)
        except Exception as exc:
            raise schema_error(str(exc).splitlines()[0][:200]) from exc
        verify_schema(rows)

    # -- writes -------------------------------------------------------------

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        event, next_config, stored = self._put_event(config, checkpoint, metadata, new_versions)
        await self._publish(event)
        self._remember_put(event, stored)
        await self._confirm_if_over_bound()
        return next_config

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        event = self._writes_event(config, writes, task_id, task_path)
        await self._publish(event)
        self._remember_writes(event)

    async def adelete_thread(self, thread_id: str) -> None:
        event = self._delete_thread_event(thread_id)
        await self._publish(event)
        self._remember_delete(event)

    # -- reads --------------------------------------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        cached = self._cached_tuple(config)
        if cached is not None:
            return cached
        found = self._merge(await self._select(self._tuple_query(config)), config, None, None, 1)
        return self._to_tuple(found[0]) if found else None

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        query = self._list_query(config, filter, before, limit)
        for stored in self._merge(await self._select(query), config, filter, before, limit):
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
                item
                async for item in self.alist(config, filter=filter, before=before, limit=limit)
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
        return assemble(await self.queries.run(query))

    async def _publish(self, event: Event) -> None:
        await asyncio.to_thread(self.outbox.send, self._messages(event))
        if self.consistency is Consistency.STRONG:
            await self._wait_visible(event.event_id)

    async def _wait_visible(self, event_id: str) -> None:
        deadline = time.monotonic() + self.strong_timeout
        delay = POLL_START
        while not await self.queries.run(visible_events([event_id])):
            if time.monotonic() > deadline:
                raise IngestionTimeoutError(
                    f"event {event_id} is queued but not queryable after {self.strong_timeout}s; "
                    "is the ingestor worker running?"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX)

    async def _confirm_if_over_bound(self) -> None:
        cache = self.cache
        if cache is None or not cache.over_bound() or not cache.has_unconfirmed():
            return
        now = time.monotonic()
        if now - self._last_confirm < CONFIRM_INTERVAL:
            return
        self._last_confirm = now
        rows = await self.queries.run(visible_events(cache.unconfirmed_event_ids(CONFIRM_BATCH)))
        cache.confirm({str(row["EventId"]) for row in rows})
