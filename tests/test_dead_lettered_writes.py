"""A write the ingestor dead-letters: the worker notes it in Kusto, and the saver that
published it stops waiting for it at once and says why; after a replay it reads again."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.kusto import AsyncKustoSaver, EventDeadLetteredError, KustoSaver
from langgraph.checkpoint.kusto.ingestor_worker.ingest import KustoIngestor
from langgraph.checkpoint.kusto.ingestor_worker.worker import Worker
from langgraph.checkpoint.kusto.outbox import LockLostError, OutboxMessage, open_queue
from langgraph.checkpoint.kusto.shared.framing import event_id_of
from langgraph.checkpoint.kusto.shared.rows import dead_letter_row

WAIT = 60.0
"""Long enough that a saver that waits instead of noticing the note fails the test by the
error it raises (a plain IngestionTimeoutError), not by hanging for minutes."""


def _put(saver: KustoSaver, thread: str, size: int = 10) -> str:
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = {"v": "x" * size}
    checkpoint["channel_versions"] = {"v": "1"}
    config = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
    return saver.put(config, checkpoint, {}, {"v": "1"})["configurable"]["checkpoint_id"]


def _note(stack: Any, event_id: str, thread: str, reason: str) -> None:
    """The worker's note that it dead-lettered ``event_id``, ingested as the worker does."""
    ingestor = KustoIngestor(stack.cluster, stack.database)
    try:
        ingestor.ingest([dead_letter_row(event_id, thread, reason)])
    finally:
        ingestor.close()


def test_a_dead_lettered_write_fails_reads_that_need_it_at_once_with_the_reason(
    stack: Any, private_queue: str, start_worker: Any
) -> None:
    thread = f"dead-{uuid.uuid4().hex[:8]}"
    with KustoSaver.from_conn_string(
        private_queue, stack.cluster, stack.database, max_message_bytes=2048, strong_timeout=WAIT
    ) as saver:
        _put(saver, thread, size=20_000)  # several messages
        queue = open_queue(private_queue)
        try:  # one part goes missing: the worker cannot rebuild the event
            lost = queue.receive(1, 1.0)
            queue.complete(lost)
        finally:
            queue.close()
        event_id = event_id_of(lost[0].message_id)
        start_worker(private_queue, chunk_group_timeout=0.2)
        with pytest.raises(EventDeadLetteredError, match="IncompleteChunkGroup") as raised:
            saver.wait_for_ingestion()
    assert raised.value.reasons == {event_id: "IncompleteChunkGroup"}


def test_a_replayed_dead_letter_is_read_again(
    stack: Any, private_queue: str, start_worker: Any
) -> None:
    """The note stays in Kusto; once the event's own rows arrive (the replay), the saver
    counts it as ingested."""
    thread = f"replayed-{uuid.uuid4().hex[:8]}"
    with KustoSaver.from_conn_string(
        private_queue, stack.cluster, stack.database, strong_timeout=WAIT
    ) as saver:
        checkpoint_id = _put(saver, thread)
        assert saver.cache is not None
        (event_id,) = saver.cache.pending_events()
        _note(stack, event_id, thread, "EventTooLarge")
        with pytest.raises(EventDeadLetteredError, match="EventTooLarge"):
            saver.wait_for_ingestion()

        start_worker(private_queue)  # the replay: the event's own rows arrive
        deadline = time.monotonic() + WAIT
        while True:  # until they are in, the note still stands
            try:
                saver.wait_for_ingestion()
                break
            except EventDeadLetteredError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert saver.cache.pending_count() == 0 and saver.cache.dead_lettered() == {}
    with KustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database, consistency="eventual"
    ) as reader:
        found = reader.get_tuple({"configurable": {"thread_id": thread}})
        assert found is not None and found.checkpoint["id"] == checkpoint_id


async def test_the_async_saver_stops_waiting_for_a_dead_lettered_write(
    stack: Any, private_queue: str
) -> None:
    thread = f"dead-async-{uuid.uuid4().hex[:8]}"
    async with AsyncKustoSaver.from_conn_string(
        private_queue, stack.cluster, stack.database, strong_timeout=WAIT
    ) as saver:
        config = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
        await saver.aput(config, empty_checkpoint(), {}, {})
        assert saver.cache is not None
        (event_id,) = saver.cache.pending_events()
        _note(stack, event_id, thread, "BadEnvelope")
        with pytest.raises(EventDeadLetteredError) as raised:
            await saver.wait_for_ingestion()
    assert raised.value.reasons == {event_id: "BadEnvelope"}


class _FirstPartOnly:
    """A receiver that hands the worker only part 0 of each event, and whose dead-lettering
    can fail as when the message's lock has lapsed (it is then redelivered, not dead)."""

    def __init__(self, queue: Any, lock_lost: bool) -> None:
        self.queue, self.lock_lost = queue, lock_lost

    def receive(self, max_messages: int, max_wait: float) -> list[Any]:
        return [
            m for m in self.queue.receive(max_messages, max_wait) if m.message_id.endswith(".0")
        ]

    def dead_letter(self, message: Any, reason: str, description: str) -> None:
        if self.lock_lost:
            raise LockLostError("lock lapsed", [message.sequence_number])
        self.queue.dead_letter(message, reason, description)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.queue, name)


class _Recording:
    def __init__(self) -> None:
        self.calls: list[list[dict[str, Any]]] = []

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [row for call in self.calls for row in call]

    def ingest(self, rows: Any, encoded: bytes | None = None) -> None:
        self.calls.append(list(rows))


@pytest.mark.parametrize("lock_lost", [False, True])
def test_a_note_is_written_only_for_an_event_really_dead_lettered(
    stack: Any, private_queue: str, lock_lost: bool
) -> None:
    with KustoSaver.from_conn_string(
        private_queue, stack.cluster, stack.database, max_message_bytes=2048
    ) as saver:
        _put(saver, f"note-{uuid.uuid4().hex[:8]}", size=20_000)
        assert saver.cache is not None
        (event_id,) = saver.cache.pending_events()
    queue = open_queue(private_queue)
    ingestor = _Recording()
    try:
        worker = Worker(
            _FirstPartOnly(queue, lock_lost), ingestor, max_wait=0.05, chunk_group_timeout=0.1
        )
        worker.run_once()
        time.sleep(0.2)
        worker.run_once()  # part 0 waited too long for the others: dead-lettered
    finally:
        queue.close()
    notes = [row for row in ingestor.rows if row["RowKind"] == "dead_letter"]
    expected = [] if lock_lost else [(event_id, {"reason": "IncompleteChunkGroup"})]
    assert [(row["EventId"], row["Metadata"]) for row in notes] == expected


def test_notes_are_ingested_once_the_cycle_is_settled(stack: Any, private_queue: str) -> None:
    """A note (one attempt, up to NOTE_TIMEOUT) must not hold up the batch it came with:
    the batch is ingested first, and the cycle's notes go together after it."""
    thread = f"settled-{uuid.uuid4().hex[:8]}"
    queue = open_queue(private_queue)
    try:
        queue.send([OutboxMessage(body=b"not a frame", message_id="feed.0", session_id=thread)])
        with KustoSaver.from_conn_string(private_queue, stack.cluster, stack.database) as saver:
            _put(saver, thread)
        ingestor = _Recording()
        Worker(queue, ingestor, max_wait=0.05).run_once()
    finally:
        queue.close()
    assert [[row["RowKind"] for row in call] for call in ingestor.calls] == [
        ["checkpoint", "blob"],
        ["dead_letter"],
    ]
