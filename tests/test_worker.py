"""The worker: crash safety (SIGKILL mid-load) and poison input, on the local stack."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.kusto import KustoSaver
from langgraph.checkpoint.kusto.ingestor_worker.ingest import KustoIngestor
from langgraph.checkpoint.kusto.ingestor_worker.worker import Worker
from langgraph.checkpoint.kusto.outbox import OutboxMessage, open_queue
from langgraph.checkpoint.kusto.queries import Query
from langgraph.checkpoint.kusto.shared.envelope import decode_event, encode_event
from langgraph.checkpoint.kusto.shared.framing import encode_frame, split_frames
from langgraph.checkpoint.kusto.shared.rows import event_rows

COUNT_CHECKPOINT_ROWS = """\
declare query_parameters(prefix:string);
CheckpointEvents
| where ThreadId startswith prefix and RowKind == "checkpoint"
| summarize Rows = count(), Distinct = dcount(CheckpointId)"""


def _publish_checkpoints(saver: KustoSaver, threads: list[str], per_thread: int) -> None:
    for step in range(per_thread):
        for thread_id in threads:
            checkpoint = empty_checkpoint()
            checkpoint["id"] = str(uuid6(clock_seq=step))
            checkpoint["channel_values"] = {"step": step}
            checkpoint["channel_versions"] = {"step": saver.get_next_version(None, None)}
            saver.put(
                {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}},
                checkpoint,
                {"source": "loop", "step": step},
                checkpoint["channel_versions"],
            )


def _start_worker(queue_url: str, cluster: str, database: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "langgraph.checkpoint.kusto.ingestor_worker.cli",
            "worker",
            "--queue",
            queue_url,
            "--cluster",
            cluster,
            "--database",
            database,
            "--max-batch-messages",
            "40",
            "--max-wait",
            "0.05",
            "--health-port",
            "0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def _counts(stack: Any, prefix: str) -> tuple[int, int]:
    queries = stack.queries()
    try:
        [row] = queries.run(Query(COUNT_CHECKPOINT_ROWS, {"prefix": prefix}))
        return int(row["Rows"] or 0), int(row["Distinct"] or 0)
    finally:
        queries.close()


def test_sigkilled_worker_loses_nothing_and_readers_see_no_duplicates(
    stack: Any, private_queue: str, workers: list[subprocess.Popen[bytes]]
) -> None:
    prefix = f"kill-{uuid.uuid4().hex[:8]}-"
    threads = [f"{prefix}{i}" for i in range(20)]
    per_thread = 60
    total = len(threads) * per_thread
    with KustoSaver.from_conn_string(
        private_queue, stack.cluster, stack.database, consistency="eventual"
    ) as saver:
        _publish_checkpoints(saver, threads, per_thread)

    kills = 0
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        workers.append(_start_worker(private_queue, stack.cluster, stack.database))
        rows, distinct = _counts(stack, prefix)
        if distinct >= total:
            break
        if kills < 3:
            # Let the new worker ingest some batches, then kill it without warning.
            target = distinct + total // 8
            while _counts(stack, prefix)[1] < min(target, total - 1):
                assert workers[-1].poll() is None, "the worker exited on its own"
                assert time.monotonic() < deadline, "the worker made no progress"
                time.sleep(0.02)
            workers[-1].send_signal(signal.SIGKILL)
            workers[-1].wait(timeout=10)
            kills += 1
        else:
            while _counts(stack, prefix)[1] < total and time.monotonic() < deadline:
                assert workers[-1].poll() is None, "the worker exited on its own"
                time.sleep(0.1)
    assert kills == 3

    rows, distinct = _counts(stack, prefix)
    assert distinct == total, f"{total - distinct} checkpoints lost"
    assert rows >= distinct
    with KustoSaver.from_conn_string(
        private_queue, stack.cluster, stack.database, consistency="eventual"
    ) as reader:
        for thread_id in threads:
            seen = [
                t.checkpoint["id"] for t in reader.list({"configurable": {"thread_id": thread_id}})
            ]
            assert len(seen) == per_thread
            assert len(set(seen)) == per_thread, "a reader saw a checkpoint twice"
            latest = reader.get_tuple({"configurable": {"thread_id": thread_id}})
            assert latest is not None
            assert latest.checkpoint["channel_values"] == {"step": per_thread - 1}
    # Messages a killed worker had locked come back when their lock expires; the last
    # worker completes them (their rows are already in Kusto, so readers saw no change).
    queue = open_queue(private_queue)
    try:
        drained = time.monotonic() + 120
        while queue.depth() and time.monotonic() < drained:
            assert workers[-1].poll() is None, "the last worker exited on its own"
            time.sleep(0.2)
        assert queue.depth() == 0
        assert queue.dead_letter_count() == 0
    finally:
        queue.close()


def test_poison_messages_are_dead_lettered_with_reason_and_worker_keeps_running(
    stack: Any, private_queue: str
) -> None:
    queue = open_queue(private_queue)
    thread_id = f"poison-{uuid.uuid4().hex[:8]}"
    unknown_version = msgpack.packb({"v": 99, "kind": "put"})
    [frame] = split_frames("future-event", unknown_version, 1 << 20)
    queue.send(
        [
            OutboxMessage(os.urandom(200), "random-bytes", thread_id),
            OutboxMessage(encode_frame(frame), frame.message_id, thread_id),
        ]
    )
    with KustoSaver.from_conn_string(
        private_queue, stack.cluster, stack.database, consistency="eventual"
    ) as saver:
        _publish_checkpoints(saver, [thread_id], 3)

    ingestor = KustoIngestor(stack.cluster, stack.database)
    worker = Worker(queue, ingestor, max_wait=0.05)
    stop = threading.Event()
    runner = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while queue.depth() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runner.is_alive(), "the worker stopped on poison input"
        reasons = {d.message_id: d.reason for d in queue.list_dead_letters()}
        assert reasons == {
            "random-bytes": "MalformedEnvelope",
            "future-event.0": "UnknownEnvelopeVersion",
        }
        assert all(d.description for d in queue.list_dead_letters())
        # The good events behind the poison in the same session were ingested.
        assert _counts(stack, thread_id)[1] == 3
    finally:
        stop.set()
        runner.join(timeout=10)
        ingestor.close()
        queue.close()


def test_strong_write_is_readable_by_a_fresh_saver_with_no_cache(stack: Any) -> None:
    config = {"configurable": {"thread_id": f"strong-{uuid.uuid4().hex[:8]}", "checkpoint_ns": ""}}
    checkpoint = empty_checkpoint()
    with KustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database, consistency="strong"
    ) as writer:
        assert writer.cache is None
        writer.put(config, checkpoint, {"source": "input", "step": -1}, {})
    with KustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database, consistency="eventual"
    ) as reader:
        found = reader.get_tuple(config)
    assert found is not None and found.checkpoint["id"] == checkpoint["id"]


def test_a_batch_ingested_twice_is_seen_once(stack: Any) -> None:
    """A redelivery after ingestion but before completion stores the rows twice."""
    thread_id = f"twice-{uuid.uuid4().hex[:8]}"
    queue_url = stack.queue_url
    with KustoSaver.from_conn_string(queue_url, stack.cluster, stack.database) as saver:
        event, _ = saver._put_event(
            {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}},
            empty_checkpoint(),
            {"source": "input", "step": -1},
            {},
        )
    ingestor = KustoIngestor(stack.cluster, stack.database)
    try:
        rows = event_rows(decode_event(encode_event(event)))
        ingestor.ingest(rows)
        ingestor.ingest(rows)
    finally:
        ingestor.close()
    assert _counts(stack, thread_id) == (2, 1)
    with KustoSaver.from_conn_string(
        queue_url, stack.cluster, stack.database, consistency="eventual"
    ) as reader:
        assert len(list(reader.list({"configurable": {"thread_id": thread_id}}))) == 1
