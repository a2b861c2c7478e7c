"""The worker against a Kusto endpoint that fails on demand, and against poison input.

Every test runs the real worker on the local stack (the local Kusto server behind the fault
proxy, a SQLite queue) and checks the invariants: nothing lost (each event is queryable or
dead-lettered with a reason), only the offending events dead-lettered, no visible duplicate.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import msgpack
import pytest
from fault_proxy import (
    Fault,
    FaultProxy,
    Published,
    assert_readable_exactly_once,
    build_checkpoints,
    dead_letter_notes,
    rows_by_event,
    send_all,
    wait_until,
)
from langgraph.checkpoint.kusto.ingestor_worker import service
from langgraph.checkpoint.kusto.ingestor_worker.ingest import KustoIngestor, encode_rows
from langgraph.checkpoint.kusto.ingestor_worker.metrics import WorkerMetrics
from langgraph.checkpoint.kusto.ingestor_worker.retry import RetryPolicy
from langgraph.checkpoint.kusto.ingestor_worker.worker import BATCH_IDLE_GAP, COLLECT_PAUSE, Worker
from langgraph.checkpoint.kusto.outbox import (
    LockLostError,
    OutboxError,
    OutboxMessage,
    ReceivedMessage,
)
from langgraph.checkpoint.kusto.outbox.sqlite import SqliteQueue, parse_url
from langgraph.checkpoint.kusto.shared.envelope import encode_event
from langgraph.checkpoint.kusto.shared.framing import Frame, encode_frame, split_frames
from langgraph.checkpoint.kusto.shared.rows import event_rows
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

FAST_RETRY = RetryPolicy(
    max_attempts=10, budget=30, initial_backoff=0.05, max_backoff=0.2, attempt_timeout=0.5
)
DRAIN_TIMEOUT = 60.0
WORKER_LOGGER = "langgraph.checkpoint.kusto.worker"


@pytest.fixture
def proxy(kusto_server: Any) -> Iterator[FaultProxy]:
    with FaultProxy(kusto_server.url, timeout_hold=1.5) as started:
        yield started


@pytest.fixture
def metrics_reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


def _metrics(reader: InMemoryMetricReader) -> WorkerMetrics:
    return WorkerMetrics(MeterProvider(metric_readers=[reader]))


def _points(reader: InMemoryMetricReader) -> dict[tuple[str, tuple[tuple[str, Any], ...]], float]:
    """Counter sums and histogram counts by (metric name, attributes)."""
    points: dict[tuple[str, tuple[tuple[str, Any], ...]], float] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    key = (metric.name, tuple(sorted((point.attributes or {}).items())))
                    points[key] = point.value if isinstance(point, NumberDataPoint) else point.count
    return points


@contextmanager
def _running(worker: Worker) -> Iterator[threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the worker did not stop"


def _drain(queue: SqliteQueue, worker: Worker) -> None:
    with _running(worker) as thread:
        assert wait_until(lambda: queue.depth() == 0, DRAIN_TIMEOUT), "the queue was not drained"
        assert thread.is_alive(), "the worker died"


def _threads(tag: str, count: int) -> tuple[str, list[str]]:
    prefix = f"{tag}-{uuid.uuid4().hex[:8]}-"
    return prefix, [f"{prefix}{i}" for i in range(count)]


def _first_ingestion_order(proxy: FaultProxy) -> dict[str, list[int]]:
    """Per thread, the EventSeq of its checkpoints in the order Kusto first accepted them."""
    seen: set[str] = set()
    order: dict[str, list[int]] = {}
    for ingestion in proxy.ingested:
        for row in ingestion.rows:
            if row.row_kind == "checkpoint" and row.event_id not in seen:
                seen.add(row.event_id)
                order.setdefault(row.thread_id, []).append(row.event_seq)
    return order


def test_transient_failures_are_retried_until_everything_is_ingested(
    proxy: FaultProxy, private_queue: str, metrics_reader: InMemoryMetricReader
) -> None:
    prefix, threads = _threads("transient", 5)
    published = build_checkpoints(threads, 10)
    send_all(private_queue, published.messages)
    # One batch meets each fault in turn: its 6th attempt goes through.
    proxy.fail_next(Fault.THROTTLE, Fault.SERVER_ERROR, Fault.DROP, Fault.TIMEOUT, Fault.THROTTLE)
    queue = SqliteQueue.from_url(private_queue)
    ingestor = KustoIngestor(proxy.url, "langgraph")
    worker = Worker(queue, ingestor, retry=FAST_RETRY, metrics=_metrics(metrics_reader))
    try:
        _drain(queue, worker)
        # The timed-out attempt reached Kusto after the worker gave up on it: a copy.
        assert wait_until(lambda: max(proxy.ingested_events().values()) == 2, 10)
    finally:
        ingestor.close()

    assert proxy.pending_faults == 0
    assert queue.dead_letter_count() == 0
    stored = rows_by_event(proxy.url, "langgraph", prefix)
    assert set(stored) == published.event_ids, "an event was lost"
    assert_readable_exactly_once(private_queue, proxy.url, "langgraph", published)
    points = _points(metrics_reader)
    retries = {
        dict(attrs)["cause"]: value
        for (name, attrs), value in points.items()
        if name.endswith("ingestion.retries")
    }
    assert retries == {"throttled": 2, "server_error": 1, "network": 1, "timeout": 1}
    attempts = {
        dict(attrs)["outcome"]: value
        for (name, attrs), value in points.items()
        if name.endswith("ingestion.duration")
    }
    assert attempts == {"transient": 5, "success": 1}
    assert points[("langgraph_kusto.worker.events.ingested", ())] == 50
    assert points[("langgraph_kusto.worker.lag", ())] == 50
    queue.close()


def test_a_kusto_outage_longer_than_a_retry_round_dead_letters_nothing(
    proxy: FaultProxy, private_queue: str, metrics_reader: InMemoryMetricReader
) -> None:
    """Kusto down for six retry rounds, with three deliveries allowed and locks shorter than
    the outage: the worker keeps the batch, keeps its locks, and ingests it once Kusto is
    back. Before, each round gave the batch back and spent a delivery; after three the queue
    dead-lettered a thread's older events while its newer ones were ingested later."""
    prefix, threads = _threads("outage", 3)
    published = build_checkpoints(threads, 4)
    send_all(private_queue, published.messages)
    proxy.fail_next(*[Fault.SERVER_ERROR] * 12)
    queue = SqliteQueue.from_url(private_queue, max_delivery_count=3, lock_duration=0.4)
    ingestor = KustoIngestor(proxy.url, "langgraph")
    policy = RetryPolicy(max_attempts=2, budget=5, initial_backoff=0.1, max_backoff=0.1)
    worker = Worker(
        queue,
        ingestor,
        retry=policy,
        max_lock_renewal=0.3,
        metrics=_metrics(metrics_reader),
    )
    try:
        _drain(queue, worker)
    finally:
        ingestor.close()

    assert proxy.faults_served[Fault.SERVER_ERROR] == 12
    assert queue.dead_letter_count() == 0
    assert proxy.ingested_events() == dict.fromkeys(published.event_ids, 1)
    order = _first_ingestion_order(proxy)
    assert order == {t: [e.seq for e in events] for t, events in published.by_thread().items()}
    assert set(rows_by_event(proxy.url, "langgraph", prefix)) == published.event_ids
    points = _points(metrics_reader)
    assert not [key for key in points if key[0] == "langgraph_kusto.worker.events.abandoned"]
    queue.close()


def test_a_missing_database_is_named_in_the_log_and_its_events_are_kept(
    proxy: FaultProxy, private_queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A configuration error is the operator's to fix: the log quotes Kusto's message (it
    names the database), where it said only "HTTP 400 BadRequest_EntityNotFound"; the
    events stay in hand, neither given back nor dead-lettered."""
    _, threads = _threads("unprovisioned", 1)
    send_all(private_queue, build_checkpoints(threads, 2).messages)
    queue = SqliteQueue.from_url(private_queue, max_delivery_count=1)
    ingestor = KustoIngestor(proxy.url, "no_such_database")
    policy = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.02)
    worker = Worker(queue, ingestor, retry=policy)
    try:
        with caplog.at_level(logging.WARNING, WORKER_LOGGER), _running(worker):
            assert wait_until(lambda: caplog.text.count("retrying with the batch in hand") >= 3, 10)
            assert worker.totals.events_abandoned == 0
            assert queue.dead_letter_count() == 0
        messages = _kusto_messages(caplog)
        assert messages and all("no_such_database" in message for message in messages)
    finally:
        ingestor.close()
        queue.close()


def _kusto_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.kusto_message for r in caplog.records if hasattr(r, "kusto_message")]


class _DownUntil:
    """An ingestor whose Kusto refuses connections until ``up_at`` (monotonic); records
    which events it ingested."""

    def __init__(self, up_at: float, ingested: list[str]) -> None:
        self.up_at = up_at
        self.ingested = ingested

    def ingest(self, rows: Any, encoded: bytes | None = None) -> None:
        if time.monotonic() < self.up_at:
            raise ConnectionError("Kusto is unreachable")
        self.ingested.extend(sorted({row["EventId"] for row in rows}))


def test_a_session_lost_while_waiting_for_kusto_is_let_go_and_ingested_once(
    private_queue: str,
) -> None:
    """Kusto is down for 4 s and the worker holds its batch; meanwhile its lock on one
    thread's session is lost and a second worker takes that thread. The first worker let
    go of nothing and ingested that thread's events too: each twice. Its health said
    nothing was held."""
    published = build_checkpoints(["lost-a", "kept-b"], 2)
    send_all(private_queue, published.messages)
    up_at = time.monotonic() + 4.0
    first_ingested: list[str] = []
    second_ingested: list[str] = []
    policy = RetryPolicy(max_attempts=2, initial_backoff=0.05, max_backoff=0.1, attempt_timeout=1)
    first_queue = SqliteQueue.from_url(private_queue, lock_duration=1.0)
    renew = first_queue.renew_locks
    lose_once = [True]

    def renew_losing_thread_a(messages: Any) -> list[float]:
        if lose_once and any(m.session_id == "lost-a" for m in messages):
            lose_once.clear()  # as after a Service Bus failover
            lost = [m.sequence_number for m in messages if m.session_id == "lost-a"]
            raise LockLostError("session lock lost", lost)
        return renew(messages)

    first_queue.renew_locks = renew_losing_thread_a  # type: ignore[method-assign]
    first = Worker(first_queue, _DownUntil(up_at, first_ingested), retry=policy)
    first._renewer.start()
    cycle = threading.Thread(target=first.run_once)
    cycle.start()
    second_queue = SqliteQueue.from_url(private_queue, lock_duration=5.0)
    second = Worker(second_queue, _DownUntil(up_at, second_ingested), retry=policy)
    try:
        time.sleep(1.0)
        health = first.health()
        # At least the kept thread's 2 events (the lost thread's may be let go already).
        assert health["events_held"] >= 2 and health["seconds_waiting_for_kusto"] > 0, health
        time.sleep(1.0)  # the lost session's locks lapse
        second._renewer.start()
        second.run_once()
        cycle.join(timeout=30)
        assert not cycle.is_alive()
    finally:
        first._renewer.stop()
        second._renewer.stop()
    by_thread = {e.event_id: e.thread_id for e in published.events}
    assert sorted(first_ingested + second_ingested) == sorted(by_thread)
    assert {by_thread[e] for e in first_ingested} == {"kept-b"}
    assert {by_thread[e] for e in second_ingested} == {"lost-a"}
    assert first.health()["seconds_waiting_for_kusto"] == 0
    first_queue.close()
    second_queue.close()


class _FailingOnCalls:
    """An ingestor that raises an error nobody classified (a bug, not Kusto's answer) on
    the given calls: the worker gives such a batch back to the queue."""

    def __init__(self, ingestor: KustoIngestor, failing_calls: set[int]) -> None:
        self.ingestor = ingestor
        self.failing_calls = failing_calls
        self.calls = 0

    def ingest(self, rows: Any, encoded: bytes | None = None) -> None:
        self.calls += 1
        if self.calls in self.failing_calls:
            raise RuntimeError("an unexpected failure")
        self.ingestor.ingest(rows, encoded)


def test_a_batch_given_back_takes_the_rest_of_its_cycle_along_so_order_holds(
    proxy: FaultProxy, private_queue: str
) -> None:
    prefix, threads = _threads("order", 2)
    published = build_checkpoints(threads, 10)
    send_all(private_queue, published.messages)
    # One receive, cut by bytes into operations of 5 events; the second operation fails
    # twice and is given back.
    event_bytes = max(len(encode_rows(event_rows(e))) + 1 for e in published.events)
    queue = SqliteQueue.from_url(private_queue)
    ingestor = KustoIngestor(proxy.url, "langgraph")
    failing = _FailingOnCalls(ingestor, {2, 3})
    policy = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.02)
    worker = Worker(queue, failing, max_batch_bytes=5 * event_bytes, retry=policy)
    try:
        _drain(queue, worker)
    finally:
        ingestor.close()

    assert worker.totals.events_abandoned >= 5
    assert len(proxy.ingested[0].event_ids) == 5
    order = _first_ingestion_order(proxy)
    assert order == {t: [e.seq for e in events] for t, events in published.by_thread().items()}
    assert proxy.ingested_events() == dict.fromkeys(published.event_ids, 1)
    assert set(rows_by_event(proxy.url, "langgraph", prefix)) == published.event_ids
    queue.close()


def test_permanent_rejects_dead_letter_only_the_offending_events(
    proxy: FaultProxy, private_queue: str, metrics_reader: InMemoryMetricReader
) -> None:
    prefix, threads = _threads("reject", 8)
    published = build_checkpoints(threads, 10)
    bad = {published.events[i].event_id for i in (3, 41, 77)}
    proxy.reject_events(bad)
    send_all(private_queue, published.messages)
    queue = SqliteQueue.from_url(private_queue)
    ingestor = KustoIngestor(proxy.url, "langgraph")
    worker = Worker(queue, ingestor, retry=FAST_RETRY, metrics=_metrics(metrics_reader))
    try:
        _drain(queue, worker)
    finally:
        ingestor.close()

    dead = queue.list_dead_letters()
    assert {d.message_id.rsplit(".", 1)[0] for d in dead} == bad
    for letter in dead:
        assert letter.reason == "IngestionRejected"
        assert "HTTP 400 BadRequest_InvalidRecord" in letter.description
        assert f"RowId '{letter.message_id.rsplit('.', 1)[0]}/" in letter.description
    good = published.event_ids - bad
    assert set(rows_by_event(proxy.url, "langgraph", prefix)) == good
    # Bisection ingested every good event exactly once, and no rejected one.
    assert proxy.ingested_events() == dict.fromkeys(good, 1)
    # Halving 80 events down to 3 singletons takes at most 3 * log2(80) + 1 requests.
    assert proxy.rejected_requests <= 3 * 7 + 1
    for seqs in _first_ingestion_order(proxy).values():
        assert seqs == sorted(seqs), "a thread's events were ingested out of order"
    points = _points(metrics_reader)
    assert (
        points[("langgraph_kusto.worker.events.dead_lettered", (("reason", "IngestionRejected"),))]
        == 3
    )
    assert points[("langgraph_kusto.worker.events.ingested", ())] == 77
    queue.close()


def test_locks_are_renewed_while_an_ingestion_is_slow_and_retried(
    proxy: FaultProxy, private_queue: str
) -> None:
    prefix, threads = _threads("renew", 4)
    published = build_checkpoints(threads, 5)
    send_all(private_queue, published.messages)
    # Each attempt takes 0.4 s and the first two fail: the batch is in hand for several
    # lock periods of 0.5 s.
    proxy.delay_ingestion(0.4)
    proxy.fail_next(Fault.SERVER_ERROR, Fault.SERVER_ERROR)
    queue = SqliteQueue.from_url(private_queue, lock_duration=0.5)
    rival = SqliteQueue.from_url(private_queue, lock_duration=0.5)
    stolen: list[str] = []
    ingestor = KustoIngestor(proxy.url, "langgraph")
    patient = RetryPolicy(max_attempts=5, initial_backoff=0.05, max_backoff=0.2, attempt_timeout=5)
    worker = Worker(queue, ingestor, retry=patient)
    try:
        with _running(worker):
            assert proxy.wait_for_ingestion_requests(1, timeout=10)
            # Another consumer keeps asking; a lapsed lock would hand it the messages.
            while queue.depth():
                taken = rival.receive(100, 0.05)
                stolen += [m.message_id for m in taken]
                if taken:
                    rival.abandon(taken)
    finally:
        ingestor.close()
        rival.close()

    assert stolen == []
    assert proxy.ingested_events() == dict.fromkeys(published.event_ids, 1)
    assert set(rows_by_event(proxy.url, "langgraph", prefix)) == published.event_ids
    queue.close()


class _FailingComplete(SqliteQueue):
    """A queue whose first ``complete`` fails, as a busy or unreachable queue does."""

    failures = 1

    def complete(self, messages: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise OutboxError("the queue is busy (injected)")
        super().complete(messages)


def test_a_queue_failure_after_ingestion_loses_nothing_and_duplicates_stay_hidden(
    proxy: FaultProxy, private_queue: str
) -> None:
    _, threads = _threads("settle", 3)
    published = build_checkpoints(threads, 5)
    send_all(private_queue, published.messages)
    queue = _FailingComplete.from_url(private_queue, lock_duration=0.5)
    ingestor = KustoIngestor(proxy.url, "langgraph")
    try:
        _drain(queue, Worker(queue, ingestor, retry=FAST_RETRY))
    finally:
        ingestor.close()

    # Ingested, not completed, let go: redelivered after the lock lapsed, ingested again.
    assert proxy.ingested_events() == dict.fromkeys(published.event_ids, 2)
    assert queue.dead_letter_count() == 0
    assert_readable_exactly_once(private_queue, proxy.url, "langgraph", published)
    queue.close()


def test_an_event_over_the_streaming_limit_is_dead_lettered_and_its_batch_ingested(
    kusto_server: Any, private_queue: str
) -> None:
    prefix, threads = _threads("huge", 2)
    small = build_checkpoints(threads, 3)
    # 6 MB of random bytes: more than the 4 MB a streaming request may carry, even gzipped.
    huge = build_checkpoints(threads[:1], 1, value_bytes=6_000_000)
    send_all(private_queue, huge.messages + small.messages)
    queue = SqliteQueue.from_url(private_queue)
    ingestor = KustoIngestor(kusto_server.url, "langgraph")
    try:
        _drain(queue, Worker(queue, ingestor, retry=FAST_RETRY))
    finally:
        ingestor.close()

    dead = queue.list_dead_letters(limit=1000)
    assert {d.message_id for d in dead} == {m.message_id for m in huge.messages}
    assert {d.reason for d in dead} == {"EventTooLarge"}
    assert "HTTP 413 BadRequest_StreamingIngestionRequestTooLarge" in dead[0].description
    assert set(rows_by_event(kusto_server.url, "langgraph", prefix)) == small.event_ids
    # The note that tells the saver which published it to stop waiting, and why.
    notes = dead_letter_notes(kusto_server.url, "langgraph", prefix)
    assert notes == dict.fromkeys(huge.event_ids, "EventTooLarge")
    queue.close()


def test_batches_respect_event_and_byte_limits_and_never_split_an_event(
    proxy: FaultProxy, private_queue: str
) -> None:
    prefix, threads = _threads("limits", 4)
    small = build_checkpoints(threads, 15)
    # 600 KB values in 64 KB messages: each event arrives in ~10 parts and makes 3 rows
    # (the checkpoint and two chunks of the value).
    large = build_checkpoints(threads[:2], 2, value_bytes=600_000, max_message_bytes=64 * 1024)
    assert len(large.messages) > 4 * len(large.events)
    send_all(private_queue, small.messages + large.messages)
    queue = SqliteQueue.from_url(private_queue)
    ingestor = KustoIngestor(proxy.url, "langgraph")
    worker = Worker(queue, ingestor, max_batch_events=7, max_batch_bytes=200_000)
    try:
        _drain(queue, worker)
    finally:
        ingestor.close()

    every = Published(small.events + large.events, small.messages + large.messages)
    assert set(rows_by_event(proxy.url, "langgraph", prefix)) == every.event_ids
    large_ids = large.event_ids
    for ingestion in proxy.ingested:
        events = ingestion.event_ids
        assert len(events) <= 7
        # A large event (over the byte limit on its own) travels alone.
        assert events.isdisjoint(large_ids) or len(events) == 1
    # Each event's rows (a large one has several) came in one operation, all of them.
    expected_rows = {e.event_id: 2 if e.event_id not in large_ids else 3 for e in every.events}
    rows_per_operation = {
        event_id: sum(1 for row in ingestion.rows if row.event_id == event_id)
        for ingestion in proxy.ingested
        for event_id in ingestion.event_ids
    }
    assert rows_per_operation == expected_rows
    assert proxy.ingested_events() == dict.fromkeys(every.event_ids, 1)
    assert_readable_exactly_once(private_queue, proxy.url, "langgraph", every)
    queue.close()


class _Trickle(SqliteQueue):
    """A queue into which one message arrives just before each of the first receives, as
    under a steady stream of sends; it records when each receive started and ended."""

    def __init__(self, url: str, arriving: list[OutboxMessage]) -> None:
        parsed = parse_url(url)
        super().__init__(parsed.path, parsed.queue)
        self.arriving = list(arriving)
        self.calls: list[tuple[float, float, float]] = []  # (started, ended, max_wait)

    def receive(self, max_messages: int, max_wait: float) -> list[ReceivedMessage]:
        started = time.monotonic()
        if self.arriving:
            self.send([self.arriving.pop(0)])
        received = super().receive(max_messages, max_wait)
        self.calls.append((started, time.monotonic(), max_wait))
        return received


def test_a_steady_trickle_is_received_in_pauses_not_one_transaction_per_message(
    proxy: FaultProxy, private_queue: str
) -> None:
    """Once a receive drains the queue the worker pauses before the next, so that receive
    takes what arrived meanwhile: on the SQLite queue every receive is a transaction that
    takes the write lock from the saver's sends. A quiet queue still closes the batch
    within ``BATCH_IDLE_GAP`` of the last message."""
    _, threads = _threads("trickle", 1)
    published = build_checkpoints(threads, 5)
    queue = _Trickle(private_queue, published.messages)
    ingestor = KustoIngestor(proxy.url, "langgraph")
    try:
        result = Worker(queue, ingestor, max_batch_delay=30).run_once()
    finally:
        ingestor.close()
        queue.close()
    assert result.events_ingested == 5
    later = queue.calls[1:]
    assert len(later) == 5  # four with one message each, then one that found none
    for (_, previous_ended, _), (started, _, max_wait) in zip(queue.calls, later, strict=False):
        assert started - previous_ended >= COLLECT_PAUSE
        assert max_wait == pytest.approx(BATCH_IDLE_GAP - COLLECT_PAUSE)


def test_poison_input_is_dead_lettered_with_specific_reasons_and_the_worker_keeps_going(
    proxy: FaultProxy, private_queue: str, metrics_reader: InMemoryMetricReader
) -> None:
    prefix, threads = _threads("poison", 1)
    [thread] = threads
    good = build_checkpoints(threads, 3)
    # Metadata bytes survive msgpack but cannot become a JSON row.
    unencodable = replace(build_checkpoints(threads, 1).events[0], metadata={"raw": b"\x00"})

    def frame_message(frame: Frame, body: bytes | None = None) -> OutboxMessage:
        return OutboxMessage(body or encode_frame(frame), frame.message_id, thread)

    [future] = split_frames("future-event", msgpack.packb({"v": 99, "kind": "put"}), 1 << 20)
    [fields_missing] = split_frames("no-fields", msgpack.packb({"v": 1}), 1 << 20)
    newer_frame = msgpack.packb(["lgk", 2, "newer-frame", 0, 1, b""], use_bin_type=True)
    torn = split_frames("torn-event", os.urandom(3000), 1024)
    poison = [
        OutboxMessage(os.urandom(200), "random-bytes", thread),
        frame_message(future),
        frame_message(fields_missing),
        OutboxMessage(newer_frame, "newer-frame.0", thread),
        frame_message(torn[0]),  # the other parts never come
        *(
            frame_message(f)
            for f in split_frames(unencodable.event_id, encode_event(unencodable), 1 << 20)
        ),
    ]
    send_all(private_queue, poison + good.messages)
    queue = SqliteQueue.from_url(private_queue)
    ingestor = KustoIngestor(proxy.url, "langgraph")
    worker = Worker(queue, ingestor, chunk_group_timeout=1.0, metrics=_metrics(metrics_reader))
    try:
        _drain(queue, worker)
    finally:
        ingestor.close()

    reasons = {d.message_id: d.reason for d in queue.list_dead_letters()}
    assert reasons == {
        "random-bytes": "MalformedEnvelope",
        "future-event.0": "UnknownEnvelopeVersion",
        "no-fields.0": "MalformedEnvelope",
        "newer-frame.0": "UnknownEnvelopeVersion",
        "torn-event.0": "IncompleteChunkGroup",
        f"{unencodable.event_id}.0": "MalformedEnvelope",
    }
    descriptions = {d.message_id: d.description for d in queue.list_dead_letters()}
    assert f"1 of {len(torn)} parts" in descriptions["torn-event.0"]
    assert "cannot be built" in descriptions[f"{unencodable.event_id}.0"]
    # The good events behind the poison, in the same session, were ingested.
    assert set(rows_by_event(proxy.url, "langgraph", prefix)) == good.event_ids
    dead_by_reason = {
        dict(attrs)["reason"]: value
        for (name, attrs), value in _points(metrics_reader).items()
        if name.endswith("events.dead_lettered")
    }
    assert dead_by_reason == {
        "MalformedEnvelope": 3,
        "UnknownEnvelopeVersion": 2,
        "IncompleteChunkGroup": 1,
    }
    queue.close()


def test_health_endpoint_reports_the_worker_state(proxy: FaultProxy, private_queue: str) -> None:
    queue = SqliteQueue.from_url(private_queue)
    ingestor = KustoIngestor(proxy.url, "langgraph")
    worker = Worker(queue, ingestor, max_wait=0.05)
    health = service.HealthServer(0, worker.health).start()
    url = f"http://127.0.0.1:{health.port}/healthz"
    try:
        assert _get(url) == (503, "starting")
        with _running(worker):
            assert wait_until(lambda: _get(url) == (200, "running"), 10)
        assert _get(url) == (503, "stopped")
        assert _get(url.replace("/healthz", "/other"))[0] == 404
    finally:
        health.close()
        ingestor.close()
        queue.close()


def _get(url: str) -> tuple[int, str | None]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())["status"]
    except urllib.error.HTTPError as error:
        body = json.loads(error.read())
        return error.code, body.get("status")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    service.add_worker_arguments(parser)
    return parser.parse_args(argv)


def test_settings_come_from_flags_then_environment_then_defaults() -> None:
    env = {
        "LANGGRAPH_KUSTO_MAX_BATCH_EVENTS": "50",
        "LANGGRAPH_KUSTO_MAX_BATCH_DELAY": "0.25",
        "LANGGRAPH_KUSTO_HEALTH_PORT": "9000",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        "LANGGRAPH_KUSTO_INGESTION_MODE": "queued",
    }
    settings = service.WorkerSettings.from_args(_parse(["--max-batch-events", "70"]), env)
    assert settings.max_batch_events == 70  # the flag wins
    assert settings.max_batch_delay == 0.25  # then the environment
    assert settings.health_port == 9000
    assert settings.shutdown_timeout == 30.0  # then the default
    assert settings.metrics_exporters == ("otlp",)  # an OTLP endpoint implies OTLP
    assert settings.ingestion_mode == "queued"
    azure = ["--cluster", "https://c.westeurope.kusto.windows.net"]
    defaults = service.WorkerSettings.from_args(_parse(azure), {})
    assert (defaults.health_port, defaults.metrics_exporters) == (8080, ())
    assert defaults.ingestion_mode == "managed"
    # The local server queues only with Azure Storage: a loopback cluster streams.
    local = service.WorkerSettings.from_args(_parse(["--cluster", "http://127.0.0.1:1"]), {})
    assert local.ingestion_mode == "streaming"


@pytest.mark.parametrize(
    ("argv", "env", "complaint"),
    [
        (["--max-batch-events", "0"], {}, "--max-batch-events must be >= 1"),
        ([], {"LANGGRAPH_KUSTO_RETRY_BUDGET": "soon"}, "is not a valid float"),
        ([], {"LANGGRAPH_KUSTO_SHUTDOWN_TIMEOUT": "-1"}, "must be positive"),
        (["--health-port", "70000"], {}, "--health-port must be 0-65535"),
        ([], {"OTEL_METRICS_EXPORTER": "prometheus"}, "'prometheus' is not supported"),
        ([], {"LANGGRAPH_KUSTO_INGESTION_MODE": "fast"}, "'fast' is not one of streaming"),
        # Locks shorter than the renewer can keep: every event was dead-lettered unread.
        (["--lock-duration", "0.02"], {}, "--lock-duration must be >= 1, got 0.02"),
        (
            [],
            {"LANGGRAPH_KUSTO_LOCK_DURATION": "0.5"},
            r"\$LANGGRAPH_KUSTO_LOCK_DURATION must be >= 1, got 0.5",
        ),
        # An idle receive outlasting the shutdown deadline or the stall limit: the worker
        # overran its deadline on SIGTERM, or reported itself stalled while idle.
        (
            ["--max-wait", "600", "--shutdown-timeout", "5"],
            {},
            r"--max-wait must be below --shutdown-timeout \(5\), got 600",
        ),
        (
            ["--max-wait", "10", "--max-lock-renewal", "3"],
            {},
            r"--max-wait must be below --max-lock-renewal \(3\), got 10",
        ),
        ([], {"LANGGRAPH_KUSTO_MAX_WAIT": "30"}, r"below --shutdown-timeout \(30\), got 30"),
    ],
)
def test_unusable_settings_are_refused_with_a_message(
    argv: list[str], env: dict[str, str], complaint: str
) -> None:
    with pytest.raises(service.SettingsError, match=complaint):
        service.WorkerSettings.from_args(_parse(argv), env)


def test_lock_duration_and_max_wait_accept_values_within_their_bounds() -> None:
    argv = ["--lock-duration", "1", "--max-wait", "4.5", "--shutdown-timeout", "5"]
    settings = service.WorkerSettings.from_args(_parse([*argv, "--max-lock-renewal", "5"]), {})
    assert (settings.lock_duration, settings.max_wait) == (1.0, 4.5)


@pytest.mark.parametrize(
    "argv",
    [
        ["--lock-duration", "0.05"],
        ["--max-wait", "600", "--shutdown-timeout", "5"],
        ["--max-wait", "10", "--max-lock-renewal", "3"],
    ],
)
def test_the_worker_command_refuses_unsafe_lock_or_wait_settings_with_one_line(
    argv: list[str], private_queue: str
) -> None:
    # A subprocess: before these were refused, the worker started and ran until stopped.
    command = [sys.executable, "-m", "langgraph.checkpoint.kusto.ingestor_worker.cli", "worker"]
    command += ["--queue", private_queue, "--cluster", "http://127.0.0.1:9", "--health-port", "0"]
    result = subprocess.run([*command, *argv], capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert result.stderr.startswith(f"langgraph-kusto worker: {argv[0]} must be ")
    assert result.stderr.count("\n") == 1, result.stderr


def test_worker_command_exits_2_on_an_unusable_queue_url(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = service.run_worker_command(_parse(["--queue", "amqp://nowhere", "--health-port", "0"]))
    assert code == 2
    assert "is not supported" in capsys.readouterr().err
