"""A 50 MB channel value through the whole pipeline, byte-exact, never truncated.

``AsyncKustoSaver`` publishes it to a private SQLite queue; the worker, in managed mode
(its default), cannot stream an event this large (4 MB a request) and falls back to queued
ingestion through azurite; a fresh ``eventual`` saver (no cache) reads it back from Kusto.
The local server cuts strings over Kusto's per-value limit exactly as Kusto does, so the
value only survives because the rows carry it in chunks: the control test turns chunking
off and watches the value break.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.kusto import AsyncKustoSaver
from langgraph.checkpoint.kusto.ingestor_worker.ingest import IngestionMode, KustoIngestor
from langgraph.checkpoint.kusto.ingestor_worker.worker import Worker
from langgraph.checkpoint.kusto.kusto import KustoQueries
from langgraph.checkpoint.kusto.local.kusto_server import Azurite, start_azurite
from langgraph.checkpoint.kusto.outbox import open_queue
from langgraph.checkpoint.kusto.queries import Query
from langgraph.checkpoint.kusto.shared import rows as row_model

VALUE_BYTES = 50 * 1024 * 1024
KUSTO_STRING_LIMIT = 1024 * 1024
"""Kusto truncates a string longer than this (BigObject raises it to 2 MB)."""

STORED = """\
declare query_parameters(thread_id:string);
CheckpointEvents
| where ThreadId == thread_id and RowKind == "blob"
| summarize Rows = count(), Largest = max(strlen(Payload))"""


@pytest.fixture(scope="module")
def queued_ingestion(kusto_server: Any) -> Iterator[Azurite]:
    """Queued ingestion on the session's local Kusto server, through azurite."""
    try:
        emulator = start_azurite()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    kusto_server.enable_queued_ingestion(emulator.connection_string)
    yield emulator
    kusto_server.disable_queued_ingestion()
    emulator.close()


def drain(queue_url: str, stack: Any) -> None:
    """Run a worker in its default mode, managed streaming, until the queue is empty and
    what it queued is ingested."""
    queue = open_queue(queue_url)
    ingestor = KustoIngestor(stack.cluster, stack.database, mode=IngestionMode.MANAGED)
    try:
        worker = Worker(queue, ingestor, max_wait=0.05)
        deadline = time.monotonic() + 120
        while queue.depth() and time.monotonic() < deadline:
            worker.run_once()
        assert queue.depth() == 0, "the worker did not drain the queue"
        assert queue.list_dead_letters() == [], queue.list_dead_letters()
    finally:
        ingestor.close()
        queue.close()
    stack.server.wait_for_queued_ingestion(timeout=120)


async def round_trip(stack: Any, queue_url: str, thread_id: str, value: bytes) -> Any:
    """Put ``value`` as a channel value, drain, and read it back with a fresh saver."""
    config = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = {"big": value}
    checkpoint["channel_versions"] = {"big": "1"}
    async with AsyncKustoSaver.from_conn_string(queue_url, stack.cluster, stack.database) as writer:
        await writer.aput(config, checkpoint, {"source": "loop", "step": 0}, {"big": "1"})
    # The worker is synchronous (it blocks on I/O): off the event loop.
    await asyncio.to_thread(drain, queue_url, stack)
    async with AsyncKustoSaver.from_conn_string(
        queue_url, stack.cluster, stack.database, consistency="eventual"
    ) as reader:
        return await reader.aget_tuple(config)


def stored_rows(stack: Any, thread_id: str) -> dict[str, int]:
    queries = KustoQueries(stack.cluster, stack.database)
    try:
        [row] = queries.run(Query(STORED, {"thread_id": thread_id}))
    finally:
        queries.close()
    return {"rows": int(row["Rows"]), "largest": int(row["Largest"])}


def queued_extents(stack: Any) -> int:
    queries = KustoQueries(stack.cluster, stack.database)
    try:
        extents = queries.command(".show table CheckpointEvents extents")
    finally:
        queries.close()
    return sum("ingest-by:" in str(extent["Tags"]) for extent in extents)


async def test_a_50mb_value_round_trips_byte_exact(
    stack: Any, private_queue: str, queued_ingestion: Azurite
) -> None:
    value = os.urandom(VALUE_BYTES)
    queued_before = queued_extents(stack)
    thread_id = f"large-{uuid.uuid4().hex[:8]}"
    found = await round_trip(stack, private_queue, thread_id, value)

    assert found is not None, "the checkpoint never became readable"
    assert found.checkpoint["channel_values"]["big"] == value
    # It went the managed -> queued way: one more tagged (queued) extent.
    assert queued_extents(stack) == queued_before + 1
    # Stored in chunks, each under the limit Kusto silently truncates at.
    stored = stored_rows(stack, thread_id)
    assert stored["rows"] >= VALUE_BYTES // row_model.ROW_CHUNK_BYTES
    assert stored["largest"] < KUSTO_STRING_LIMIT


async def test_without_chunking_the_value_is_truncated(
    stack: Any,
    private_queue: str,
    queued_ingestion: Azurite,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The control: one row per value (chunking off) loses data to Kusto's limit, so the
    round trip above would fail if chunking broke. 5 MB is enough to show it."""
    monkeypatch.setattr(row_model, "ROW_CHUNK_BYTES", 64 * 1024 * 1024)
    value = os.urandom(5 * 1024 * 1024)
    thread_id = f"unchunked-{uuid.uuid4().hex[:8]}"
    found = await round_trip(stack, private_queue, thread_id, value)
    stored = stored_rows(stack, thread_id)
    assert stored == {"rows": 1, "largest": 2 * KUSTO_STRING_LIMIT}  # cut at BigObject's 2 MB
    assert found is not None
    assert len(found.checkpoint["channel_values"]["big"]) < len(value)
