"""LangGraph's public conformance suite against the whole local pipeline.

Async saver and the sync API (through an adapter), in ``session`` and ``strong`` modes,
with a real worker ingesting into the local Kusto server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.report import ProgressCallbacks
from langgraph.checkpoint.kusto import AsyncKustoSaver, KustoSaver

ALL = {
    "put",
    "put_writes",
    "get_tuple",
    "list",
    "delete_thread",
    "delete_for_runs",
    "copy_thread",
    "prune",
}


class CountingQueries:
    """Wraps the saver's query edge to prove where reads come from."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.selects = 0

    async def run(self, query: Any) -> Any:
        if "let Target" in query.text:
            self.selects += 1
        return await self.inner.run(query)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _report(report: Any) -> str:
    return "\n".join(
        f"{name}: passed={result.passed} failures={[f[:300] for f in result.failures[:5]]}"
        for name, result in report.results.items()
    )


@pytest.mark.parametrize("consistency", ["session", "strong"])
async def test_async_saver_passes_full_conformance(stack: Any, consistency: str) -> None:
    counters: list[CountingQueries] = []

    @checkpointer_test(name=f"AsyncKustoSaver[{consistency}]")
    async def factory() -> AsyncIterator[AsyncKustoSaver]:
        async with AsyncKustoSaver.from_conn_string(
            stack.queue_url, stack.cluster, stack.database, consistency=consistency
        ) as saver:
            counter = CountingQueries(saver.queries)
            saver.queries = counter  # type: ignore[assignment]
            counters.append(counter)
            yield saver

    report = await validate(factory, capabilities=ALL, progress=ProgressCallbacks.quiet())
    assert report.passed_all(), _report(report)
    assert all(r.detected for r in report.results.values()), _report(report)
    if consistency == "strong":
        # No cache exists in strong mode: every read was a KQL query.
        assert sum(c.selects for c in counters) > 0


class SyncAdapter(BaseCheckpointSaver):
    """Exposes KustoSaver's sync API through the async names the suite calls.

    Each call runs in a worker thread, like a sync app does, so the saver's guard
    against running on the event loop's thread is not what is being exercised.
    """

    def __init__(self, inner: KustoSaver) -> None:
        super().__init__(serde=inner.serde)
        self.inner = inner

    async def aget_tuple(self, config: Any) -> Any:
        return await asyncio.to_thread(self.inner.get_tuple, config)

    async def alist(self, config: Any, **kwargs: Any) -> AsyncIterator[Any]:
        for item in await asyncio.to_thread(lambda: list(self.inner.list(config, **kwargs))):
            yield item

    async def aput(self, *args: Any) -> Any:
        return await asyncio.to_thread(self.inner.put, *args)

    async def aput_writes(self, *args: Any, **kwargs: Any) -> None:
        await asyncio.to_thread(self.inner.put_writes, *args, **kwargs)

    async def adelete_thread(self, thread_id: str) -> None:
        await asyncio.to_thread(self.inner.delete_thread, thread_id)

    async def adelete_for_runs(self, run_ids: Any) -> None:
        await asyncio.to_thread(self.inner.delete_for_runs, run_ids)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await asyncio.to_thread(self.inner.copy_thread, source_thread_id, target_thread_id)

    async def aprune(self, thread_ids: Any, *, strategy: str = "keep_latest") -> None:
        await asyncio.to_thread(self.inner.prune, thread_ids, strategy=strategy)

    def get_next_version(self, current: Any, channel: Any) -> Any:
        return self.inner.get_next_version(current, channel)


@pytest.mark.parametrize("consistency", ["session", "strong"])
async def test_sync_saver_passes_full_conformance(stack: Any, consistency: str) -> None:
    @checkpointer_test(name=f"KustoSaver[{consistency}]")
    async def factory() -> AsyncIterator[SyncAdapter]:
        contexts: Iterator[KustoSaver] = KustoSaver.from_conn_string(
            stack.queue_url, stack.cluster, stack.database, consistency=consistency
        )
        saver = await asyncio.to_thread(contexts.__enter__)
        try:
            yield SyncAdapter(saver)
        finally:
            await asyncio.to_thread(contexts.__exit__, None, None, None)

    report = await validate(factory, capabilities=ALL, progress=ProgressCallbacks.quiet())
    assert report.passed_all(), _report(report)
    assert all(r.detected for r in report.results.values()), _report(report)
