"""The outbox queue: one contract, several backends.

The saver publishes events here; the ingestor worker receives them with peek-lock.
Backends follow Azure Service Bus semantics (peek-lock with expiry, delivery count,
max delivery -> dead letter, sessions with FIFO per session id, duplicate detection by
message id) so that local mode and Azure differ only by the queue URL:

- ``sqlite:///<path>[?queue=<name>]``: the embedded queue (``outbox.sqlite``);
- ``sb://<namespace>.servicebus.windows.net/<queue>``: Azure Service Bus with
  ``DefaultAzureCredential`` (``outbox.servicebus``);
- ``Endpoint=sb://<namespace>.servicebus.windows.net/;SharedAccessKeyName=...;
  SharedAccessKey=...;EntityPath=<queue>``: Azure Service Bus with a connection string.

Rules every backend keeps (``tests/test_queue_contract.py`` holds them to it):

- ``delivery_count`` is **0 on the first delivery** and grows by one per redelivery (after
  abandon or an expired lock), as ``azure.servicebus.ServiceBusReceivedMessage`` reports it.
  A message is delivered at most ``max_delivery_count`` times; then it is dead-lettered
  with reason ``MaxDeliveryCountExceeded``.
- Message and session ids longer than Service Bus allows (128 characters) are replaced by
  ``queue_id(value)``, a stable hash form: a long thread id keeps one session (FIFO holds)
  and a long message id keeps its duplicate detection. ``ReceivedMessage`` reports the
  queue's form.
- A session is held by one consumer at a time; messages of a session come in send order.
- A dead letter re-sent by ``resend_dead_letter`` carries ``replay_message_id(...)`` as its
  id: Service Bus would drop a copy with the original id as a duplicate within the window.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

MAX_DELIVERY_COUNT_EXCEEDED = "MaxDeliveryCountExceeded"
"""The dead-letter reason Service Bus uses when delivery count passes the maximum."""

MAX_ID_LENGTH = 128
"""Service Bus rejects message and session ids longer than this."""

HASHED_ID_PREFIX = "sha256:"


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A message to publish. ``message_id`` drives duplicate detection."""

    body: bytes
    message_id: str
    session_id: str
    application_properties: dict[str, str | int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """A message held under a peek-lock until completed, abandoned or dead-lettered.

    ``delivery_count`` is 0 on the first delivery (the number of earlier deliveries).
    ``enqueued_time`` and ``locked_until`` are Unix epoch seconds; ``lock_token`` is unique
    per delivery and settles exactly that delivery.
    """

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
    """A message in the dead-letter sub-queue, with why it is there.

    ``delivery_count`` is the number of deliveries the message had before it was
    dead-lettered (e.g. ``max_delivery_count`` for ``MaxDeliveryCountExceeded``).
    ``sequence_number`` addresses it for ``resend_dead_letter`` / ``delete_dead_letter``.
    """

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
    """The peek-lock expired or the message was settled already; it will be redelivered.

    ``sequence_numbers`` names the messages whose lock was lost; the others of the same
    call were settled (or renewed) as asked.
    """

    def __init__(self, message: str, sequence_numbers: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.sequence_numbers = tuple(sequence_numbers)


class MessageTooLargeError(OutboxError, ValueError):
    """A message does not fit the queue's maximum message size (like the SDK's
    ``MessageSizeExceededError``, it is a ``ValueError`` too: retrying cannot help)."""


@runtime_checkable
class OutboxSender(Protocol):
    """What the saver needs: publish a group of messages, in order."""

    def send(self, messages: Sequence[OutboxMessage]) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class AsyncOutboxSender(Protocol):
    """The ``asyncio`` twin of ``OutboxSender``."""

    def send(self, messages: Sequence[OutboxMessage]) -> Awaitable[None]:
        """Start sending; the awaitable ends once the queue has the messages."""
        ...

    async def close(self) -> None: ...


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


@runtime_checkable
class DeadLetterLookup(Protocol):
    """A store that finds one dead letter by sequence number, without listing the ones
    before it (``dlq show`` uses it when there are more than one listing can hold)."""

    def find_dead_letter(self, sequence_number: int) -> DeadLetter | None: ...


@runtime_checkable
class OutboxQueue(OutboxSender, OutboxReceiver, DeadLetterStore, Protocol):
    """A whole queue backend, as ``open_queue`` returns it."""


def queue_id(value: str) -> str:
    """``value`` as a queue message or session id: itself if Service Bus accepts its length,
    else ``sha256:<hex>`` of it (71 characters), stable across processes and backends."""
    if not value:
        raise ValueError("message and session ids must not be empty")
    if len(value) <= MAX_ID_LENGTH:
        return value
    return HASHED_ID_PREFIX + hashlib.sha256(value.encode()).hexdigest()


def replay_message_id(message_id: str, sequence_number: int) -> str:
    """The id a re-sent dead letter carries: new, so duplicate detection keeps it, and
    derived from the dead letter, so retrying the same replay is still dropped."""
    return queue_id(f"{message_id}/replay-{sequence_number}")


def is_service_bus_url(url: str) -> bool:
    """An ``sb://`` URL or a Service Bus connection string (it starts ``Endpoint=``)."""
    text = url.strip().lower()
    return text.startswith("sb://") or text.startswith("endpoint=")


def redact_queue_url(url: str) -> str:
    """``url`` safe to log or print: shared access keys and signatures replaced by ``***``."""
    parts = []
    for part in url.split(";"):
        key, _, value = part.partition("=")
        secret = key.strip().lower() in ("sharedaccesskey", "sharedaccesssignature")
        parts.append(f"{key}=***" if secret and value else part)
    return ";".join(parts)


def open_queue(url: str) -> OutboxQueue:
    """The queue backend for ``url`` (see the module docstring for the URL forms)."""
    if url.startswith("sqlite:"):
        from .sqlite import SqliteQueue

        return SqliteQueue.from_url(url)
    if is_service_bus_url(url):
        from .servicebus import ServiceBusQueue

        return ServiceBusQueue.from_url(url)
    raise ValueError(_unsupported(url))


def _unsupported(url: str) -> str:
    return (
        f"queue URL {redact_queue_url(url)!r} is not supported; expected sqlite:///<path> for "
        "the local queue, sb://<namespace>.servicebus.windows.net/<queue> (Microsoft Entra "
        "ID via DefaultAzureCredential), or a Service Bus connection string with "
        ";EntityPath=<queue>"
    )


def open_sender(url: str) -> OutboxSender:
    """A sender for ``url`` (a saver's connection: it sends and never receives)."""
    return open_queue(url)


def open_async_sender(url: str) -> AsyncOutboxSender:
    """An ``asyncio`` sender for ``url``: the SDK's ``aio`` client for Service Bus; for the
    SQLite queue, ``AsyncSqliteSender``."""
    if url.startswith("sqlite:"):
        from .sqlite import AsyncSqliteSender, SqliteQueue

        return AsyncSqliteSender(SqliteQueue.from_url(url))
    if is_service_bus_url(url):
        from .servicebus import AsyncServiceBusSender

        return AsyncServiceBusSender.from_url(url)
    raise ValueError(_unsupported(url))
