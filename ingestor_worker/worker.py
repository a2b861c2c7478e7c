"""The ingestor worker: peek-lock receive, batch, one ingestion per batch, then complete.

Messages are completed only after their rows are ingested, so a worker killed at any
instant loses nothing: the queue redelivers what was not completed, and readers drop
the re-ingested copies by ``RowId``. The worker decodes envelopes only; checkpoint
payloads pass through as opaque bytes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from langgraph.checkpoint.kusto.outbox import LockLostError, OutboxReceiver, ReceivedMessage
from langgraph.checkpoint.kusto.shared.envelope import decode_event
from langgraph.checkpoint.kusto.shared.errors import EnvelopeError, IncompleteEventError
from langgraph.checkpoint.kusto.shared.framing import Frame, decode_frame, join_frames
from langgraph.checkpoint.kusto.shared.rows import event_rows

logger = logging.getLogger("langgraph.checkpoint.kusto.worker")

DEFAULT_MAX_BATCH_MESSAGES = 500
DEFAULT_MAX_WAIT = 1.0
DEFAULT_CHUNK_GROUP_TIMEOUT = 300.0


class Ingestor(Protocol):
    def ingest(self, rows: Sequence[dict[str, Any]]) -> None: ...


@dataclass(slots=True)
class _PendingEvent:
    """The frames of one event received so far, in the order they arrived."""

    event_id: str
    first_seen: float
    frames: list[Frame] = field(default_factory=list)
    messages: list[ReceivedMessage] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return bool(self.frames) and len({f.index for f in self.frames}) == self.frames[0].count


@dataclass(slots=True)
class CycleResult:
    events_ingested: int = 0
    messages_dead_lettered: int = 0
    events_held: int = 0


class Worker:
    """Moves events from the outbox queue into Kusto; run one per process, N processes."""

    def __init__(
        self,
        receiver: OutboxReceiver,
        ingestor: Ingestor,
        *,
        max_batch_messages: int = DEFAULT_MAX_BATCH_MESSAGES,
        max_wait: float = DEFAULT_MAX_WAIT,
        chunk_group_timeout: float = DEFAULT_CHUNK_GROUP_TIMEOUT,
    ) -> None:
        self.receiver = receiver
        self.ingestor = ingestor
        self.max_batch_messages = max_batch_messages
        self.max_wait = max_wait
        self.chunk_group_timeout = chunk_group_timeout
        self._held: dict[str, _PendingEvent] = {}

    def run(self, stop: threading.Event) -> None:
        """Cycle until ``stop`` is set; the batch in hand is finished first."""
        logger.info("worker started", extra={"max_batch_messages": self.max_batch_messages})
        while not stop.is_set():
            self.run_once()
        self.release_held()
        logger.info("worker stopped")

    def run_once(self) -> CycleResult:
        """One receive → ingest → complete cycle."""
        result = CycleResult()
        messages = self.receiver.receive(self.max_batch_messages, self.max_wait)
        by_session: dict[str, list[tuple[ReceivedMessage, Frame]]] = defaultdict(list)
        for message in messages:
            try:
                frame = decode_frame(message.body)
            except EnvelopeError as exc:
                self._dead_letter([message], exc)
                result.messages_dead_lettered += 1
                continue
            by_session[message.session_id].append((message, frame))
        for arrivals in by_session.values():
            for message, frame in arrivals:
                pending = self._held.setdefault(
                    frame.event_id, _PendingEvent(frame.event_id, time.monotonic())
                )
                pending.frames.append(frame)
                pending.messages.append(message)

        ready, rows = self._ready_events(result)
        if ready:
            settled = [m for p in ready for m in p.messages]
            try:
                self.ingestor.ingest(rows)
            except Exception as exc:
                # Transient or not, the queue redelivers; its max delivery count decides
                # when a batch that keeps failing is dead-lettered.
                logger.error(
                    "ingestion failed; batch abandoned",
                    extra={"events": len(ready), "error": type(exc).__name__},
                )
                self.receiver.abandon(settled)
                return result
            self.receiver.complete(settled)
            result.events_ingested = len(ready)
            logger.info(
                "batch ingested",
                extra={"events": len(ready), "rows": len(rows), "held": len(self._held)},
            )
        self._renew_held()
        result.events_held = len(self._held)
        return result

    def _ready_events(
        self, result: CycleResult
    ) -> tuple[list[_PendingEvent], list[dict[str, Any]]]:
        """Complete events in session order; a session stops at its first incomplete event,
        so a later checkpoint is never ingested before the blobs it may reference."""
        blocked_sessions: set[str] = set()
        ready: list[_PendingEvent] = []
        rows: list[dict[str, Any]] = []
        for pending in sorted(self._held.values(), key=lambda p: p.messages[0].sequence_number):
            session = pending.messages[0].session_id
            if session in blocked_sessions:
                continue
            if not pending.complete:
                if time.monotonic() - pending.first_seen > self.chunk_group_timeout:
                    del self._held[pending.event_id]
                    error = IncompleteEventError(
                        f"event {pending.event_id}: {len({f.index for f in pending.frames})} "
                        f"of {pending.frames[0].count} parts within {self.chunk_group_timeout}s"
                    )
                    self._dead_letter(pending.messages, error)
                    result.messages_dead_lettered += len(pending.messages)
                    continue
                blocked_sessions.add(session)
                continue
            del self._held[pending.event_id]
            try:
                event = decode_event(join_frames(pending.frames))
            except EnvelopeError as exc:
                self._dead_letter(pending.messages, exc)
                result.messages_dead_lettered += len(pending.messages)
                continue
            ready.append(pending)
            rows.extend(event_rows(event))
        return ready, rows

    def _dead_letter(self, messages: Sequence[ReceivedMessage], error: EnvelopeError) -> None:
        for message in messages:
            self.receiver.dead_letter(message, error.reason, str(error))
        logger.warning(
            "dead-lettered",
            extra={"reason": error.reason, "messages": len(messages), "detail": str(error)},
        )

    def _renew_held(self) -> None:
        for event_id, pending in list(self._held.items()):
            try:
                self.receiver.renew_locks(pending.messages)
            except LockLostError:
                # The queue redelivers these messages; collect them afresh then.
                del self._held[event_id]

    def release_held(self) -> None:
        """Give incomplete events back to the queue (shutdown)."""
        held = [m for p in self._held.values() for m in p.messages]
        self._held.clear()
        if held:
            self.receiver.abandon(held)
