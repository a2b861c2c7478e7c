"""A minimal AMQP 1.0 broker that the real ``azure-servicebus`` SDK can talk to, for tests.

Azure ships no local Service Bus, and no open-source broker speaks its dialect (the ``$cbs``
token node, ``$management`` request/response operations, session filters, lock tokens as
delivery tags). This broker answers that dialect on ``127.0.0.1`` over plain AMQP, which the
SDK uses for connection strings with ``UseDevelopmentEmulator=true`` (it keeps the port and
skips TLS), so tests drive our Service Bus backend through the real SDK and its real wire
protocol.

What it implements, per queue, with Service Bus semantics as documented by Microsoft:

- ``$cbs`` put-token (any token is accepted: this is not a security boundary);
- sends of single messages and ``ServiceBusMessageBatch`` (batch format: each data section
  of the outer message is one encoded message), across split transfer frames, with the
  queue's ``max-message-size`` advertised on attach and enforced;
- duplicate detection by message id within a window;
- sessions: next-available and named session receivers, one receiver per session, FIFO
  per session, session lock with expiry (the link is detached with
  ``com.microsoft:session-lock-lost``, as Service Bus does) and ``renew-session-lock``;
- peek-lock delivery with the lock token as the UUID delivery tag, settlement outcomes
  echoed (complete = accepted, abandon = modified, dead-letter = rejected with
  ``com.microsoft:dead-letter``), lost locks answered with the Service Bus error conditions;
- delivery count (0-based in the AMQP header), max delivery count -> dead-letter sub-queue
  with reason ``MaxDeliveryCountExceeded``;
- the ``<queue>/$DeadLetterQueue`` sub-queue: peek-lock receive, complete, ``peek-message``
  and ``renew-lock`` on its ``$management`` node; dead letters carry ``DeadLetterReason``
  and ``DeadLetterErrorDescription`` application properties.

Everything else (topics, scheduling, deferral, transactions, partitions) is answered with
``amqp:not-implemented``. A batch is recognised by its data sections holding encoded AMQP
sections (the python binding of proton does not expose the transfer's message format);
that is safe for tests whose bodies are not themselves AMQP messages.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from proton import (
    Condition,
    Data,
    Delivery,
    Described,
    Endpoint,
    Event,
    Handler,
    Link,
    Terminus,
    int32,
    symbol,
    timestamp,
    uint,
)
from proton.reactor import Container

HEADER, DELIVERY_ANNOTATIONS, MESSAGE_ANNOTATIONS, PROPERTIES, APPLICATION_PROPERTIES = (
    0x70,
    0x71,
    0x72,
    0x73,
    0x74,
)
DATA, AMQP_SEQUENCE, AMQP_VALUE, FOOTER = 0x75, 0x76, 0x77, 0x78
BODY_SECTIONS = (DATA, AMQP_SEQUENCE, AMQP_VALUE)

SESSION_FILTER = symbol("com.microsoft:session-filter")
LOCKED_UNTIL_UTC = symbol("com.microsoft:locked-until-utc")
LINK_TIMEOUT = symbol("com.microsoft:timeout")
DEAD_LETTER_CONDITION = "com.microsoft:dead-letter"
SESSION_LOCK_LOST = "com.microsoft:session-lock-lost"
MESSAGE_LOCK_LOST = "com.microsoft:message-lock-lost"
SESSION_CANNOT_BE_LOCKED = "com.microsoft:session-cannot-be-locked"
TIMEOUT = "com.microsoft:timeout"
DEAD_LETTER_SUFFIX = "/$deadletterqueue"
MANAGEMENT_SUFFIX = "/$management"
MAX_DELIVERY_COUNT_EXCEEDED = "MaxDeliveryCountExceeded"

DOTNET_EPOCH_TICKS = 621355968000000000
"""DateTime ticks at the Unix epoch: Service Bus sends session lock expiry in .NET ticks."""

TICK_SECONDS = 0.02
DEFAULT_ACCEPT_TIMEOUT = 60.0
RECEIVE_CREDIT = 1000


@dataclass(frozen=True, slots=True)
class QueueSettings:
    """The queue properties an Azure namespace would hold for the entity."""

    requires_session: bool = True
    lock_duration: float = 30.0
    max_delivery_count: int = 10
    duplicate_detection_window: float | None = 600.0
    max_message_size: int = 256 * 1024


@dataclass(slots=True)
class StoredMessage:
    """One message in a queue or its dead-letter sub-queue, as the broker keeps it."""

    sequence_number: int
    enqueued_time: float
    message_id: Any
    session_id: str | None
    properties: list[Any]
    application_properties: dict[Any, Any]
    annotations: dict[Any, Any]
    body: list[Described]
    deliveries: int = 0
    lock_token: uuid.UUID | None = None
    locked_until: float = 0.0
    holder: _Consumer | None = None
    delivery: Delivery | None = None

    @property
    def body_bytes(self) -> bytes:
        return b"".join(bytes(s.value) for s in self.body if s.descriptor == DATA)


@dataclass(slots=True)
class _Entity:
    name: str
    settings: QueueSettings
    active: dict[int, StoredMessage] = field(default_factory=dict)
    dead: dict[int, StoredMessage] = field(default_factory=dict)
    seen_ids: dict[Any, float] = field(default_factory=dict)
    session_owner: dict[str, _Consumer] = field(default_factory=dict)
    transfers: int = 0


@dataclass(eq=False, slots=True)
class _Consumer:
    """A client's receiver link: the broker sends messages over it."""

    link: Link
    entity: _Entity
    dead_letter: bool
    session_id: str | None = None
    session_locked_until: float = 0.0
    # Keyed by proton Delivery (hashed by its C object): proton's python binding cannot read
    # back binary delivery tags, which is what lock tokens are.
    deliveries: dict[Delivery, StoredMessage] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class _PendingAccept:
    """A next-available session receiver waiting for a session with messages."""

    link: Link
    entity: _Entity
    deadline: float


class AmqpTestBroker(Handler):
    """Runs in a background thread; ``start()`` binds a free port on 127.0.0.1."""

    def __init__(self, queues: dict[str, QueueSettings], host: str = "127.0.0.1") -> None:
        super().__init__()
        self.host = host
        self.port = _free_port(host)
        self._entities = {name.lower(): _Entity(name, s) for name, s in queues.items()}
        self._state = threading.Lock()
        self._sequence = 0
        self._consumers: dict[str, _Consumer] = {}
        self._pending: list[_PendingAccept] = []
        self._replies: dict[tuple[int, str], list[bytes]] = {}
        self._partial: dict[Delivery, bytearray] = {}
        self._stopping = threading.Event()
        self._listening = threading.Event()
        self._container = Container(self)
        self._crash: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="amqp-broker", daemon=True)

    # --- lifecycle and inspection (any thread) -----------------------------------------

    def start(self) -> Self:
        # proton logs an error whenever a client drops its socket before the broker's last
        # frame went out, which the SDK does on every close; that is not a failure here.
        logging.getLogger("proton").setLevel(logging.CRITICAL)
        self._thread.start()
        if not self._listening.wait(10):
            raise RuntimeError("the AMQP test broker did not start listening within 10 s")
        return self

    def stop(self) -> None:
        """Stop serving; raises what broke the broker, if anything did, so tests see it."""
        self._stopping.set()
        self._thread.join(timeout=10)
        if self._crash is not None:
            raise RuntimeError("the AMQP test broker crashed") from self._crash

    def _run(self) -> None:
        try:
            self._container.run()
        except BaseException as error:
            self._crash = error
            raise

    def add_queue(self, name: str, settings: QueueSettings) -> None:
        """Create a queue while running (a namespace's queues, created by its owner)."""
        with self._state:
            self._entities[name.lower()] = _Entity(name, settings)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def connection_string(self, queue: str) -> str:
        """What an Azure portal would show, pointed at this broker (no TLS, port kept)."""
        return (
            f"Endpoint=sb://{self.host}:{self.port};SharedAccessKeyName=test;"
            f"SharedAccessKey=not-a-secret;UseDevelopmentEmulator=true;EntityPath={queue}"
        )

    def active(self, queue: str) -> list[StoredMessage]:
        with self._state:
            return sorted(self._entities[queue.lower()].active.values(), key=_by_sequence)

    def transfers(self, queue: str) -> int:
        """How many transfers (single messages or batches) senders made to the queue."""
        with self._state:
            return self._entities[queue.lower()].transfers

    def dead_letters(self, queue: str) -> list[StoredMessage]:
        with self._state:
            return sorted(self._entities[queue.lower()].dead.values(), key=_by_sequence)

    # --- proton events (the container thread) ------------------------------------------

    def on_reactor_init(self, event: Event) -> None:
        event.container.listen(f"{self.host}:{self.port}")
        event.container.schedule(TICK_SECONDS, self)
        self._listening.set()

    def on_timer_task(self, event: Event) -> None:
        if self._stopping.is_set():
            event.container.stop()
            return
        with self._state:
            self._expire_session_locks()
            self._serve_pending_accepts()
            for consumer in list(self._consumers.values()):
                self._pump(consumer)
        event.container.schedule(TICK_SECONDS, self)

    def on_connection_remote_open(self, event: Event) -> None:
        event.connection.open()

    def on_session_remote_open(self, event: Event) -> None:
        event.session.open()

    def on_link_remote_open(self, event: Event) -> None:
        link = event.link
        with self._state:
            if link.is_receiver:
                self._attach_inbound(link)
            else:
                self._attach_outbound(link)

    def on_link_flow(self, event: Event) -> None:
        link = event.link
        if not link.is_sender:
            return
        with self._state:
            self._flush_replies(link)
            consumer = self._consumers.get(link.name)
            if consumer is not None:
                self._pump(consumer)

    def on_delivery(self, event: Event) -> None:
        delivery, link = event.delivery, event.link
        with self._state:
            if link.is_receiver:
                self._on_inbound_transfer(link, delivery)
            else:
                self._on_settlement(link, delivery)

    def on_link_remote_close(self, event: Event) -> None:
        with self._state:
            self._forget_link(event.link)
        if not event.link.state & Endpoint.LOCAL_CLOSED:
            event.link.close()

    def on_session_remote_close(self, event: Event) -> None:
        if not event.session.state & Endpoint.LOCAL_CLOSED:
            event.session.close()

    def on_connection_remote_close(self, event: Event) -> None:
        self._forget_connection(event.connection)
        if not event.connection.state & Endpoint.LOCAL_CLOSED:
            event.connection.close()

    def on_transport_closed(self, event: Event) -> None:
        if event.connection is not None:
            self._forget_connection(event.connection)

    # --- attaching links -----------------------------------------------------------------

    def _attach_inbound(self, link: Link) -> None:
        """A client sender: to the queue, or a request link of ``$cbs`` / ``$management``."""
        address = _path(link.remote_target.address)
        _mirror_terminus(link)
        entity = self._entities.get(address.lower())
        if address == "$cbs" or address.lower().endswith(MANAGEMENT_SUFFIX):
            link.open()
            link.flow(RECEIVE_CREDIT)
        elif entity is not None:
            link.max_message_size = entity.settings.max_message_size
            link.open()
            link.flow(RECEIVE_CREDIT)
        else:
            _refuse(link, "amqp:not-found", f"The messaging entity '{address}' could not be found.")

    def _attach_outbound(self, link: Link) -> None:
        """A client receiver: the queue, its dead letters, or a reply link."""
        address = _path(link.remote_source.address)
        _mirror_terminus(link)
        if address == "$cbs" or address.lower().endswith(MANAGEMENT_SUFFIX):
            self._replies.setdefault(_reply_key(link, address), [])
            link.open()
            return
        dead_letter = address.lower().endswith(DEAD_LETTER_SUFFIX)
        entity = self._entities.get(address.lower().removesuffix(DEAD_LETTER_SUFFIX))
        if entity is None:
            _refuse(link, "amqp:not-found", f"The messaging entity '{address}' could not be found.")
            return
        link.snd_settle_mode = link.remote_snd_settle_mode
        link.rcv_settle_mode = link.remote_rcv_settle_mode
        filters = _get(link.remote_source.filter) or {}
        wants_session = SESSION_FILTER in filters
        if dead_letter or not entity.settings.requires_session:
            if wants_session:
                _refuse(link, "amqp:not-allowed", f"'{address}' does not support sessions.")
                return
            self._consumers[link.name] = _Consumer(link, entity, dead_letter)
            link.open()
            return
        if not wants_session:
            _refuse(
                link,
                "amqp:not-allowed",
                "It is not possible for an entity that requires sessions to create a "
                "non-sessionful message receiver.",
            )
            return
        requested = filters[SESSION_FILTER]
        if requested is not None:
            self._accept_named_session(link, entity, str(requested))
            return
        properties = link.remote_properties or {}
        wait = float(properties.get(LINK_TIMEOUT, DEFAULT_ACCEPT_TIMEOUT * 1000)) / 1000
        self._pending.append(_PendingAccept(link, entity, time.time() + wait))
        self._serve_pending_accepts()

    def _accept_named_session(self, link: Link, entity: _Entity, session_id: str) -> None:
        owner = entity.session_owner.get(session_id)
        if owner is not None:
            _refuse(
                link,
                SESSION_CANNOT_BE_LOCKED,
                f"The requested session '{session_id}' cannot be accepted. It may be locked "
                "by another receiver.",
            )
            return
        self._grant_session(link, entity, session_id)

    def _serve_pending_accepts(self) -> None:
        now = time.time()
        for pending in list(self._pending):
            link = pending.link
            if link.state & (Endpoint.REMOTE_CLOSED | Endpoint.LOCAL_CLOSED):
                self._pending.remove(pending)
                continue
            session_id = _next_available_session(pending.entity)
            if session_id is not None:
                self._pending.remove(pending)
                self._grant_session(link, pending.entity, session_id)
            elif now >= pending.deadline:
                self._pending.remove(pending)
                # Service Bus answers the attach and detaches at once with a timeout error.
                _refuse(link, TIMEOUT, "No session available within the operation timeout.")

    def _grant_session(self, link: Link, entity: _Entity, session_id: str) -> None:
        consumer = _Consumer(link, entity, dead_letter=False, session_id=session_id)
        consumer.session_locked_until = time.time() + entity.settings.lock_duration
        entity.session_owner[session_id] = consumer
        self._consumers[link.name] = consumer
        link.source.filter.clear()
        link.source.filter.put_object({SESSION_FILTER: session_id})
        link.properties = {LOCKED_UNTIL_UTC: int(_ticks(consumer.session_locked_until))}
        link.open()
        self._pump(consumer)

    # --- messages in -----------------------------------------------------------------------

    def _on_inbound_transfer(self, link: Link, delivery: Delivery) -> None:
        buffer = self._partial.setdefault(delivery, bytearray())
        buffer += link.recv(delivery.pending) or b""
        if delivery.partial:
            return
        del self._partial[delivery]
        link.advance()
        address = _path(link.remote_target.address)
        try:
            if address == "$cbs" or address.lower().endswith(MANAGEMENT_SUFFIX):
                self._on_request(link, address, bytes(buffer))
                delivery.update(Delivery.ACCEPTED)
            else:
                entity = self._entities[address.lower()]
                condition = self._enqueue(entity, bytes(buffer))
                if condition is not None:
                    delivery.local.condition = condition
                    delivery.update(Delivery.REJECTED)
                else:
                    delivery.update(Delivery.ACCEPTED)
        finally:
            delivery.settle()
            link.flow(1)
        self._serve_pending_accepts()
        for consumer in list(self._consumers.values()):
            self._pump(consumer)

    def _enqueue(self, entity: _Entity, encoded: bytes) -> Condition | None:
        entity.transfers += 1
        if len(encoded) > entity.settings.max_message_size:
            return Condition(
                "amqp:link:message-size-exceeded",
                f"The received message (size {len(encoded)}) exceeds the limit "
                f"({entity.settings.max_message_size}) currently allowed on the link.",
            )
        sections = decode_sections(encoded)
        inner = _batched(sections)
        messages = [decode_sections(m) for m in inner] if inner is not None else [sections]
        now = time.time()
        stored: list[StoredMessage] = []
        for parts in messages:
            message = self._stored(parts, now)
            if entity.settings.requires_session and not message.session_id:
                return Condition(
                    "amqp:not-allowed",
                    "The SessionId was not set on a message, and it cannot be sent to the "
                    "entity. Entities that have session support enabled can only receive "
                    "messages that have the SessionId set to a valid value.",
                )
            stored.append(message)
        window = entity.settings.duplicate_detection_window
        for message in stored:
            if window is not None and message.message_id is not None:
                seen = entity.seen_ids.get(message.message_id)
                if seen is not None and now - seen < window:
                    continue
                entity.seen_ids[message.message_id] = now
            self._sequence += 1
            message.sequence_number = self._sequence
            entity.active[message.sequence_number] = message
        return None

    def _stored(self, sections: list[Described], now: float) -> StoredMessage:
        by_kind = {s.descriptor: s.value for s in sections if s.descriptor not in BODY_SECTIONS}
        properties = list(by_kind.get(PROPERTIES) or [])
        properties += [None] * (13 - len(properties))
        group = properties[10]
        annotations = {
            k: v
            for k, v in (by_kind.get(MESSAGE_ANNOTATIONS) or {}).items()
            if not str(k).startswith("x-opt-")
        }
        return StoredMessage(
            sequence_number=0,
            enqueued_time=now,
            message_id=properties[0],
            session_id=None if group is None else str(group),
            properties=properties,
            application_properties=dict(by_kind.get(APPLICATION_PROPERTIES) or {}),
            annotations=annotations,
            body=[s for s in sections if s.descriptor in BODY_SECTIONS],
        )

    # --- messages out ----------------------------------------------------------------------

    def _pump(self, consumer: _Consumer) -> None:
        link = consumer.link
        if not link.state & Endpoint.LOCAL_ACTIVE or link.state & Endpoint.REMOTE_CLOSED:
            return
        now = time.time()
        while link.credit > 0:
            message = self._next_for(consumer, now)
            if message is None:
                return
            self._deliver(consumer, message, now)

    def _next_for(self, consumer: _Consumer, now: float) -> StoredMessage | None:
        entity = consumer.entity
        if consumer.dead_letter:
            candidates = entity.dead.values()
        elif consumer.session_id is not None:
            if consumer.session_locked_until < now:
                return None
            candidates = (m for m in entity.active.values() if m.session_id == consumer.session_id)
        else:
            candidates = entity.active.values()
        for message in sorted(candidates, key=_by_sequence):
            if message.lock_token is None:
                return message
            holder = message.holder
            if holder is not None and holder.session_id is None and message.locked_until < now:
                # A message lock (not a session lock) that ran out: redeliver, counted.
                self._unlock(message)
                return message
        return None

    def _deliver(self, consumer: _Consumer, message: StoredMessage, now: float) -> None:
        if (
            not consumer.dead_letter
            and message.deliveries >= consumer.entity.settings.max_delivery_count
        ):
            self._dead_letter(
                consumer.entity,
                message,
                MAX_DELIVERY_COUNT_EXCEEDED,
                f"Message could not be consumed after {message.deliveries} delivery attempts.",
            )
            return
        token = uuid.uuid4()
        message.deliveries += 1
        message.lock_token = token
        message.holder = consumer
        message.locked_until = (
            consumer.session_locked_until
            if consumer.session_id is not None
            else now + consumer.entity.settings.lock_duration
        )
        link = consumer.link
        delivery = link.delivery(token.bytes_le)
        message.delivery = delivery
        consumer.deliveries[delivery] = message
        link.send(self.encode(message, locked=True))
        link.advance()

    def encode(self, message: StoredMessage, *, locked: bool) -> bytes:
        annotations: dict[Any, Any] = dict(message.annotations)
        annotations[symbol("x-opt-sequence-number")] = int(message.sequence_number)
        annotations[symbol("x-opt-enqueued-time")] = timestamp(int(message.enqueued_time * 1000))
        if locked and message.holder is not None and message.holder.session_id is None:
            annotations[symbol("x-opt-locked-until")] = timestamp(int(message.locked_until * 1000))
        prior = max(message.deliveries - 1, 0) if locked else message.deliveries
        sections = [
            Described(uint(HEADER), [False, None, None, False, uint(prior)]),
            Described(uint(MESSAGE_ANNOTATIONS), annotations),
            Described(uint(PROPERTIES), message.properties),
            Described(uint(APPLICATION_PROPERTIES), message.application_properties),
            *message.body,
        ]
        return encode_sections(sections)

    # --- settlement ------------------------------------------------------------------------

    def _on_settlement(self, link: Link, delivery: Delivery) -> None:
        if not delivery.updated and not delivery.remote_state:
            return
        consumer = self._consumers.get(link.name)
        message = consumer.deliveries.pop(delivery, None) if consumer else None
        outcome = delivery.remote_state
        if consumer is None or message is None:
            # The lock went with its session or expired, and the message was unlocked.
            if outcome != Delivery.RELEASED:
                delivery.local.condition = Condition(MESSAGE_LOCK_LOST, "The lock is gone.")
                delivery.update(Delivery.REJECTED)
            delivery.settle()
            return
        lost = self._lock_lost(consumer, message)
        if outcome == Delivery.RELEASED:
            if not lost:
                message.deliveries -= 1
                self._unlock(message)
            delivery.settle()
            return
        if lost is not None:
            delivery.local.condition = Condition(
                lost,
                "The lock supplied is invalid. Either the lock expired, or the message has "
                "already been removed from the queue.",
            )
            delivery.update(Delivery.REJECTED)
            delivery.settle()
            return
        entity = consumer.entity
        if outcome == Delivery.ACCEPTED:
            (entity.dead if consumer.dead_letter else entity.active).pop(message.sequence_number)
            delivery.update(Delivery.ACCEPTED)
        elif outcome == Delivery.MODIFIED and not delivery.remote.undeliverable:
            self._unlock(message)
            if (
                not consumer.dead_letter
                and message.deliveries >= entity.settings.max_delivery_count
            ):
                self._dead_letter(
                    entity,
                    message,
                    MAX_DELIVERY_COUNT_EXCEEDED,
                    f"Message could not be consumed after {message.deliveries} delivery attempts.",
                )
            delivery.local.failed = delivery.remote.failed
            delivery.update(Delivery.MODIFIED)
        elif outcome == Delivery.REJECTED and not consumer.dead_letter:
            condition = delivery.remote.condition
            info = dict(condition.info or {}) if condition is not None else {}
            self._dead_letter(
                entity,
                message,
                str(info.get("DeadLetterReason") or ""),
                str(info.get("DeadLetterErrorDescription") or ""),
            )
            delivery.update(Delivery.REJECTED)
        else:
            delivery.local.condition = Condition(
                "amqp:not-implemented",
                "This test broker supports complete, abandon and dead-letter.",
            )
            delivery.update(Delivery.REJECTED)
        delivery.settle()
        self._pump(consumer)

    def _lock_lost(self, consumer: _Consumer, message: StoredMessage) -> str | None:
        now = time.time()
        if consumer.session_id is not None:
            owner = consumer.entity.session_owner.get(consumer.session_id)
            if owner is not consumer or consumer.session_locked_until < now:
                return SESSION_LOCK_LOST
        if message.holder is not consumer or (
            consumer.session_id is None and message.locked_until < now
        ):
            return MESSAGE_LOCK_LOST
        return None

    def _unlock(self, message: StoredMessage) -> None:
        if message.holder is not None and message.delivery is not None:
            message.holder.deliveries.pop(message.delivery, None)
        message.delivery = None
        message.lock_token = None
        message.holder = None
        message.locked_until = 0.0

    def _dead_letter(
        self, entity: _Entity, message: StoredMessage, reason: str, description: str
    ) -> None:
        self._unlock(message)
        entity.active.pop(message.sequence_number, None)
        message.application_properties = {
            **message.application_properties,
            "DeadLetterReason": reason,
            "DeadLetterErrorDescription": description,
        }
        entity.dead[message.sequence_number] = message

    # --- locks expiring and links going away ---------------------------------------------

    def _expire_session_locks(self) -> None:
        now = time.time()
        for consumer in list(self._consumers.values()):
            if consumer.session_id is None or consumer.session_locked_until >= now:
                continue
            # Service Bus detaches the link of an expired session lock; its messages become
            # available to the next receiver with their delivery counted.
            self._release_consumer(consumer, counted=True)
            link = consumer.link
            if not link.state & Endpoint.LOCAL_CLOSED:
                link.condition = Condition(SESSION_LOCK_LOST, "The session lock has expired.")
                link.close()

    def _forget_link(self, link: Link) -> None:
        self._pending = [p for p in self._pending if p.link != link]
        consumer = self._consumers.get(link.name)
        if consumer is not None and consumer.link == link:
            # Closing a session receiver gives its unsettled messages back uncounted.
            self._release_consumer(consumer, counted=False)

    def _forget_connection(self, connection: Any) -> None:
        with self._state:
            for consumer in list(self._consumers.values()):
                if consumer.link.connection == connection:
                    self._release_consumer(consumer, counted=False)
            self._pending = [p for p in self._pending if p.link.connection != connection]

    def _release_consumer(self, consumer: _Consumer, *, counted: bool) -> None:
        self._consumers.pop(consumer.link.name, None)
        entity = consumer.entity
        for message in list(consumer.deliveries.values()):
            if not counted:
                message.deliveries -= 1
            self._unlock(message)
            if counted and message.deliveries >= entity.settings.max_delivery_count:
                self._dead_letter(
                    entity,
                    message,
                    MAX_DELIVERY_COUNT_EXCEEDED,
                    f"Message could not be consumed after {message.deliveries} delivery attempts.",
                )
        consumer.deliveries.clear()
        if (
            consumer.session_id is not None
            and entity.session_owner.get(consumer.session_id) is consumer
        ):
            del entity.session_owner[consumer.session_id]

    # --- $cbs and $management ----------------------------------------------------------

    def _on_request(self, link: Link, address: str, encoded: bytes) -> None:
        sections = {s.descriptor: s.value for s in decode_sections(encoded)}
        properties = list(sections.get(PROPERTIES) or []) + [None] * 13
        app = {str(k): v for k, v in (sections.get(APPLICATION_PROPERTIES) or {}).items()}
        body = sections.get(AMQP_VALUE)
        if address == "$cbs":
            status, description, value, fields = (
                202,
                "Accepted",
                None,
                ("status-code", "status-description"),
            )
            condition = None
        else:
            entity_path = address[: -len(MANAGEMENT_SUFFIX)]
            status, description, value, condition = self._management(
                entity_path, str(app.get("operation", "")), body or {}, app
            )
            fields = ("statusCode", "statusDescription")
        response_app: dict[Any, Any] = {fields[0]: int32(status), fields[1]: description}
        if condition is not None:
            response_app["errorCondition"] = symbol(condition)
        response = [
            Described(uint(PROPERTIES), [None, None, None, None, None, properties[0]]),
            Described(uint(APPLICATION_PROPERTIES), response_app),
            Described(uint(AMQP_VALUE), value),
        ]
        key = _reply_key(link, address)
        self._replies.setdefault(key, []).append(encode_sections(response))
        for reply_link in _links_of(link.session, is_sender=True):
            if _reply_key(reply_link, _path(reply_link.remote_source.address)) == key:
                self._flush_replies(reply_link)

    def _flush_replies(self, link: Link) -> None:
        address = _path(link.remote_source.address)
        queue = self._replies.get(_reply_key(link, address))
        while queue and link.credit > 0:
            link.delivery(uuid.uuid4().bytes)
            link.send(queue.pop(0))
            link.advance()

    def _management(
        self, entity_path: str, operation: str, body: dict[Any, Any], app: dict[str, Any]
    ) -> tuple[int, str, Any, str | None]:
        dead_letter = entity_path.lower().endswith(DEAD_LETTER_SUFFIX)
        entity = self._entities.get(entity_path.lower().removesuffix(DEAD_LETTER_SUFFIX))
        if entity is None:
            return (
                404,
                f"The messaging entity '{entity_path}' could not be found.",
                None,
                "amqp:not-found",
            )
        args = {str(k): v for k, v in body.items()}
        now = time.time()
        if operation == "com.microsoft:renew-session-lock":
            consumer = self._consumers.get(str(app.get("associated-link-name")))
            session_id = str(args.get("session-id"))
            owner = entity.session_owner.get(session_id)
            if owner is None or owner is not consumer or owner.session_locked_until < now:
                return 410, "The session lock has expired.", None, SESSION_LOCK_LOST
            owner.session_locked_until = now + entity.settings.lock_duration
            for message in owner.deliveries.values():
                message.locked_until = owner.session_locked_until
            return (
                200,
                "OK",
                {"expiration": timestamp(int(owner.session_locked_until * 1000))},
                None,
            )
        if operation == "com.microsoft:renew-lock":
            source = entity.dead if dead_letter else entity.active
            expirations = []
            for token in args.get("lock-tokens") or []:
                held = [m for m in source.values() if m.lock_token == token]
                if not held or held[0].locked_until < now:
                    return 410, "The lock supplied is invalid.", None, MESSAGE_LOCK_LOST
                held[0].locked_until = now + entity.settings.lock_duration
                expirations.append(timestamp(int(held[0].locked_until * 1000)))
            return 200, "OK", {"expirations": expirations}, None
        if operation == "com.microsoft:peek-message":
            source = entity.dead if dead_letter else entity.active
            start = int(args.get("from-sequence-number") or 0)
            count = int(args.get("message-count") or 1)
            found = [
                m for m in sorted(source.values(), key=_by_sequence) if m.sequence_number >= start
            ]
            if not found:
                return 204, "No Content", None, None
            return (
                200,
                "OK",
                {"messages": [{"message": self.encode(m, locked=False)} for m in found[:count]]},
                None,
            )
        return (
            501,
            f"Operation {operation!r} is not implemented by this test broker.",
            None,
            "amqp:not-implemented",
        )


# --- AMQP sections --------------------------------------------------------------------------


def encode_sections(sections: list[Described]) -> bytes:
    out = bytearray()
    for section in sections:
        data = Data()
        data.put_object(section)
        out += data.encode()
    return bytes(out)


def decode_sections(encoded: bytes) -> list[Described]:
    sections = []
    view = memoryview(encoded)
    while view:
        data = Data()
        used = data.decode(bytes(view))
        data.rewind()
        data.next()
        section = _owned(data.get_object())
        if not isinstance(section, Described):
            raise ValueError("not an AMQP message section")
        sections.append(Described(int(section.descriptor), section.value))
        view = view[used:]
    return sections


def _owned(value: Any) -> Any:
    """A copy that outlives its ``Data``: proton hands out binaries as views into it."""
    if isinstance(value, memoryview):
        return value.tobytes()
    if isinstance(value, Described):
        return Described(value.descriptor, _owned(value.value))
    if isinstance(value, dict):
        return type(value)({_owned(k): _owned(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return [_owned(v) for v in value]
    return value


def _batched(sections: list[Described]) -> list[bytes] | None:
    """The encoded inner messages if this is a Service Bus batch, else None."""
    data = [bytes(s.value) for s in sections if s.descriptor == DATA]
    if not data or any(s.descriptor in (AMQP_SEQUENCE, AMQP_VALUE) for s in sections):
        return None
    if all(len(d) >= 3 and d[0] == 0x00 and d[1] == 0x53 and 0x70 <= d[2] <= 0x78 for d in data):
        return data
    return None


# --- small helpers --------------------------------------------------------------------------


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _path(address: str | None) -> str:
    """``amqps://host:port/events/$management`` -> ``events/$management``."""
    text = address or ""
    if "://" in text:
        text = text.split("://", 1)[1]
        text = text.split("/", 1)[1] if "/" in text else ""
    return text.strip("/")


def _mirror_terminus(link: Link) -> None:
    link.source.copy(link.remote_source)
    link.target.copy(link.remote_target)


def _refuse(link: Link, condition: str, description: str) -> None:
    """Refuse as AMQP prescribes: attach with no terminus, then detach with the error."""
    link.source.type = Terminus.UNSPECIFIED
    link.target.type = Terminus.UNSPECIFIED
    link.condition = Condition(condition, description)
    link.open()
    link.close()


def _reply_key(link: Link, address: str) -> tuple[int, str]:
    # proton wrappers are recreated per event; their hash is that of the C object.
    return hash(link.session), address.lower()


def _links_of(session: Any, *, is_sender: bool) -> Iterator[Link]:
    link = session.connection.link_head(Endpoint.LOCAL_ACTIVE)
    while link is not None:
        if link.session == session and link.is_sender == is_sender:
            yield link
        link = link.next(Endpoint.LOCAL_ACTIVE)


def _get(data: Data) -> Any:
    data.rewind()
    return data.get_object() if data.next() else None


def _next_available_session(entity: _Entity) -> str | None:
    waiting = sorted(
        (m for m in entity.active.values() if m.session_id not in entity.session_owner),
        key=_by_sequence,
    )
    return waiting[0].session_id if waiting else None


def _ticks(epoch_seconds: float) -> int:
    return DOTNET_EPOCH_TICKS + int(epoch_seconds * 10_000_000)


_by_sequence: Callable[[StoredMessage], int] = lambda m: m.sequence_number  # noqa: E731
