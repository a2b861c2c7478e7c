"""The ingestor worker: peek-lock receive, batch, ingest with retry, then settle.

Invariants, each with a test:

* **Complete only after ingest.** A message is completed after the rows of its event are
  ingested, so a worker killed at any instant loses nothing: the queue redelivers what was
  not completed, and readers drop the re-ingested copies by ``RowId``.
* **One ingestion operation per batch; an event's parts never split across operations.**
  Kusto commits one operation atomically, which is what makes a checkpoint and its blobs
  visible together. Batches are cut (by events and bytes) and bisected only between events.
* **Per-session order.** Events of one thread (session) are ingested in queue order: a
  session waits behind its first incomplete event, the operations of a cycle run in order,
  and once one of them is given back to the queue everything after it is given back too.
* **The worker never deserializes user state.** It decodes envelopes with
  ``decode_event`` only; checkpoint payloads stay opaque bytes.

Failures: transient ones are retried (``retry.py``) while a ``LockRenewer`` keeps the
locks of everything in hand alive. When the retry budget is spent because Kusto itself is
unavailable (unreachable, failing, throttling, timing out, or missing a table, mapping or
permission), the worker keeps the batch and starts another round: giving it back would
spend one of its deliveries per round, and after ``MaxDeliveryCount`` rounds the queue
would dead-letter a thread's older events while its newer ones, delivered fewer times,
were ingested once Kusto returned. Other failures give the batch back, and the queue's max
delivery count decides when it is dead-lettered. A permanent rejection splits the batch
in halves until the refused events are found; only those are dead-lettered, with the
cause. Poison input (undecodable, unknown version, a chunk group that never completes) is
dead-lettered with a specific reason.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from langgraph.checkpoint.kusto.outbox import (
    LockLostError,
    OutboxError,
    OutboxReceiver,
    ReceivedMessage,
)
from langgraph.checkpoint.kusto.shared.envelope import decode_event
from langgraph.checkpoint.kusto.shared.errors import (
    EnvelopeError,
    IncompleteEventError,
)
from langgraph.checkpoint.kusto.shared.framing import (
    Frame,
    decode_frame,
    event_id_of,
    join_frames,
)
from langgraph.checkpoint.kusto.shared.rows import dead_letter_row, event_rows

from .ingest import encode_rows
from .metrics import WorkerMetrics
from .retry import (
    Cause,
    IngestFailure,
    PermanentIngestError,
    RetryGaveUp,
    RetryPolicy,
    call_with_retry,
    classify,
    run_with_timeout,
)

logger = logging.getLogger("langgraph.checkpoint.kusto.worker")

DEFAULT_MAX_BATCH_EVENTS = 500
DEFAULT_MAX_BATCH_BYTES = 4 * 1024 * 1024
"""JSON bytes of the rows per ingestion operation. Kusto's streaming-ingest cap is 4 MB of
*gzipped* body; rows of base64 payloads compress several-fold, so 4 MiB of JSON fits."""
DEFAULT_MAX_BATCH_DELAY = 1.0
DEFAULT_MAX_BATCH_MESSAGES = 500
DEFAULT_MAX_WAIT = 1.0
DEFAULT_CHUNK_GROUP_TIMEOUT = 300.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_MAX_LOCK_RENEWAL = 300.0
"""Azure's ``AutoLockRenewer`` default: beyond it the worker is stuck and should let go."""

BATCH_IDLE_GAP = 0.02
"""A batch closes early when no message arrives for this long: under light load events go
out at once (``strong`` writes wait on them); under steady load the batch fills up."""

COLLECT_PAUSE = 0.01
"""Once a receive has drained the queue, the next waits this long (part of the idle gap)
so that it takes what arrived meanwhile in one call: receiving each message as it
arrives made a queue transaction (or a Service Bus round trip) per 1-2 messages."""

QUEUE_ERROR_PAUSE = 1.0
MIN_RENEW_INTERVAL = 0.05
MAX_RENEW_INTERVAL = 5.0
MIN_LOCK_DURATION = 1.0
"""The shortest peek-lock the renewer keeps alive safely (``--lock-duration``). It renews a
lock halfway through its period but sleeps at least ``MIN_RENEW_INTERVAL``, and a renewal
is a queue transaction that may wait behind other writers: with locks of 50 ms or less
every renewal came too late, and each event was redelivered until dead-lettered. 1 s
leaves half a second, ten of those sleeps, for a renewal to land (Service Bus's own
minimum is 5 s)."""
NOTE_TIMEOUT = 5.0
"""One attempt at ingesting a cycle's dead-letter notes: they are a courtesy to the saver
that published the events (it stops waiting for them), never worth holding the loop."""

# Dead-letter reasons the worker gives, besides the envelope errors' own
# (MalformedEnvelope, UnknownEnvelopeVersion, IncompleteChunkGroup).
INGESTION_REJECTED = "IngestionRejected"
EVENT_TOO_LARGE = "EventTooLarge"
KUSTO_UNAVAILABLE_CAUSES = frozenset(
    {Cause.THROTTLED, Cause.SERVER_ERROR, Cause.TIMEOUT, Cause.NETWORK, Cause.CONFIGURATION}
)
"""Transient causes that are Kusto's (or its settings'), not the batch's: every batch
would fail the same way, so the worker holds on to the one in hand until Kusto is back."""
_REASON_BY_CAUSE = {Cause.REJECTED: INGESTION_REJECTED, Cause.TOO_LARGE: EVENT_TOO_LARGE}
_HINT_BY_CAUSE = {
    Cause.REJECTED: "Fix the cause, then replay the dead letter.",
    Cause.TOO_LARGE: "One event cannot be split across requests: use queued ingestion for "
    "events this large, then replay the dead letter.",
}


class Ingestor(Protocol):
    def ingest(self, rows: Sequence[dict[str, Any]], encoded: bytes | None = None) -> None: ...


@dataclass(slots=True)
class _PendingEvent:
    """The frames of one event received so far, in the order they arrived."""

    event_id: str
    first_seen: float
    frames: list[Frame] = field(default_factory=list)
    messages: list[ReceivedMessage] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    encoded: bytes = b""
    size: int = 0
    published_at: float = 0.0
    settled: bool = False

    @property
    def complete(self) -> bool:
        return bool(self.frames) and len({f.index for f in self.frames}) == self.frames[0].count

    @property
    def session_id(self) -> str:
        return self.messages[0].session_id

    @property
    def sequence(self) -> int:
        return self.messages[0].sequence_number

    @property
    def queue_bytes(self) -> int:
        return sum(len(m.body) for m in self.messages)


@dataclass(slots=True)
class CycleResult:
    events_ingested: int = 0
    events_dead_lettered: int = 0
    events_abandoned: int = 0
    events_held: int = 0
    operations: int = 0


@dataclass(slots=True)
class WorkerTotals:
    """Running totals since start, for the health endpoint and logs."""

    operations: int = 0
    events_ingested: int = 0
    events_dead_lettered: int = 0
    events_abandoned: int = 0


@dataclass(slots=True)
class _Lease:
    message: ReceivedMessage
    tracked_at: float
    locked_until: float
    period: float


class LockRenewer:
    """Keeps the peek-locks of the messages in hand alive, as Service Bus's AutoLockRenewer.

    The worker untracks messages *before* settling them, so a renewal that finds a lock
    gone while its message is still tracked means the lock was really lost.

    It runs in its own thread so that locks stay alive while the worker blocks in an
    ingestion attempt or a retry backoff. A lock is renewed once half of its period has
    passed. A message held longer than ``max_renewal`` is left to expire: the worker is
    stuck, and another replica should get the message. When a renewal finds a lock lost,
    the whole session counts as lost (a session's locks live and die together), and the
    worker drops what it holds of it.
    """

    def __init__(
        self,
        receiver: OutboxReceiver,
        *,
        max_renewal: float = DEFAULT_MAX_LOCK_RENEWAL,
        on_lost: Callable[[int], None] = lambda count: None,
    ) -> None:
        self.receiver = receiver
        self.max_renewal = max_renewal
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._leases: dict[str, _Lease] = {}
        self._lost_sessions: set[str] = set()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stopped.clear()
            self._thread = threading.Thread(target=self._run, name="lock-renewer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def track(self, messages: Sequence[ReceivedMessage]) -> None:
        now = time.time()
        with self._lock:
            for message in messages:
                self._leases[message.lock_token] = _Lease(
                    message, now, message.locked_until, max(message.locked_until - now, 0.0)
                )
        self._wake.set()

    def untrack(self, messages: Sequence[ReceivedMessage]) -> None:
        with self._lock:
            for message in messages:
                self._leases.pop(message.lock_token, None)

    def clear(self) -> None:
        with self._lock:
            self._leases.clear()
            self._lost_sessions.clear()

    def keep_alive(self) -> None:
        """The worker is still at work on everything in hand (waiting for Kusto to come
        back): count ``max_renewal`` from now."""
        now = time.time()
        with self._lock:
            for lease in self._leases.values():
                lease.tracked_at = now
        self._wake.set()

    def take_lost_sessions(self) -> set[str]:
        with self._lock:
            lost, self._lost_sessions = self._lost_sessions, set()
        return lost

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._wake.clear()
            due, pause = self._due()
            if due:
                self._renew(due)
                continue
            self._wake.wait(pause)

    def _due(self) -> tuple[list[_Lease], float]:
        """Leases to renew now, and how long to sleep when there are none."""
        now = time.time()
        due: list[_Lease] = []
        pause = MAX_RENEW_INTERVAL
        with self._lock:
            for lease in self._leases.values():
                if now - lease.tracked_at > self.max_renewal:
                    continue
                renew_at = lease.locked_until - lease.period / 2
                if renew_at <= now:
                    due.append(lease)
                else:
                    pause = min(pause, renew_at - now)
        return due, max(pause, MIN_RENEW_INTERVAL)

    def _renew(self, due: list[_Lease]) -> None:
        while due:
            try:
                self._renew_group(due)
                return
            except LockLostError as exc:
                # The others were renewed too, but their new expiry is unknown: renew them
                # again, without the sessions that were lost.
                # A message settled meanwhile is no loss: settling untracks first.
                lost = set(exc.sequence_numbers)
                with self._lock:
                    tracked = [x for x in due if x.message.lock_token in self._leases]
                sessions = {
                    lease.message.session_id
                    for lease in tracked
                    if not lost or lease.message.sequence_number in lost
                }
                for session_id in sessions:
                    self._lose_session(session_id)
                due = [lease for lease in due if lease.message.session_id not in sessions]
            except OutboxError as exc:
                logger.warning("lock renewal failed; retrying", extra={"error": str(exc)})
                self._stopped.wait(MIN_RENEW_INTERVAL * 10)
                return

    def _renew_group(self, leases: list[_Lease]) -> None:
        until = self.receiver.renew_locks([lease.message for lease in leases])
        now = time.time()
        with self._lock:
            for lease, locked_until in zip(leases, until, strict=True):
                if lease.message.lock_token in self._leases:
                    lease.locked_until = locked_until
                    lease.period = max(locked_until - now, 0.0)

    def _lose_session(self, session_id: str) -> None:
        with self._lock:
            lost = [t for t, x in self._leases.items() if x.message.session_id == session_id]
            for token in lost:
                del self._leases[token]
            self._lost_sessions.add(session_id)
        self._on_lost(len(lost))
        logger.warning(
            "session lock lost; its messages will be redelivered", extra={"messages": len(lost)}
        )


class Worker:
    """Moves events from the outbox queue into Kusto; run one per process, N processes.

    Batches close at ``max_batch_events`` events, ``max_batch_bytes`` bytes of rows, or
    ``max_batch_delay`` seconds after their first message (earlier when the queue goes
    quiet). ``max_batch_messages`` caps one receive call; ``max_wait`` is how long an idle
    receive waits. ``run`` stops on its event; the batch in hand is finished, or given back
    once ``shutdown_timeout`` seconds have passed.
    """

    def __init__(
        self,
        receiver: OutboxReceiver,
        ingestor: Ingestor,
        *,
        max_batch_events: int = DEFAULT_MAX_BATCH_EVENTS,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_batch_delay: float = DEFAULT_MAX_BATCH_DELAY,
        max_batch_messages: int = DEFAULT_MAX_BATCH_MESSAGES,
        max_wait: float = DEFAULT_MAX_WAIT,
        retry: RetryPolicy | None = None,
        chunk_group_timeout: float = DEFAULT_CHUNK_GROUP_TIMEOUT,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        max_lock_renewal: float = DEFAULT_MAX_LOCK_RENEWAL,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        for name, value in (
            ("max_batch_events", max_batch_events),
            ("max_batch_bytes", max_batch_bytes),
            ("max_batch_messages", max_batch_messages),
            ("max_batch_delay", max_batch_delay),
            ("chunk_group_timeout", chunk_group_timeout),
            ("shutdown_timeout", shutdown_timeout),
            ("max_lock_renewal", max_lock_renewal),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if max_wait < 0:
            raise ValueError(f"max_wait must not be negative, got {max_wait}")
        self.receiver = receiver
        self.ingestor = ingestor
        self.max_batch_events = max_batch_events
        self.max_batch_bytes = max_batch_bytes
        self.max_batch_delay = max_batch_delay
        self.max_batch_messages = max_batch_messages
        self.max_wait = max_wait
        self.retry = retry or RetryPolicy()
        self.chunk_group_timeout = chunk_group_timeout
        self.shutdown_timeout = shutdown_timeout
        self.max_lock_renewal = max_lock_renewal
        self.metrics = metrics or WorkerMetrics()
        self.totals = WorkerTotals()
        self._held: dict[str, _PendingEvent] = {}
        self._waiting_since: float | None = None
        """Since when the batch in hand waits for Kusto to come back (monotonic)."""
        self._events_waiting = 0
        self._notes: dict[str, dict[str, Any]] = {}
        """This cycle's dead-letter notes (event id -> row), ingested once it is settled."""
        self._renewer = LockRenewer(
            receiver, max_renewal=max_lock_renewal, on_lost=self.metrics.locks_lost
        )
        self._stop = threading.Event()
        self._stop_requested_at: float | None = None
        self._state = "starting"
        self._last_beat = time.monotonic()

    # -- lifecycle ----------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Cycle until ``stop`` is set (or ``request_stop``); then finish or give back the
        batch in hand within ``shutdown_timeout`` and release what is held."""
        if stop is not None:
            self._stop = stop
        self._renewer.start()
        self._state = "running"
        logger.info(
            "worker started",
            extra={
                "max_batch_events": self.max_batch_events,
                "max_batch_bytes": self.max_batch_bytes,
                "max_batch_delay": self.max_batch_delay,
            },
        )
        try:
            while not self._stop.is_set():
                try:
                    self.run_once()
                except OutboxError as exc:
                    # The queue failed us (busy or unreachable). Locks of what we hold lapse
                    # and the queue redelivers it; start over with empty hands.
                    logger.error("queue operation failed", extra={"error": str(exc)})
                    self._let_go()
                    self._stop.wait(QUEUE_ERROR_PAUSE)
        finally:
            self._state = "stopping"
            try:
                self.release_held()
            except OutboxError as exc:
                logger.error("could not release held messages", extra={"error": str(exc)})
            self._renewer.stop()
            self._state = "stopped"
            logger.info(
                "worker stopped",
                extra={
                    "events_ingested": self.totals.events_ingested,
                    "events_dead_lettered": self.totals.events_dead_lettered,
                    "events_abandoned": self.totals.events_abandoned,
                },
            )

    def request_stop(self) -> None:
        """Stop receiving; the shutdown deadline counts from now. Safe in a signal handler."""
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def health(self) -> dict[str, Any]:
        """For the health endpoint: ``healthy`` while running and making progress."""
        since = time.monotonic() - self._last_beat
        status = self._state
        if status == "running" and since > self.max_lock_renewal:
            status = "stalled"
        waiting = 0.0 if self._waiting_since is None else time.monotonic() - self._waiting_since
        return {
            "status": status,
            # Waiting for Kusto is healthy: a restart would give the batch back and spend
            # a delivery of each of its events, and the next worker would wait the same.
            "healthy": status == "running",
            "seconds_since_progress": round(since, 3),
            "seconds_waiting_for_kusto": round(waiting, 3),
            "events_held": len(self._held) + self._events_waiting,
            "operations": self.totals.operations,
            "events_ingested": self.totals.events_ingested,
            "events_dead_lettered": self.totals.events_dead_lettered,
            "events_abandoned": self.totals.events_abandoned,
        }

    def _beat(self) -> None:
        self._last_beat = time.monotonic()

    def _deadline(self) -> float | None:
        """Monotonic time by which the batch in hand must be settled; None while running."""
        if not self._stop.is_set():
            return None
        if self._stop_requested_at is None:  # stopped through the event, not request_stop
            self._stop_requested_at = time.monotonic()
        margin = min(1.0, self.shutdown_timeout / 5)  # time left to give the batch back
        return self._stop_requested_at + self.shutdown_timeout - margin

    # -- one cycle ------------------------------------------------------------

    def run_once(self) -> CycleResult:
        """Receive a batch, then ingest what is complete, in order, and settle it."""
        result = CycleResult()
        self._beat()
        self._collect(result)
        ready = self._ready_events(result)
        operations = self._operations(ready)
        for index, operation in enumerate(operations):
            gave_up = self._ingest_isolating(operation, result)
            while gave_up is not None and self._kusto_unavailable(gave_up):
                in_hand = operations[index:]
                if self._waiting_since is None:
                    self._waiting_since = time.monotonic()
                self._events_waiting = sum(1 for op in in_hand for p in op if not p.settled)
                self._renewer.keep_alive()
                self._drop_lost_sessions(in_hand)
                remaining = [p for p in operation if not p.settled]
                gave_up = self._ingest_isolating(remaining, result) if remaining else None
            self._waiting_since, self._events_waiting = None, 0
            if gave_up is not None:
                # Later events of the same threads must not overtake the ones given back.
                unsettled = [p for op in operations[index:] for p in op if not p.settled]
                cause = "shutdown" if gave_up.why == "shutdown deadline" else "retry_exhausted"
                self._abandon(unsettled, cause, result)
                break
        self._write_notes()
        result.events_held = len(self._held)
        return result

    def _kusto_unavailable(self, gave_up: RetryGaveUp) -> bool:
        """Whether to keep the batch for another round of retries rather than give it back."""
        return not self._stop.is_set() and gave_up.failure.cause in KUSTO_UNAVAILABLE_CAUSES

    def _collect(self, result: CycleResult) -> None:
        """Receive until the batch is full, ``max_batch_delay`` has passed since its first
        message, or the queue goes quiet; stop receiving at once when asked to stop."""
        wanted = min(self.max_batch_messages, self.max_batch_events)
        messages = self.receiver.receive(wanted, self.max_wait)
        if not messages:
            return
        started = time.monotonic()
        events, size = self._accept(messages, result)
        while not self._stop.is_set() and events < self.max_batch_events:
            remaining = self.max_batch_delay - (time.monotonic() - started)
            if remaining <= 0 or size >= self.max_batch_bytes:
                return
            wait = min(BATCH_IDLE_GAP, remaining)
            if len(messages) < wanted:  # drained: let the next receive take more at once
                pause = min(COLLECT_PAUSE, wait)
                if self._stop.wait(pause):
                    return
                wait -= pause
            wanted = min(self.max_batch_messages, self.max_batch_events - events)
            messages = self.receiver.receive(wanted, wait)
            if not messages:
                return
            more_events, more_size = self._accept(messages, result)
            events += more_events
            size += more_size

    def _accept(self, messages: Sequence[ReceivedMessage], result: CycleResult) -> tuple[int, int]:
        """File received messages under their event; returns (new events, message bytes)."""
        new_events = 0
        size = 0
        kept: list[ReceivedMessage] = []
        for message in messages:
            size += len(message.body)
            try:
                frame = decode_frame(message.body)
            except EnvelopeError as exc:
                new_events += 1
                self._dead_letter([message], exc.reason, str(exc), result)
                continue
            pending = self._held.get(frame.event_id)
            if pending is None:
                pending = _PendingEvent(frame.event_id, time.monotonic())
                self._held[frame.event_id] = pending
                new_events += 1
            pending.frames.append(frame)
            pending.messages.append(message)
            kept.append(message)
        self._renewer.track(kept)
        self.metrics.received(new_events)
        return new_events, size

    def _ready_events(self, result: CycleResult) -> list[_PendingEvent]:
        """Complete events in session order; a session stops at its first incomplete event,
        so a later checkpoint is never ingested before the blobs it may reference."""
        self._drop_lost_sessions()
        blocked_sessions: set[str] = set()
        ready: list[_PendingEvent] = []
        for pending in sorted(self._held.values(), key=lambda p: p.sequence):
            session = pending.session_id
            if session in blocked_sessions:
                continue
            if not pending.complete:
                waited = time.monotonic() - pending.first_seen
                if waited > self.chunk_group_timeout:
                    del self._held[pending.event_id]
                    parts = len({f.index for f in pending.frames})
                    error = IncompleteEventError(
                        f"event {pending.event_id}: {parts} of {pending.frames[0].count} parts "
                        f"arrived within {self.chunk_group_timeout:g}s"
                    )
                    self._dead_letter(
                        pending.messages, error.reason, str(error), result, pending.event_id
                    )
                    continue
                blocked_sessions.add(session)
                continue
            del self._held[pending.event_id]
            if self._prepare(pending, result):
                ready.append(pending)
        return ready

    def _prepare(self, pending: _PendingEvent, result: CycleResult) -> bool:
        """Decode the envelope and build the rows; dead-letter the event if either fails."""
        try:
            event = decode_event(join_frames(pending.frames))
        except EnvelopeError as exc:
            self._dead_letter(pending.messages, exc.reason, str(exc), result, pending.event_id)
            return False
        try:
            pending.rows = event_rows(event)
            # Encoding here finds an event whose rows cannot become JSON (it would fail
            # every batch it joins), gives the exact size for max_batch_bytes, and is the
            # body the batch is ingested with: each event is encoded once.
            pending.encoded = encode_rows(pending.rows)
            pending.size = len(pending.encoded) + 1
        except (TypeError, ValueError, OverflowError, OSError) as exc:
            error = EnvelopeError(f"the event's rows cannot be built: {type(exc).__name__}: {exc}")
            self._dead_letter(pending.messages, error.reason, str(error), result, pending.event_id)
            return False
        pending.published_at = event.published_at
        return True

    def _operations(self, ready: list[_PendingEvent]) -> list[list[_PendingEvent]]:
        """Cut the ready events, in order, into ingestion operations within the limits."""
        operations: list[list[_PendingEvent]] = []
        current: list[_PendingEvent] = []
        size = 0
        for pending in ready:
            if current and (
                len(current) >= self.max_batch_events or size + pending.size > self.max_batch_bytes
            ):
                operations.append(current)
                current, size = [], 0
            current.append(pending)
            size += pending.size
        if current:
            operations.append(current)
        return operations

    # -- ingestion -------------------------------------------------------------

    def _ingest_isolating(
        self, operation: list[_PendingEvent], result: CycleResult
    ) -> RetryGaveUp | None:
        """Ingest and complete ``operation``. A permanent rejection splits it in halves,
        ingested in order, until the refused events stand alone and are dead-lettered.
        Returns the give-up when transient failures outlasted the retries."""
        try:
            attempts = self._ingest(operation)
        except PermanentIngestError as exc:
            if len(operation) == 1:
                self._dead_letter_rejected(operation[0], exc.failure, result)
                return None
            logger.warning(
                "batch rejected; splitting it to find the events Kusto refuses",
                extra={"events": len(operation), "error": exc.failure.summary()},
            )
            middle = len(operation) // 2
            return self._ingest_isolating(operation[:middle], result) or self._ingest_isolating(
                operation[middle:], result
            )
        except RetryGaveUp as exc:
            logger.error(
                "ingestion failed; retrying with the batch in hand"
                if self._kusto_unavailable(exc)
                else "ingestion failed; giving the batch back to the queue",
                extra={
                    "events": len(operation),
                    "attempts": exc.attempts,
                    "why": exc.why,
                    **exc.failure.log_fields(),
                },
            )
            return exc
        self._complete(operation, attempts, result)
        return None

    def _ingest(self, operation: list[_PendingEvent]) -> int:
        rows = [row for pending in operation for row in pending.rows]
        encoded = b"\n".join(pending.encoded for pending in operation if pending.encoded)

        def attempt() -> None:
            started = time.monotonic()
            try:
                run_with_timeout(
                    lambda: self.ingestor.ingest(rows, encoded),
                    self.retry.attempt_timeout,
                    self._deadline,
                )
            except Exception as exc:
                self.metrics.attempt(time.monotonic() - started, classify(exc).kind.value)
                raise
            self.metrics.attempt(time.monotonic() - started, "success")

        def on_retry(failure: IngestFailure, attempt_number: int, wait: float) -> None:
            self._beat()
            self.metrics.retry(failure.cause.value)
            log = logger.error if failure.cause is Cause.CONFIGURATION else logger.warning
            log(
                "ingestion attempt failed; retrying",
                extra={
                    **failure.log_fields(),
                    "attempt": attempt_number,
                    "wait_s": round(wait, 3),
                    "events": len(operation),
                },
            )

        return call_with_retry(
            attempt,
            self.retry,
            deadline=self._deadline,
            stop_requested=self._stop,
            on_retry=on_retry,
        )

    # -- settlement --------------------------------------------------------------

    def _complete(self, operation: list[_PendingEvent], attempts: int, result: CycleResult) -> None:
        messages = [m for pending in operation for m in pending.messages]
        self._renewer.untrack(messages)
        try:
            self.receiver.complete(messages)
        except LockLostError:
            # The rows are in Kusto; the queue redelivers the lost messages and readers
            # drop the second copy by RowId.
            logger.warning(
                "locks lost before completion; those events will be ingested again",
                extra={"events": len(operation)},
            )
        for pending in operation:
            pending.settled = True
        result.events_ingested += len(operation)
        result.operations += 1
        self.totals.operations += 1
        self.totals.events_ingested += len(operation)
        queue_bytes = sum(p.queue_bytes for p in operation)
        self.metrics.ingested([p.published_at for p in operation], queue_bytes)
        self._beat()
        logger.info(
            "batch ingested",
            extra={
                "events": len(operation),
                "rows": sum(len(p.rows) for p in operation),
                "bytes": sum(p.size for p in operation),
                "attempts": attempts,
                "held": len(self._held),
            },
        )

    def _dead_letter_rejected(
        self, pending: _PendingEvent, failure: IngestFailure, result: CycleResult
    ) -> None:
        reason = _REASON_BY_CAUSE.get(failure.cause, INGESTION_REJECTED)
        description = (
            f"Kusto permanently rejected this event's rows ({failure.summary()}): "
            f"{failure.detail or 'no detail given'}. The other events of its batch were "
            f"ingested. {_HINT_BY_CAUSE.get(failure.cause, _HINT_BY_CAUSE[Cause.REJECTED])}"
        )
        self._dead_letter(pending.messages, reason, description, result, pending.event_id)
        pending.settled = True

    def _dead_letter(
        self,
        messages: Sequence[ReceivedMessage],
        reason: str,
        description: str,
        result: CycleResult,
        event_id: str | None = None,
    ) -> None:
        """Dead-letter one event's messages (or one undecodable message)."""
        self._renewer.untrack(messages)
        dead_lettered = False
        for message in messages:
            with contextlib.suppress(LockLostError):  # redelivered, and judged again then
                self.receiver.dead_letter(message, reason, description)
                dead_lettered = True
        event_id = event_id or event_id_of(messages[0].message_id)
        if dead_lettered and event_id is not None:
            self._notes[event_id] = dead_letter_row(event_id, messages[0].session_id, reason)
        result.events_dead_lettered += 1
        self.totals.events_dead_lettered += 1
        self.metrics.dead_lettered(reason)
        logger.warning(
            "dead-lettered",
            extra={
                "reason": reason,
                "messages": len(messages),
                "message_id": messages[0].message_id,
            },
        )

    def _write_notes(self) -> None:
        """Tell Kusto which events this cycle dead-lettered, so the saver that published one
        stops waiting for it and says why. One attempt: the dead letters themselves are
        what keeps the events; without a note, that saver's reads wait ``strong_timeout``."""
        if not self._notes:
            return
        rows = list(self._notes.values())
        self._notes.clear()
        try:
            run_with_timeout(lambda: self.ingestor.ingest(rows), NOTE_TIMEOUT, self._deadline)
        except Exception as exc:
            logger.warning(
                "dead-letter notes not ingested",
                extra={"notes": len(rows), "error": type(exc).__name__},
            )

    def _abandon(self, events: list[_PendingEvent], cause: str, result: CycleResult) -> None:
        messages = [m for pending in events for m in pending.messages]
        if not messages:
            return
        self._renewer.untrack(messages)
        with contextlib.suppress(LockLostError):  # those are redelivered anyway
            self.receiver.abandon(messages)
        for pending in events:
            pending.settled = True
        result.events_abandoned += len(events)
        self.totals.events_abandoned += len(events)
        self.metrics.abandoned(cause, len(events))
        logger.warning(
            "events given back to the queue", extra={"events": len(events), "cause": cause}
        )

    def _drop_lost_sessions(self, in_hand: Sequence[list[_PendingEvent]] = ()) -> None:
        """Let go of sessions whose locks were lost, in what is held and in the operations
        ``in_hand``: another consumer may own them now, and ingesting what we still hold of
        them could overtake its work."""
        lost = self._renewer.take_lost_sessions()
        if not lost:
            return
        dropped = [p for p in self._held.values() if p.session_id in lost]
        for pending in dropped:
            del self._held[pending.event_id]
        dropped += [p for op in in_hand for p in op if not p.settled and p.session_id in lost]
        self._abandon(dropped, "lock_lost", CycleResult())

    def release_held(self) -> None:
        """Give incomplete events back to the queue (shutdown)."""
        held = list(self._held.values())
        self._held.clear()
        self._abandon(held, "shutdown", CycleResult())

    def _let_go(self) -> None:
        """Drop everything in hand without settling it; the locks lapse and the queue
        redelivers it (renewing them would only delay that)."""
        self._held.clear()
        self._renewer.clear()
