"""Azure Service Bus as the outbox queue, on ``azure-servicebus`` (sync, and ``aio`` for sends).

``ServiceBusQueue`` implements ``OutboxSender``, ``OutboxReceiver`` and ``DeadLetterStore``,
so the saver and the worker use it exactly as they use the SQLite queue;
``AsyncServiceBusSender`` is the ``asyncio`` publisher.

The queue must have **sessions enabled** (a thread's events are one session: FIFO per thread,
one worker per thread at a time) and should have **duplicate detection** on (message ids
are deterministic, so a saver retrying a publish never enqueues twice); see
``docs/servicebus.md`` for the settings the contract suite expects.

URL forms (``open_queue`` accepts both):

- ``sb://<namespace>.servicebus.windows.net/<queue>``: Microsoft Entra ID through
  ``DefaultAzureCredential`` (roles *Azure Service Bus Data Sender* for the saver,
  *Data Receiver* for the worker, both for the dead-letter replay tool). A bare
  ``sb://<namespace>/<queue>`` means ``<namespace>.servicebus.windows.net``.
- ``Endpoint=sb://<namespace>.servicebus.windows.net/;SharedAccessKeyName=<rule>;
  SharedAccessKey=<key>;EntityPath=<queue>``: a connection string as the portal shows it for
  a queue's shared access policy (for a namespace policy, append ``;EntityPath=<queue>``).
  ``SharedAccessSignature=`` and ``UseDevelopmentEmulator=true`` work as in the SDK.

Sending: each ``OutboxMessage`` becomes a ``ServiceBusMessage`` with its ``message_id`` and
``session_id`` (both through ``queue_id``, so ids over 128 characters become a stable hash
form instead of an error). Messages are packed in order into ``ServiceBusMessageBatch``es
sized by the link (256 KB on Standard, 1 MB on Premium), one session per batch (a
partitioned entity takes one partition key per batch). A message too big for a batch but
within the entity's maximum (Premium allows up to 100 MB) is sent on its own; a bigger one
raises ``MessageTooLargeError`` naming ``max_message_bytes``, the body size the saver's
chunking must stay under. A send of several batches is not atomic; the saver retries the
whole call and duplicate detection drops what was already accepted.

Receiving: peek-lock from sessions. A consumer holds up to ``max_sessions`` sessions, each
through a session receiver accepted with ``NEXT_AVAILABLE_SESSION`` (no prefetch: a message
abandoned at a session's head must come back before the ones behind it); an
``AutoLockRenewer`` keeps their locks while a batch is ingested or retried, for at most
``lock_renewal`` seconds, and ``renew_locks`` renews them on demand. A session is given back
when it has nothing to deliver and nothing unsettled, and, once nothing of it is unsettled,
after ``max_session_hold`` seconds (at most ``lock_renewal / 2``) even when busy, so a
renewal never runs out under it and a consumer facing many busy sessions serves them in
turn. Settlement goes through the receiver that received the message; a lost session lock
surfaces as ``LockLostError``. A session's unsettled messages go back uncounted when it is
given back (``close`` included); an expired lock counts a delivery, as in Service Bus.

Dead letters: read by peeking ``<queue>/$DeadLetterQueue``; ``resend_dead_letter`` and
``delete_dead_letter`` lock the dead-letter messages in order until they find the one
asked for (Service Bus cannot receive a message by sequence number unless it was
deferred), settle it, and abandon the others.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

from azure.servicebus import (
    NEXT_AVAILABLE_SESSION,
    AutoLockRenewer,
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusMessageBatch,
    ServiceBusReceivedMessage,
    ServiceBusReceiver,
    ServiceBusSender,
    ServiceBusSession,
    ServiceBusSubQueue,
)
from azure.servicebus.aio import ServiceBusClient as AsyncServiceBusClient
from azure.servicebus.aio import ServiceBusSender as AsyncSdkSender
from azure.servicebus.exceptions import (
    MessageAlreadySettled,
    MessageSizeExceededError,
    MessagingEntityNotFoundError,
    OperationTimeoutError,
    ServiceBusAuthenticationError,
    ServiceBusAuthorizationError,
    ServiceBusError,
    SessionCannotBeLockedError,
)

from . import (
    DeadLetter,
    LockLostError,
    MessageTooLargeError,
    OutboxError,
    OutboxMessage,
    ReceivedMessage,
    queue_id,
    redact_queue_url,
    replay_message_id,
)
from .grouping import SendGroups, commit, in_background, nothing_to_send

__all__ = [
    "AsyncServiceBusSender",
    "ServiceBusQueue",
    "ServiceBusSettings",
    "SizeLimits",
    "arun_plan",
    "parse_queue_url",
    "plan_sends",
    "run_plan",
]

logger = logging.getLogger("langgraph.checkpoint.kusto.outbox.servicebus")

PUBLIC_CLOUD_SUFFIX = ".servicebus.windows.net"

DEFAULT_MAX_SESSIONS = 8
DEFAULT_LOCK_RENEWAL = 300.0
"""Seconds ``AutoLockRenewer`` keeps a session's lock (the SDK's own default)."""

DEFAULT_SESSION_POLL_WAIT = 0.2
"""How long a receive waits on a session it already holds before trying the next one."""

DEFAULT_MAX_SESSION_HOLD = 30.0
"""A session with nothing unsettled is given back after this long even when busy, so one
consumer facing many busy sessions serves them in turn."""

MIN_POLL_WAIT = 0.05
ACCEPT_MIN_WAIT = 0.5
"""A receive that holds sessions accepts another only if asked to wait this long."""

CONNECT_ALLOWANCE = 5.0
"""Client-side time a session accept may take beyond the caller's wait: the SDK counts
opening the connection (TLS, token, attach) against the receive's wait."""

ACCEPT_RETRY_INTERVAL = 5.0
"""After finding no session to accept, a consumer busy with the sessions it holds looks
for another one only this often (each look opens a connection)."""

MIN_ACCEPT_WAIT = 0.1
"""Server-side wait for a session when the caller asked not to wait (the SDK needs > 0)."""

HEADER_RESERVE_BYTES = 4096
"""Room left under the entity's maximum for what Service Bus counts besides the body:
AMQP header, ids up to 128 characters, application and broker properties."""

MAX_DEAD_LETTER_TEXT = 4096
"""Service Bus limits dead-letter reason and description (the .NET SDK checks 4096)."""

DEAD_LETTER_SCAN_BATCH = 100
DEAD_LETTER_SCAN_WAIT = 1.0
PEEK_BATCH = 250

DEAD_LETTER_PROPERTIES = frozenset({"DeadLetterReason", "DeadLetterErrorDescription"})

URL_FORMS = (
    "sb://<namespace>.servicebus.windows.net/<queue> (DefaultAzureCredential) or a "
    "connection string Endpoint=sb://<namespace>.servicebus.windows.net/;"
    "SharedAccessKeyName=<rule>;SharedAccessKey=<key>;EntityPath=<queue>"
)


# --- settings --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceBusSettings:
    """Where the queue is and how to authenticate; ``connection_string`` is never shown."""

    namespace: str
    queue: str
    connection_string: str | None = field(default=None, repr=False)

    def client(self, credential: Any = None, **options: Any) -> ServiceBusClient:
        if self.connection_string is not None:
            return ServiceBusClient.from_connection_string(self.connection_string, **options)
        return ServiceBusClient(self.namespace, credential, **options)

    def async_client(self, credential: Any = None, **options: Any) -> AsyncServiceBusClient:
        if self.connection_string is not None:
            return AsyncServiceBusClient.from_connection_string(self.connection_string, **options)
        return AsyncServiceBusClient(self.namespace, credential, **options)


def parse_queue_url(url: str) -> ServiceBusSettings:
    """Settings from an ``sb://`` URL or a connection string (see the module docstring)."""
    text = url.strip()
    if text.lower().startswith("endpoint="):
        return _parse_connection_string(text)
    parts = urlsplit(text)
    if parts.scheme.lower() != "sb" or not parts.hostname:
        raise ValueError(
            f"Not a Service Bus queue URL: {redact_queue_url(url)!r}. Expected {URL_FORMS}."
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(
            "A Service Bus queue URL takes no user, password, query or fragment; put a "
            f"secret in a connection string instead. Expected {URL_FORMS}."
        )
    queue = parts.path.strip("/")
    if not queue or "/" in queue:
        raise ValueError(f"Give exactly one queue name in {text!r}. Expected {URL_FORMS}.")
    host = parts.hostname if "." in parts.hostname else parts.hostname + PUBLIC_CLOUD_SUFFIX
    return ServiceBusSettings(host if parts.port is None else f"{host}:{parts.port}", queue)


def _parse_connection_string(text: str) -> ServiceBusSettings:
    fields: dict[str, str] = {}
    for part in text.rstrip(";").split(";"):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(
                "Malformed Service Bus connection string: every part must be key=value. "
                f"Expected {URL_FORMS}."
            )
        fields[key.strip().lower()] = value.strip()
    endpoint = urlsplit(fields.get("endpoint", ""))
    if not endpoint.netloc:
        raise ValueError(
            f"The connection string has no Endpoint=sb://<namespace>/. Expected {URL_FORMS}."
        )
    if "sharedaccesskey" in fields and "sharedaccesskeyname" not in fields:
        raise ValueError(
            "The connection string has a SharedAccessKey but no SharedAccessKeyName (the "
            "policy's name); copy the whole connection string from the portal."
        )
    if not ("sharedaccesskey" in fields or "sharedaccesssignature" in fields):
        raise ValueError(
            "The connection string has neither SharedAccessKey nor SharedAccessSignature. Copy "
            "it from the queue's (or namespace's) Shared access policies in the Azure portal, "
            "or use sb://<namespace>.servicebus.windows.net/<queue> for Microsoft Entra ID."
        )
    queue = fields.get("entitypath", "")
    if not queue:
        raise ValueError(
            "The connection string names no queue: append ;EntityPath=<queue> (a queue-level "
            "shared access policy's connection string already has it)."
        )
    return ServiceBusSettings(endpoint.netloc, queue, text)


# --- messages both ways (pure) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SizeLimits:
    """What the entity accepts: one message, and one ``ServiceBusMessageBatch``."""

    max_message_bytes: int
    max_batch_bytes: int

    @property
    def max_body_bytes(self) -> int:
        """The largest body a message may carry: the saver's chunk size budget."""
        return self.max_message_bytes - HEADER_RESERVE_BYTES


def to_service_bus_message(message: OutboxMessage) -> ServiceBusMessage:
    """The SDK message for ``message``: ids in their ``queue_id`` form, body as one data section."""
    if not message.message_id:
        raise ValueError("message_id must not be empty")
    if not message.session_id:
        raise ValueError("session_id must not be empty")
    properties: dict[str | bytes, Any] = {k: v for k, v in message.application_properties.items()}
    return ServiceBusMessage(
        bytes(message.body),
        message_id=queue_id(message.message_id),
        session_id=queue_id(message.session_id),
        application_properties=properties,
    )


Plan = list[ServiceBusMessageBatch | ServiceBusMessage]
PlanSteps = Generator[None, ServiceBusMessageBatch, Plan]
"""``plan_sends`` in progress: it yields when it needs an empty batch and is sent one."""


def plan_sends(messages: Sequence[ServiceBusMessage], limits: SizeLimits) -> PlanSteps:
    """Pack ``messages`` in order into batches of one session each; a message too large for
    a batch but within ``limits.max_message_bytes`` goes alone. Raises
    ``MessageTooLargeError`` before anything is sent if one fits neither.

    Sans-I/O: each empty batch comes from the caller's SDK sender (``run_plan`` /
    ``arun_plan`` with its ``create_message_batch``), so it matches that sender's AMQP
    transport. The SDK rebuilds a batch made for another transport when it is sent,
    encoding every message again (for the ``aio`` sender, ~90 of the ~460 µs CPU of a
    two-message send)."""
    plan: Plan = []
    batch = yield
    batch_session: str | None = None
    for message in messages:
        if len(batch) and message.session_id != batch_session:
            plan.append(batch)
            batch = yield
        if _try_add(batch, message):
            batch_session = message.session_id
            continue
        if len(batch):
            plan.append(batch)
            batch = yield
            if _try_add(batch, message):
                batch_session = message.session_id
                continue
        # Only measures: the message is sent on its own, never in this batch.
        if not _try_add(
            ServiceBusMessageBatch(max_size_in_bytes=limits.max_message_bytes), message
        ):
            raise MessageTooLargeError(
                f"Message {message.message_id!r} has a {len(_body(message))}-byte body; this "
                f"queue accepts at most {limits.max_message_bytes} bytes per message, headers "
                f"included. Chunk events to at most max_message_bytes={limits.max_body_bytes} "
                "(the saver's max_message_bytes option), or use a Premium namespace with a "
                "larger maximum message size."
            )
        plan.append(message)
    if len(batch):
        plan.append(batch)
    return plan


def run_plan(steps: PlanSteps, new_batch: Callable[[], ServiceBusMessageBatch]) -> Plan:
    """Drive ``plan_sends`` with batches from ``new_batch``."""
    try:
        next(steps)
        while True:
            steps.send(new_batch())
    except StopIteration as finished:
        plan: Plan = finished.value
        return plan


async def arun_plan(
    steps: PlanSteps, new_batch: Callable[[], Awaitable[ServiceBusMessageBatch]]
) -> Plan:
    """``run_plan`` for an ``aio`` sender."""
    try:
        next(steps)
        while True:
            steps.send(await new_batch())
    except StopIteration as finished:
        plan: Plan = finished.value
        return plan


def _try_add(batch: ServiceBusMessageBatch, message: ServiceBusMessage) -> bool:
    try:
        batch.add_message(message)
    except MessageSizeExceededError:
        return False
    return True


def _body(message: ServiceBusMessage | ServiceBusReceivedMessage) -> bytes:
    body = message.body
    if isinstance(body, bytes | bytearray):
        return bytes(body)
    return b"".join(bytes(part) for part in body)


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes | bytearray) else value


def _properties(message: ServiceBusReceivedMessage) -> dict[str, str | int]:
    """Application properties as sent: the SDK hands received keys and strings back as bytes."""
    raw = message.application_properties or {}
    properties = {str(_text(k)): _text(v) for k, v in raw.items()}
    return {k: v for k, v in properties.items() if k not in DEAD_LETTER_PROPERTIES}


def _epoch(moment: datetime | None) -> float:
    return moment.timestamp() if moment is not None else 0.0


def to_received_message(message: ServiceBusReceivedMessage, locked_until: float) -> ReceivedMessage:
    return ReceivedMessage(
        body=_body(message),
        message_id=str(message.message_id),
        session_id=str(message.session_id),
        sequence_number=int(message.sequence_number or 0),
        delivery_count=int(message.delivery_count or 0),
        enqueued_time=_epoch(message.enqueued_time_utc),
        lock_token=str(message.lock_token),
        locked_until=locked_until,
        application_properties=_properties(message),
    )


def to_dead_letter(message: ServiceBusReceivedMessage) -> DeadLetter:
    """A peeked dead-letter message. Service Bus keeps no dead-lettering time, so
    ``dead_lettered_time`` is the enqueued time the dead-letter sub-queue reports."""
    enqueued = _epoch(message.enqueued_time_utc)
    return DeadLetter(
        body=_body(message),
        message_id=str(message.message_id),
        session_id=str(message.session_id),
        sequence_number=int(message.sequence_number or 0),
        delivery_count=int(message.delivery_count or 0),
        enqueued_time=enqueued,
        dead_lettered_time=enqueued,
        reason=message.dead_letter_reason or "",
        description=message.dead_letter_error_description or "",
        application_properties=_properties(message),
    )


def _clip(text: str) -> str:
    if len(text) <= MAX_DEAD_LETTER_TEXT:
        return text
    return text[: MAX_DEAD_LETTER_TEXT - 3] + "..."


def _translate(error: ServiceBusError, doing: str, where: str) -> OutboxError:
    """An ``OutboxError`` that says what to do about a Service Bus failure."""
    if isinstance(error, MessageSizeExceededError):
        return MessageTooLargeError(
            f"Service Bus refused a message while {doing} ({where}) as too large: {error}. "
            "Lower the saver's max_message_bytes."
        )
    if isinstance(error, MessagingEntityNotFoundError):
        hint = (
            "Create the queue with sessions enabled (and duplicate detection on), or fix the "
            "queue name in the URL; see docs/servicebus.md."
        )
    elif isinstance(error, ServiceBusAuthenticationError | ServiceBusAuthorizationError):
        hint = (
            "Check the connection string's key, or grant the identity DefaultAzureCredential "
            "picks the role 'Azure Service Bus Data Sender' (saver) / 'Data Receiver' "
            "(worker) on the queue."
        )
    else:
        hint = "Check the namespace is reachable and the queue exists; the call may be retried."
    return OutboxError(f"Service Bus failed while {doing} ({where}): {error}. {hint}")


# --- the sync queue --------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _HeldSession:
    """A session this consumer holds, with the messages it has not settled yet."""

    receiver: ServiceBusReceiver
    session_id: str
    accepted_at: float
    unsettled: dict[str, ServiceBusReceivedMessage] = field(default_factory=dict)
    dropped: bool = False

    @property
    def locked_until(self) -> float:
        return _epoch(self.receiver.session.locked_until_utc)


class ServiceBusQueue:
    """A session-enabled Service Bus queue as outbox: sender, receiver and dead letters.

    The saver may send from several threads (sends are serialised); receive and settlement
    belong to one worker thread, with the lock renewer's threads alongside.
    """

    def __init__(
        self,
        settings: ServiceBusSettings,
        *,
        credential: Any | None = None,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        lock_renewal: float = DEFAULT_LOCK_RENEWAL,
        session_poll_wait: float = DEFAULT_SESSION_POLL_WAIT,
        max_session_hold: float = DEFAULT_MAX_SESSION_HOLD,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        if lock_renewal < 0:
            raise ValueError(f"lock_renewal must not be negative, got {lock_renewal}")
        if session_poll_wait <= 0:
            raise ValueError(f"session_poll_wait must be positive, got {session_poll_wait}")
        self.settings = settings
        self.queue = settings.queue
        self.max_sessions = max_sessions
        self.lock_renewal = lock_renewal
        self.session_poll_wait = session_poll_wait
        # A session must go back before its renewal runs out, busy or not.
        self.max_session_hold = min(max_session_hold, lock_renewal / 2) if lock_renewal else 0.0
        self._owned_credential = None
        if settings.connection_string is None and credential is None:
            from azure.identity import DefaultAzureCredential

            credential = self._owned_credential = DefaultAzureCredential()
        options = client_options or {}
        self._client = settings.client(credential, **options)
        # Receivers get no SDK retries: a retried session accept would wait for a session
        # again past the caller's max_wait, and a failed settlement or renewal means the
        # session lock is gone anyway (the message is redelivered; see LockLostError).
        self._receive_client = settings.client(credential, **{**options, "retry_total": 0})
        self._send_lock = threading.Lock()
        # _receive_lock orders the worker's receive and settlement calls; _state guards the
        # maps of held sessions, which the renewer reads from its own thread meanwhile.
        self._receive_lock = threading.Lock()
        self._state = threading.Lock()
        self._sender: ServiceBusSender | None = None
        self._limits: SizeLimits | None = None
        self._renewer = (
            AutoLockRenewer(
                max_lock_renewal_duration=lock_renewal,
                on_lock_renew_failure=self._on_renew_failure,
            )
            if lock_renewal > 0
            else None
        )
        self._closer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="servicebus-close")
        self._dead_letter_lock = threading.Lock()
        self._dead_letters: ServiceBusReceiver | None = None
        self._sessions: dict[str, _HeldSession] = {}
        self._by_token: dict[str, _HeldSession] = {}
        self._next_accept = 0.0

    @classmethod
    def from_url(cls, url: str, **options: Any) -> ServiceBusQueue:
        """The queue an ``sb://`` URL or connection string names; ``options`` as ``__init__``."""
        return cls(parse_queue_url(url), **options)

    @property
    def where(self) -> str:
        return f"queue {self.queue!r} in {self.settings.namespace}"

    # --- OutboxSender ------------------------------------------------------------------

    def send(self, messages: Sequence[OutboxMessage]) -> None:
        """Publish in order, in as few batches as the entity's limits allow.

        A message Service Bus saw within its duplicate-detection window is dropped by the
        service, so the whole call may be retried after a failure.
        """
        outgoing = [to_service_bus_message(m) for m in messages]
        if not outgoing:
            return
        with self._send_lock:
            try:
                sender = self._open_sender()
                steps = plan_sends(outgoing, self._size_limits(sender))
                for item in run_plan(steps, sender.create_message_batch):
                    sender.send_messages(item)
            except ServiceBusError as error:
                raise _translate(
                    error, f"sending {len(outgoing)} message(s)", self.where
                ) from error

    @property
    def max_message_bytes(self) -> int:
        """The largest body one message may carry on this queue (opens the sender link)."""
        with self._send_lock:
            try:
                return self._size_limits(self._open_sender()).max_body_bytes
            except ServiceBusError as error:
                raise _translate(error, "opening the sender", self.where) from error

    def size_limits(self) -> SizeLimits:
        """The entity's message and batch limits as its link advertises them."""
        with self._send_lock:
            try:
                return self._size_limits(self._open_sender())
            except ServiceBusError as error:
                raise _translate(error, "opening the sender", self.where) from error

    def _open_sender(self) -> ServiceBusSender:
        if self._sender is None:
            self._sender = self._client.get_queue_sender(self.queue)
        return self._sender

    def _size_limits(self, sender: ServiceBusSender) -> SizeLimits:
        if self._limits is None:
            self._limits = _limits_of(sender.create_message_batch(), sender)
        return self._limits

    # --- OutboxReceiver ----------------------------------------------------------------

    def receive(self, max_messages: int, max_wait: float) -> list[ReceivedMessage]:
        """Peek-lock up to ``max_messages``, waiting up to ``max_wait`` seconds for any.

        Polls the sessions this consumer holds, then accepts the next available session
        (opening its connection takes a few hundred milliseconds more than ``max_wait``):
        waiting for one when nothing came, or glancing for one more when messages came and
        the last glance found one (or was ``ACCEPT_RETRY_INTERVAL`` ago). A call that holds
        sessions and waits less than ``ACCEPT_MIN_WAIT`` only polls those, so a worker
        topping up a batch stays quick."""
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, got {max_messages}")
        if max_wait < 0:
            raise ValueError(f"max_wait must not be negative, got {max_wait}")
        deadline = time.monotonic() + max_wait
        with self._receive_lock:
            polling_only = bool(self._sessions) and max_wait < ACCEPT_MIN_WAIT
            received = self._receive_from_held(max_messages, deadline)
            while len(received) < max_messages and len(self._sessions) < self.max_sessions:
                now = time.monotonic()
                if polling_only or (received and now < self._next_accept):
                    break
                wait = self.session_poll_wait if received else deadline - now
                taken = self._accept_next_session(max_messages - len(received), wait)
                if taken is None:
                    self._next_accept = time.monotonic() + ACCEPT_RETRY_INTERVAL
                    break
                received += taken
                if received or time.monotonic() >= deadline:
                    break
            return received

    def _receive_from_held(self, max_messages: int, deadline: float) -> list[ReceivedMessage]:
        received: list[ReceivedMessage] = []
        with self._state:
            held_now = list(self._sessions.values())
        for held in held_now:
            if len(received) >= max_messages:
                break
            remaining = deadline - time.monotonic()
            try:
                batch = held.receiver.receive_messages(
                    max_message_count=max_messages - len(received),
                    max_wait_time=min(self.session_poll_wait, max(remaining, MIN_POLL_WAIT)),
                )
            except ServiceBusError as error:
                logger.warning(
                    "session lost while receiving; its unsettled messages will be redelivered",
                    extra={"queue": self.queue, "error": type(error).__name__},
                )
                self._drop_session(held)
                continue
            received += self._hold(held, batch)
            with self._state:
                idle = not held.unsettled
            held_long = time.monotonic() - held.accepted_at > self.max_session_hold
            if idle and (not batch or held_long):
                self._drop_session(held)
        return received

    def _accept_next_session(self, max_messages: int, wait: float) -> list[ReceivedMessage] | None:
        """Messages of a newly accepted session; ``None`` if no session was available."""
        receiver = self._receive_client.get_queue_receiver(
            self.queue,
            session_id=NEXT_AVAILABLE_SESSION,
            max_wait_time=max(wait, MIN_ACCEPT_WAIT),
            auto_lock_renewer=self._renewer,
        )
        try:
            batch = receiver.receive_messages(
                max_message_count=max_messages, max_wait_time=max(wait, 0) + CONNECT_ALLOWANCE
            )
        except (OperationTimeoutError, SessionCannotBeLockedError):
            self._closer.submit(_close_quietly, receiver)
            return None
        except ServiceBusError as error:
            self._closer.submit(_close_quietly, receiver)
            raise _translate(error, "accepting a session", self.where) from error
        held = _HeldSession(receiver, receiver.session.session_id, time.monotonic())
        if not batch:
            self._closer.submit(_close_quietly, receiver)
            return []
        with self._state:
            self._sessions[held.session_id] = held
        return self._hold(held, batch)

    def _hold(
        self, held: _HeldSession, batch: Iterable[ServiceBusReceivedMessage]
    ) -> list[ReceivedMessage]:
        received = []
        locked_until = held.locked_until
        with self._state:
            for message in batch:
                token = str(message.lock_token)
                held.unsettled[token] = message
                self._by_token[token] = held
                received.append(to_received_message(message, locked_until))
        return received

    def _drop_session(self, held: _HeldSession) -> None:
        """Give the session back; its unsettled messages return to the queue uncounted.

        The receiver is closed off the caller's thread: closing waits for the SDK's
        keep-alive thread (up to a second), which the worker's loop should not."""
        with self._state:
            if held.dropped:
                return
            held.dropped = True
            self._sessions.pop(held.session_id, None)
            for token in held.unsettled:
                self._by_token.pop(token, None)
            held.unsettled.clear()
        self._closer.submit(_close_quietly, held.receiver)

    def complete(self, messages: Sequence[ReceivedMessage]) -> None:
        """Remove the messages; ``LockLostError`` names those whose session lock was lost
        (the others are completed)."""
        self._settle(messages, "complete", lambda r, m: r.complete_message(m))

    def abandon(self, messages: Sequence[ReceivedMessage]) -> None:
        """Make the messages available again; redelivery reports ``delivery_count + 1``."""
        self._settle(messages, "abandon", lambda r, m: r.abandon_message(m))

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        """Move the message to ``<queue>/$DeadLetterQueue`` with reason and description
        (each clipped to the 4096 characters Service Bus takes)."""
        self._settle(
            [message],
            "dead-letter",
            lambda r, m: r.dead_letter_message(
                m, reason=_clip(reason), error_description=_clip(description)
            ),
        )

    def _settle(
        self,
        messages: Sequence[ReceivedMessage],
        action: str,
        settle: Callable[[ServiceBusReceiver, ServiceBusReceivedMessage], None],
    ) -> None:
        lost: list[ReceivedMessage] = []
        with self._receive_lock:
            for message in messages:
                with self._state:
                    held = self._by_token.pop(message.lock_token, None)
                    sdk_message = held.unsettled.pop(message.lock_token, None) if held else None
                if held is None or sdk_message is None:
                    lost.append(message)
                    continue
                try:
                    settle(held.receiver, sdk_message)
                except (ServiceBusError, MessageAlreadySettled) as error:
                    # Whatever the cause, the session lock is gone or going: the service
                    # redelivers the message, which is what LockLostError promises.
                    logger.warning(
                        "settlement failed; the message will be redelivered",
                        extra={
                            "queue": self.queue,
                            "action": action,
                            "error": type(error).__name__,
                        },
                    )
                    lost.append(message)
                    self._drop_session(held)
        _raise_if_lost(lost, action, self.where)

    def renew_locks(self, messages: Sequence[ReceivedMessage]) -> list[float]:
        """Renew the session locks of the messages (a session message's lock is its
        session's); returns the new ``locked_until`` per message.

        Safe to call from another thread while ``receive`` waits (the worker's renewer
        does): it does not wait for the receive, and the SDK serialises the link's frames."""
        with self._state:
            sessions = {m.lock_token: self._by_token.get(m.lock_token) for m in messages}
        renewed: dict[str, float] = {}
        for held in {id(h): h for h in sessions.values() if h is not None}.values():
            try:
                renewed[held.session_id] = _epoch(held.receiver.session.renew_lock())
            except (ServiceBusError, ValueError) as error:
                # ValueError: the SDK's answer when the receiver was closed meanwhile.
                logger.warning(
                    "session lock renewal failed; its messages will be redelivered",
                    extra={"queue": self.queue, "error": type(error).__name__},
                )
                self._drop_session(held)
        lost = [m for m in messages if _session_of(sessions, m) not in renewed]
        _raise_if_lost(lost, "renew the lock of", self.where)
        return [renewed[_session_of(sessions, m)] for m in messages]

    def _on_renew_failure(self, renewable: Any, error: Exception | None) -> None:
        session_id = renewable.session_id if isinstance(renewable, ServiceBusSession) else None
        logger.warning(
            "automatic lock renewal stopped; unsettled messages of the session will be redelivered",
            extra={
                "queue": self.queue,
                "held_sessions": len(self._sessions),
                "lost_session": session_id is not None,
                "error": type(error).__name__ if error else None,
            },
        )

    # --- DeadLetterStore ---------------------------------------------------------------

    def list_dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters, by peeking (no lock is taken)."""
        found: list[DeadLetter] = []
        with self._dead_letter_receiver("reading dead letters") as receiver:
            # From the start: 0 would make the SDK go on after what this receiver last saw.
            next_sequence = 1
            while len(found) < limit:
                batch = receiver.peek_messages(
                    max_message_count=min(limit - len(found), PEEK_BATCH),
                    sequence_number=next_sequence,
                )
                if not batch:
                    break
                found += [to_dead_letter(m) for m in batch]
                next_sequence = found[-1].sequence_number + 1
        return found

    def resend_dead_letter(self, sequence_number: int) -> None:
        """Send a copy (same body, session and properties; id ``replay_message_id``) to the
        queue, then complete the dead letter. A crash in between leaves both; replaying
        again is then dropped by duplicate detection, as the copy's id is the same."""

        def replay(receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage) -> None:
            copy = OutboxMessage(
                body=_body(message),
                message_id=replay_message_id(str(message.message_id), sequence_number),
                session_id=str(message.session_id),
                application_properties=_properties(message),
            )
            self.send([copy])
            receiver.complete_message(message)

        self._with_dead_letter(sequence_number, "re-sending a dead letter", replay)

    def delete_dead_letter(self, sequence_number: int) -> None:
        """Complete (discard) a dead letter for good."""
        self._with_dead_letter(
            sequence_number, "deleting a dead letter", lambda r, m: r.complete_message(m)
        )

    def _with_dead_letter(
        self,
        sequence_number: int,
        doing: str,
        act: Callable[[ServiceBusReceiver, ServiceBusReceivedMessage], None],
    ) -> None:
        with self._dead_letter_receiver(doing) as receiver:
            # A peek answers "no such dead letter" without locking anything.
            peeked = receiver.peek_messages(1, sequence_number=max(sequence_number, 1))
            if not peeked or peeked[0].sequence_number != sequence_number:
                raise KeyError(
                    f"No dead letter with sequence number {sequence_number} in {self.where}; "
                    "list_dead_letters() shows the ones there are."
                )
            passed: list[ServiceBusReceivedMessage] = []
            try:
                target = _scan_for(receiver, sequence_number, passed)
                if target is None:
                    raise OutboxError(
                        f"Dead letter {sequence_number} in {self.where} is locked by another "
                        "reader of the dead-letter queue; try again once its lock expires."
                    )
                act(receiver, target)
            finally:
                _abandon_quietly(receiver, passed)

    @contextmanager
    def _dead_letter_receiver(self, doing: str) -> Iterator[ServiceBusReceiver]:
        """The dead-letter sub-queue's receiver, kept open between operator calls (opening
        one costs a connection); a Service Bus failure closes it and says what to do."""
        with self._dead_letter_lock:
            if self._dead_letters is None:
                self._dead_letters = self._receive_client.get_queue_receiver(
                    self.queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER
                )
            try:
                yield self._dead_letters
            except ServiceBusError as error:
                _close_quietly(self._dead_letters)
                self._dead_letters = None
                raise _translate(error, doing, self.where) from error

    # --- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Give back held sessions (their unsettled messages return uncounted) and close.

        Renewal stops first, so no renewal races a closing receiver; the links close in
        parallel, each waiting for its SDK keep-alive thread."""
        if self._renewer is not None:
            self._renewer.close(wait=False)
        with self._receive_lock:
            for held in list(self._sessions.values()):
                self._drop_session(held)
        with self._dead_letter_lock:
            if self._dead_letters is not None:
                self._closer.submit(_close_quietly, self._dead_letters)
                self._dead_letters = None
        with self._send_lock:
            if self._sender is not None:
                self._closer.submit(_close_quietly, self._sender)
                self._sender = None
        self._closer.shutdown(wait=True)
        self._receive_client.close()
        self._client.close()
        if self._owned_credential is not None:
            self._owned_credential.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ServiceBusQueue({self.settings.namespace!r}, queue={self.queue!r})"


def _session_of(sessions: dict[str, _HeldSession | None], message: ReceivedMessage) -> str:
    """The held session's id for ``message``, or "" when it is not held any more."""
    held = sessions.get(message.lock_token)
    return held.session_id if held is not None else ""


def _limits_of(batch: ServiceBusMessageBatch, sender: Any) -> SizeLimits:
    """The link's limits. The SDK sizes batches by the link (256 KB Standard, 1 MB Premium)
    but keeps the entity's per-message maximum (up to 100 MB on Premium) only in a private
    attribute; without it, a message is held to the batch limit, which is always safe."""
    max_message = int(getattr(sender, "_max_message_size_on_link", 0) or 0)
    return SizeLimits(max(max_message, batch.max_size_in_bytes), batch.max_size_in_bytes)


def _scan_for(
    receiver: ServiceBusReceiver, sequence_number: int, passed: list[ServiceBusReceivedMessage]
) -> ServiceBusReceivedMessage | None:
    """Lock dead letters in order until ``sequence_number``; the others go to ``passed``.
    Stops at the end, or when locks taken earlier ran out and their messages come round
    again (a lock duration shorter than the scan)."""
    seen: set[int | None] = set()
    while True:
        batch = receiver.receive_messages(
            max_message_count=DEAD_LETTER_SCAN_BATCH, max_wait_time=DEAD_LETTER_SCAN_WAIT
        )
        fresh = [m for m in batch if m.sequence_number not in seen]
        for message in batch:
            if message.sequence_number == sequence_number:
                passed += [m for m in batch if m is not message]
                return message
        passed += batch
        if not fresh:
            return None
        seen.update(m.sequence_number for m in fresh)


def _raise_if_lost(lost: list[ReceivedMessage], action: str, where: str) -> None:
    if lost:
        which = ", ".join(f"{m.sequence_number} ({m.message_id!r})" for m in lost)
        raise LockLostError(
            f"Could not {action} message(s) {which} in {where}: the session lock expired, "
            "was lost, or the message was settled already. It is (or will be) redelivered; "
            "make the processing idempotent, or renew locks sooner.",
            [m.sequence_number for m in lost],
        )


def _abandon_quietly(
    receiver: ServiceBusReceiver, messages: list[ServiceBusReceivedMessage]
) -> None:
    """Give back dead letters a scan passed over; a lock that ran out needs nothing."""
    for message in messages:
        try:
            receiver.abandon_message(message)
        except (ServiceBusError, MessageAlreadySettled) as error:
            logger.info(
                "a passed dead letter was not abandoned", extra={"error": type(error).__name__}
            )


def _close_quietly(handler: ServiceBusReceiver | ServiceBusSender) -> None:
    try:
        handler.close()
    except ServiceBusError as error:
        logger.info("closing a Service Bus link failed", extra={"error": type(error).__name__})


# --- the async sender ------------------------------------------------------------------------


class AsyncServiceBusSender:
    """``AsyncOutboxSender`` on ``azure.servicebus.aio``: the same packing as the sync queue.

    Sends commit in groups (``grouping``): those made while a group is on the wire go
    out together next, so a step's writes and its checkpoint cost one round trip.
    """

    def __init__(
        self, settings: ServiceBusSettings, *, credential: Any | None = None, **client_options: Any
    ) -> None:
        self.settings = settings
        self.queue = settings.queue
        self._owned_credential = None
        if settings.connection_string is None and credential is None:
            from azure.identity.aio import DefaultAzureCredential

            credential = self._owned_credential = DefaultAzureCredential()
        self._client = settings.async_client(credential, **client_options)
        self._lock = asyncio.Lock()
        self._sender: AsyncSdkSender | None = None
        self._limits: SizeLimits | None = None
        self._groups = SendGroups()
        self._committing = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> AsyncServiceBusSender:
        return cls(parse_queue_url(url), **options)

    @property
    def where(self) -> str:
        return f"queue {self.queue!r} in {self.settings.namespace}"

    def send(self, messages: Sequence[OutboxMessage]) -> asyncio.Future[None]:
        """As ``ServiceBusQueue.send``."""
        if not messages:
            return nothing_to_send()
        done = self._groups.add(messages)
        if not self._committing:
            self._committing = True
            in_background(self._commit_groups())
        return done

    async def _commit_groups(self) -> None:
        try:
            while self._groups:
                await commit(*self._groups.take(), self._send_now)
        finally:
            self._committing = False

    async def _send_now(self, messages: Sequence[OutboxMessage]) -> None:
        outgoing = [to_service_bus_message(m) for m in messages]
        async with self._lock:
            try:
                limits = await self._size_limits()
                sender = await self._open_sender()
                steps = plan_sends(outgoing, limits)
                for item in await arun_plan(steps, sender.create_message_batch):
                    await sender.send_messages(item)
            except ServiceBusError as error:
                raise _translate(
                    error, f"sending {len(outgoing)} message(s)", self.where
                ) from error

    async def size_limits(self) -> SizeLimits:
        async with self._lock:
            try:
                return await self._size_limits()
            except ServiceBusError as error:
                raise _translate(error, "opening the sender", self.where) from error

    async def _open_sender(self) -> AsyncSdkSender:
        if self._sender is None:
            self._sender = self._client.get_queue_sender(self.queue)
        return self._sender

    async def _size_limits(self) -> SizeLimits:
        if self._limits is None:
            sender = await self._open_sender()
            self._limits = _limits_of(await sender.create_message_batch(), sender)
        return self._limits

    async def close(self) -> None:
        async with self._lock:
            if self._sender is not None:
                await self._sender.close()
                self._sender = None
        await self._client.close()
        if self._owned_credential is not None:
            await self._owned_credential.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncServiceBusSender({self.settings.namespace!r}, queue={self.queue!r})"
