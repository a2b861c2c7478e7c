"""The outbox queue: one contract, several backends.

The saver publishes events here; the ingestor worker receives them with peek-lock.
Backends follow Azure Service Bus semantics (peek-lock with expiry, delivery count,
max delivery -> dead letter, sessions with FIFO per session id, duplicate detection by
message id) so that local mode and Azure differ only by the queue URL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

MAX_DELIVERY_COUNT_EXCEEDED = "MaxDeliveryCountExceeded"
"""The dead-letter reason Service Bus uses when delivery count passes the maximum."""


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A message to publish. ``message_id`` drives duplicate detection."""

    body: bytes
    message_id: str
    session_id: str
    application_properties: dict[str, str | int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """A message held under a peek-lock until completed, abandoned or dead-lettered."""

    body: bytes
    message_id: str
    session_id: str
    sequence_number: int
    delivery_count: int
    enqueued_time: float
    lock_token: str
    locked_until: float
    application_properties: dict[str, str | int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message in the dead-letter sub-queue, with why it is there."""

    body: bytes
    message_id: str
    session_id: str
    sequence_number: int
    delivery_count: int
    enqueued_time: float
    dead_lettered_time: float
    reason: str
    description: str
    application_properties: dict[str, str | int] = field(default_factory=dict)


class OutboxError(Exception):
    """A queue operation failed; the message says what to do."""


class LockLostError(OutboxError):
    """The peek-lock expired or the message was settled already; it will be redelivered."""


@runtime_checkable
class OutboxSender(Protocol):
    """What the saver needs: publish a group of messages atomically."""

    def send(self, messages: Sequence[OutboxMessage]) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class OutboxReceiver(Protocol):
    """What the worker needs: peek-lock receive and settlement."""

    def receive(self, max_messages: int, max_wait: float) -> list[ReceivedMessage]: ...

    def complete(self, messages: Sequence[ReceivedMessage]) -> None: ...

    def abandon(self, messages: Sequence[ReceivedMessage]) -> None: ...

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None: ...

    def renew_locks(self, messages: Sequence[ReceivedMessage]) -> list[float]: ...

    def close(self) -> None: ...


@runtime_checkable
class DeadLetterStore(Protocol):
    """What operators need: inspect and replay the dead-letter sub-queue."""

    def list_dead_letters(self, limit: int = 100) -> list[DeadLetter]: ...

    def resend_dead_letter(self, sequence_number: int) -> None: ...

    def delete_dead_letter(self, sequence_number: int) -> None: ...


def open_queue(url: str) -> Any:
    """The queue backend for ``url``: ``sqlite:///<path>`` locally."""
    if url.startswith("sqlite:"):
        from .sqlite import SqliteQueue

        return SqliteQueue.from_url(url)
    raise ValueError(
        f"queue URL {url!r} is not supported; expected sqlite:///<path> for the local queue"
    )
