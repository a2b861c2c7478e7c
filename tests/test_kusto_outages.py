"""Kusto unreachable, hung or slow to ingest: waits end when they say they do.

A read after this process's run delete or prune waits for it only until
``strong_timeout`` after the delete was made, then answers; a wait whose Kusto does not
answer polls again until its deadline and then raises ``IngestionTimeoutError``; every
query is bounded in time, also when Kusto accepts the connection and never answers.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from azure.kusto.data.exceptions import KustoNetworkError, KustoServiceError
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.kusto import AsyncKustoSaver, IngestionTimeoutError, KustoSaver
from langgraph.checkpoint.kusto.base import POLL_MAX
from langgraph.checkpoint.kusto.cache import PENDING_EVENT_BYTES
from langgraph.checkpoint.kusto.outbox import open_queue

REFUSING_KUSTO = "http://127.0.0.1:9"
"""Nothing listens on the discard port: every connection is refused at once."""
SLACK = 1.0 + POLL_MAX
"""What a wait may take beyond its deadline: one poll's bound (the SDK's shortest
timeout is one second) and the backoff's longest pause; far below the SDK's 4.5 minutes.
(With 1.0, reads after a run delete measured 2.04 s and 2.08 s in two loaded runs.)"""
pytestmark = pytest.mark.timeout(30)  # a wait that ignores its timeout fails, not hangs


@pytest.fixture
def hung_kusto() -> Iterator[str]:
    """A Kusto that accepts connections and never answers (overloaded, or a network black
    hole): the kernel completes each handshake and nobody ever reads the request."""
    with socket.create_server(("127.0.0.1", 0), backlog=128) as listener:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def _put(saver: KustoSaver, thread: str) -> str:
    checkpoint = empty_checkpoint()
    config = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
    return saver.put(config, checkpoint, {}, {})["configurable"]["checkpoint_id"]


async def _aput(saver: AsyncKustoSaver, thread: str) -> str:
    checkpoint = empty_checkpoint()
    config = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
    return (await saver.aput(config, checkpoint, {}, {}))["configurable"]["checkpoint_id"]


def _in_kusto(stack: Any, thread: str) -> str:
    """A checkpoint another process wrote and Kusto holds."""
    with KustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database, consistency="strong"
    ) as writer:
        return _put(writer, thread)


def _queue_depth(queue_url: str) -> int:
    queue = open_queue(queue_url)
    try:
        return queue.depth()
    finally:
        queue.close()


# -- A: reads after this process's run delete or prune --------------------------------


def test_a_read_after_a_run_delete_waits_only_until_strong_timeout_after_it(
    stack: Any, private_queue: str
) -> None:
    """Kusto never gets the delete (no worker). A read 1 s after it waited a fresh
    ``strong_timeout`` (2 s) from the read and raised IngestionTimeoutError; it answers
    once 2 s have passed since the delete, and later reads do not wait."""
    thread = f"other-{uuid.uuid4().hex[:8]}"
    checkpoint_id = _in_kusto(stack, thread)
    config = {"configurable": {"thread_id": thread}}
    with KustoSaver.from_conn_string(
        private_queue, stack.cluster, stack.database, strong_timeout=2
    ) as saver:
        saver.delete_for_runs(["a-run-of-another-thread"])
        time.sleep(1.0)
        started = time.monotonic()
        found = saver.get_tuple(config)
        waited = time.monotonic() - started
        assert found is not None and found.checkpoint["id"] == checkpoint_id
        assert 0.5 < waited < 1.0 + SLACK
        started = time.monotonic()
        assert saver.get_tuple(config) is not None
        assert time.monotonic() - started < 0.5


async def test_an_async_read_after_a_prune_waits_only_until_strong_timeout_after_it(
    stack: Any, private_queue: str
) -> None:
    thread = f"other-{uuid.uuid4().hex[:8]}"
    checkpoint_id = await asyncio.to_thread(_in_kusto, stack, thread)
    config = {"configurable": {"thread_id": thread}}
    async with AsyncKustoSaver.from_conn_string(
        private_queue, stack.cluster, stack.database, strong_timeout=2
    ) as saver:
        await saver.aprune([thread])
        await asyncio.sleep(1.0)
        started = time.monotonic()
        found = await saver.aget_tuple(config)
        waited = time.monotonic() - started
        assert found is not None and found.checkpoint["id"] == checkpoint_id
        assert 0.5 < waited < 1.0 + SLACK
        started = time.monotonic()
        assert [t.checkpoint["id"] async for t in saver.alist(config)] == [checkpoint_id]
        assert time.monotonic() - started < 0.5


def test_a_read_waiting_for_an_evicted_write_still_raises_after_strong_timeout(
    stack: Any, private_queue: str
) -> None:
    """Past a run delete's window a read answers, but not without this process's own
    write that the cache evicted and Kusto never got."""
    thread = f"evicted-{uuid.uuid4().hex[:8]}"
    with KustoSaver.from_conn_string(
        private_queue, stack.cluster, stack.database, strong_timeout=1, cache_max_entries=1
    ) as saver:
        _put(saver, thread)
        _put(saver, f"{thread}-next")  # evicts the first, unconfirmed
        saver.delete_for_runs(["a-run"])
        started = time.monotonic()
        with pytest.raises(IngestionTimeoutError, match="still queued"):
            saver.get_tuple({"configurable": {"thread_id": thread}})
    assert 1.0 <= time.monotonic() - started < 1.0 + SLACK


async def test_an_async_read_waiting_for_an_evicted_write_still_raises_after_strong_timeout(
    stack: Any, private_queue: str
) -> None:
    thread = f"evicted-{uuid.uuid4().hex[:8]}"
    async with AsyncKustoSaver.from_conn_string(
        private_queue, stack.cluster, stack.database, strong_timeout=1, cache_max_entries=1
    ) as saver:
        await _aput(saver, thread)
        await _aput(saver, f"{thread}-next")
        await saver.adelete_for_runs(["a-run"])
        started = time.monotonic()
        with pytest.raises(IngestionTimeoutError, match="still queued"):
            await saver.aget_tuple({"configurable": {"thread_id": thread}})
    assert 1.0 <= time.monotonic() - started < 1.0 + SLACK


# -- B: Kusto unreachable or hung ----------------------------------------------------


def test_a_strong_write_while_kusto_refuses_connections_times_out_saying_it_was_sent(
    private_queue: str,
) -> None:
    """It raised KustoNetworkError at once, though its event was on the queue."""
    with KustoSaver.from_conn_string(
        private_queue, REFUSING_KUSTO, consistency="strong", strong_timeout=1
    ) as saver:
        started = time.monotonic()
        with pytest.raises(IngestionTimeoutError, match="This write was sent") as raised:
            _put(saver, "refused")
    assert 1.0 <= time.monotonic() - started < 1.0 + SLACK
    assert isinstance(raised.value.__cause__, KustoNetworkError)
    assert _queue_depth(private_queue) == 1


async def test_an_async_strong_write_while_kusto_hangs_times_out_saying_it_was_sent(
    private_queue: str, hung_kusto: str
) -> None:
    """It waited 270 s (the SDK's query timeout), then raised KustoNetworkError."""
    async with AsyncKustoSaver.from_conn_string(
        private_queue, hung_kusto, consistency="strong", strong_timeout=1
    ) as saver:
        started = time.monotonic()
        with pytest.raises(IngestionTimeoutError, match="This write was sent") as raised:
            await _aput(saver, "hung")
    assert 1.0 <= time.monotonic() - started < 1.0 + SLACK
    assert isinstance(raised.value.__cause__, TimeoutError)
    assert _queue_depth(private_queue) == 1


def test_wait_for_ingestion_ends_at_its_timeout_when_kusto_hangs(
    private_queue: str, hung_kusto: str
) -> None:
    with KustoSaver.from_conn_string(private_queue, hung_kusto) as saver:
        _put(saver, "hung")
        started = time.monotonic()
        with pytest.raises(IngestionTimeoutError, match="did not answer") as raised:
            saver.wait_for_ingestion(timeout=1)
    assert 1.0 <= time.monotonic() - started < 1.0 + SLACK
    assert isinstance(raised.value.__cause__, KustoNetworkError)


async def test_async_wait_for_ingestion_ends_at_its_timeout_when_kusto_hangs(
    private_queue: str, hung_kusto: str
) -> None:
    async with AsyncKustoSaver.from_conn_string(private_queue, hung_kusto) as saver:
        await _aput(saver, "hung")
        started = time.monotonic()
        with pytest.raises(IngestionTimeoutError, match="did not answer"):
            await saver.wait_for_ingestion(timeout=1.5)
    assert 1.5 <= time.monotonic() - started < 1.5 + SLACK


@pytest.mark.parametrize("saver_class", [KustoSaver, AsyncKustoSaver])
async def test_a_read_that_misses_the_cache_is_bounded_by_query_timeout(
    private_queue: str, hung_kusto: str, saver_class: Any
) -> None:
    """A cache miss on a hung Kusto waited 270 s, and nothing could bound it."""
    config = {"configurable": {"thread_id": "not-cached"}}
    started = time.monotonic()
    with pytest.raises(KustoNetworkError):
        if saver_class is KustoSaver:
            with KustoSaver.from_conn_string(private_queue, hung_kusto, query_timeout=1) as sync:
                await asyncio.to_thread(sync.get_tuple, config)
        else:
            async with AsyncKustoSaver.from_conn_string(
                private_queue, hung_kusto, query_timeout=1
            ) as saver:
                await saver.aget_tuple(config)
    assert time.monotonic() - started < 1.0 + SLACK


def test_sync_writes_do_not_wait_for_a_hung_kusto_to_confirm_them(
    private_queue: str, hung_kusto: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asking Kusto which events it holds only frees the cache's room, so it runs on a
    thread of its own, as AsyncKustoSaver runs it in the background. It ran inline: once
    a round was due, every write waited ``query_timeout`` for a hung Kusto, one after
    another (6 writes: 4.6 s with query_timeout=1)."""
    monkeypatch.setattr("langgraph.checkpoint.kusto.base.PENDING_LIMIT", 2)
    monkeypatch.setattr("langgraph.checkpoint.kusto.base.CONFIRM_INTERVAL", 0.0)
    with KustoSaver.from_conn_string(private_queue, hung_kusto, query_timeout=1) as saver:
        started = time.monotonic()
        written = {f"hung-{i}": _put(saver, f"hung-{i}") for i in range(6)}
        assert time.monotonic() - started < 1.0  # not even one round's query_timeout
        for thread, checkpoint_id in written.items():
            found = saver.get_tuple({"configurable": {"thread_id": thread}})
            assert found is not None and found.checkpoint["id"] == checkpoint_id
    assert _queue_depth(private_queue) == 6


@pytest.mark.parametrize("saver_class", [KustoSaver, AsyncKustoSaver])
async def test_setup_on_a_hung_kusto_is_bounded_by_query_timeout(
    private_queue: str, hung_kusto: str, saver_class: Any
) -> None:
    """Management commands (the schema check, provisioning) had no bound of ours: the
    SDK's own is an hour."""
    started = time.monotonic()
    with pytest.raises(KustoNetworkError):
        if saver_class is KustoSaver:
            with KustoSaver.from_conn_string(private_queue, hung_kusto, query_timeout=1) as sync:
                await asyncio.to_thread(sync.setup)
        else:
            async with AsyncKustoSaver.from_conn_string(
                private_queue, hung_kusto, query_timeout=1
            ) as saver:
                await saver.setup()
    assert time.monotonic() - started < 1.0 + SLACK


@pytest.mark.parametrize("query_timeout", [0, 0.5, -1, float("nan"), 7200, "60", True])
def test_query_timeout_is_checked(private_queue: str, query_timeout: Any) -> None:
    with (
        pytest.raises(ValueError, match="query_timeout must be"),
        KustoSaver.from_conn_string(private_queue, REFUSING_KUSTO, query_timeout=query_timeout),
    ):
        pass


@pytest.mark.parametrize("saver_class", [KustoSaver, AsyncKustoSaver])
async def test_a_write_waiting_for_room_is_refused_at_strong_timeout_when_kusto_hangs(
    tmp_path: Any, hung_kusto: str, saver_class: Any
) -> None:
    """The confirmation round a write waiting for room makes (inline) waited 270 s."""
    options = {"cache_max_bytes": 3 * PENDING_EVENT_BYTES, "strong_timeout": 1}
    queue_url = f"sqlite:///{tmp_path / 'q.db'}"
    with pytest.raises(IngestionTimeoutError, match="this write was not sent"):
        if saver_class is KustoSaver:
            with KustoSaver.from_conn_string(queue_url, hung_kusto, **options) as sync:
                for i in range(3):
                    await asyncio.to_thread(_put, sync, f"room-{i}")
                started = time.monotonic()
                await asyncio.to_thread(_put, sync, "room-3")
        else:
            async with AsyncKustoSaver.from_conn_string(queue_url, hung_kusto, **options) as saver:
                for i in range(3):
                    await _aput(saver, f"room-{i}")
                started = time.monotonic()
                await _aput(saver, "room-3")
    assert time.monotonic() - started < 1.0 + SLACK
    assert _queue_depth(queue_url) == 3


def _failing_first(run: Any, failures: int, error: Exception) -> tuple[Any, list[Exception]]:
    """``run`` (a queries edge's), failing with ``error`` its first ``failures`` calls."""
    raised: list[Exception] = []

    def flaky(*args: Any) -> Any:
        if len(raised) < failures:
            raised.append(error)
            raise error
        return run(*args)

    return flaky, raised


def test_a_wait_polls_again_after_kusto_did_not_answer(
    stack: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The first connection error ended the wait (KustoNetworkError)."""
    with KustoSaver.from_conn_string(stack.queue_url, stack.cluster, stack.database) as saver:
        _put(saver, f"flaky-{uuid.uuid4().hex[:8]}")
        saver.queries.run, raised = _failing_first(  # type: ignore[method-assign]
            saver.queries.run, 2, KustoNetworkError("http://kusto/v2/rest/query")
        )
        saver.wait_for_ingestion(timeout=30)
    assert len(raised) == 2
    assert caplog.text.count("Kusto did not answer a poll for ingested events") == 1


async def test_an_async_wait_polls_again_after_kusto_did_not_answer(stack: Any) -> None:
    async with AsyncKustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database
    ) as saver:
        await _aput(saver, f"flaky-{uuid.uuid4().hex[:8]}")
        run = saver.queries.run
        raised: list[Exception] = []

        async def flaky(query: Any) -> Any:
            if len(raised) < 2:
                raised.append(KustoNetworkError("http://kusto/v2/rest/query"))
                raise raised[-1]
            return await run(query)

        saver.queries.run = flaky  # type: ignore[method-assign]
        await saver.wait_for_ingestion(timeout=30)
    assert len(raised) == 2


def test_a_query_kusto_refuses_ends_the_wait_at_once(stack: Any, private_queue: str) -> None:
    """Not an outage (a bad query, a missing table): polling again would not help."""
    with KustoSaver.from_conn_string(private_queue, stack.cluster, stack.database) as saver:
        _put(saver, "refused-query")
        saver.queries.run, _ = _failing_first(  # type: ignore[method-assign]
            saver.queries.run, 1, KustoServiceError("Semantic error: no such table")
        )
        started = time.monotonic()
        with pytest.raises(KustoServiceError, match="Semantic error"):
            saver.wait_for_ingestion(timeout=30)
    assert time.monotonic() - started < 0.5
