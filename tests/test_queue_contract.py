"""One contract for every outbox backend: the embedded SQLite queue and Azure Service Bus.

The ``backend`` fixture runs each ``test_contract_*`` against:

- ``sqlite``: ``SqliteQueue`` on a temporary file;
- ``servicebus``: ``ServiceBusQueue`` driving the real ``azure-servicebus`` SDK over the wire
  against ``tests/amqp_broker.py`` on 127.0.0.1 (``UseDevelopmentEmulator=true`` makes the SDK
  speak plain AMQP to it), a fresh queue per test;
- ``azure`` (marked ``azure``): the same ``ServiceBusQueue`` against a real namespace when
  ``LANGGRAPH_KUSTO_TEST_SERVICEBUS`` holds a connection string (with ``EntityPath``), an
  ``sb://<namespace>/<queue>`` URL or a namespace; skipped otherwise. See
  ``docs/servicebus.md``. The Service Bus tests after the contract read the broker's state,
  so they run against the broker only.

How each behaviour is proven for Service Bus:

- Over the wire, real SDK to the test broker: publish (``ServiceBusMessageBatch`` sends) /
  peek-lock receive through session receivers (``NEXT_AVAILABLE_SESSION``) / complete;
  abandon -> redelivery with delivery count + 1; session lock expiry -> redelivery and
  ``LockLostError`` on the stale settlement (the broker detaches the link with
  ``com.microsoft:session-lock-lost``, as Service Bus does); renewal
  (``renew-session-lock``) keeps the lock, explicitly from another thread and by
  ``AutoLockRenewer``; max delivery -> dead letter ``MaxDeliveryCountExceeded``; explicit
  dead-letter with reason and description; dead-letter sub-queue peek, re-send and delete;
  duplicate message id dropped within the window (and kept after it); FIFO per session,
  also after an abandon; one consumer per session; ids over 128 characters; batches cut at
  the link's size (Standard 256 KB) and a large message sent alone (Premium); the ``aio``
  sender; one sender shared by threads; an unknown queue's error; and the real ingestor
  worker draining chunked events through this backend unchanged.
- The broker is our reading of Service Bus semantics (``tests/amqp_broker.py`` lists them):
  these tests prove the backend drives the SDK correctly and maps its outcomes to the
  contract; that Azure itself behaves so is what the ``azure`` run of the same tests proves.
- With real SDK objects offline, at the SDK boundary: ``ServiceBusMessageBatch`` filled to
  the real limits (256 KB Standard, 1 MB Premium batch, 100 MB Premium message) by
  ``plan_sends``; ``ServiceBusReceivedMessage.from_bytes`` of what Service Bus delivers
  (bytes-typed properties, 0-based delivery count, dead-letter properties) through the
  conversions; SDK exception objects through the error translation (authentication,
  authorization, size); URL parsing and secret redaction.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from amqp_broker import AmqpTestBroker, QueueSettings, encode_sections
from azure.servicebus import ServiceBusMessage, ServiceBusMessageBatch, ServiceBusReceivedMessage
from azure.servicebus.exceptions import (
    MessageSizeExceededError,
    ServiceBusAuthenticationError,
    ServiceBusAuthorizationError,
)
from langgraph.checkpoint.kusto.ingestor_worker.ingest import encode_rows
from langgraph.checkpoint.kusto.ingestor_worker.worker import Worker
from langgraph.checkpoint.kusto.outbox import (
    MAX_DELIVERY_COUNT_EXCEEDED,
    DeadLetterStore,
    LockLostError,
    MessageTooLargeError,
    OutboxError,
    OutboxMessage,
    OutboxQueue,
    OutboxReceiver,
    OutboxSender,
    ReceivedMessage,
    open_async_sender,
    open_queue,
    open_sender,
    queue_id,
    redact_queue_url,
    replay_message_id,
)
from langgraph.checkpoint.kusto.outbox.servicebus import (
    HEADER_RESERVE_BYTES,
    AsyncServiceBusSender,
    ServiceBusQueue,
    SizeLimits,
    _translate,
    parse_queue_url,
    plan_sends,
    run_plan,
    to_dead_letter,
    to_received_message,
)
from langgraph.checkpoint.kusto.outbox.sqlite import SqliteQueue
from langgraph.checkpoint.kusto.shared.envelope import Event, EventKind, encode_event
from langgraph.checkpoint.kusto.shared.framing import encode_frame, split_frames
from langgraph.checkpoint.kusto.shared.rows import event_rows
from proton import Described, symbol, timestamp, uint, ulong

LIVE_ENV = "LANGGRAPH_KUSTO_TEST_SERVICEBUS"
LIVE_DEFAULT_QUEUE = "langgraph-kusto-contract"
MAX_DELIVERY_COUNT = 3
KB = 1024
MB = 1024 * KB
STANDARD = 256 * KB
PREMIUM_BATCH = 1 * MB
PREMIUM_MESSAGE = 100 * MB


# --- backends ---------------------------------------------------------------------------------


@dataclass
class Backend:
    """One queue under test, and the settings the contract depends on."""

    name: str
    lock_duration: float
    max_delivery_count: int
    duplicate_detection_window: float
    wait: float
    """How long a receive that should find messages may wait."""
    empty_wait: float
    """How long to wait when showing that nothing is available."""
    opener: Callable[[bool], OutboxQueue]
    clock_slack: float = 1.0
    opened: list[OutboxQueue] = field(default_factory=list)

    def open(self, *, auto_renew: bool = True) -> OutboxQueue:
        """A consumer (and producer). ``auto_renew=False`` leaves lock renewal to the test."""
        queue = self.opener(auto_renew)
        self.opened.append(queue)
        return queue

    def close_all(self) -> None:
        for queue in self.opened:
            close_later(queue)


_closing: list[threading.Thread] = []


def close_later(queue: OutboxQueue) -> None:
    """Close in the background: closing a Service Bus queue waits up to a second for the
    SDK's link threads, which would add up over the suite. Joined before the broker stops."""
    thread = threading.Thread(target=queue.close, daemon=True)
    thread.start()
    _closing.append(thread)


@pytest.fixture(scope="module")
def broker() -> Iterator[AmqpTestBroker]:
    with AmqpTestBroker({}) as running:
        yield running
        while _closing:
            _closing.pop().join(timeout=30)


@pytest.fixture
def sb(broker: AmqpTestBroker) -> Iterator[Callable[..., ServiceBusQueue]]:
    """Opens ``ServiceBusQueue``s on the broker, closed (in the background) after the test."""
    opened: list[ServiceBusQueue] = []

    def open_(queue: str, **options: Any) -> ServiceBusQueue:
        opened.append(ServiceBusQueue.from_url(broker.connection_string(queue), **options))
        return opened[-1]

    yield open_
    for queue in opened:
        close_later(queue)


BROKER_LOCK = 3.0
BROKER_DEDUP_WINDOW = 4.0
SQLITE_LOCK = 1.0
SQLITE_DEDUP_WINDOW = 0.5


def _sqlite_backend(tmp_path: Path) -> Backend:
    path = tmp_path / "outbox.db"

    def opener(_auto_renew: bool) -> OutboxQueue:
        return SqliteQueue(
            path,
            lock_duration=SQLITE_LOCK,
            max_delivery_count=MAX_DELIVERY_COUNT,
            duplicate_detection_window=SQLITE_DEDUP_WINDOW,
        )

    return Backend("sqlite", SQLITE_LOCK, MAX_DELIVERY_COUNT, SQLITE_DEDUP_WINDOW, 0.5, 0.0, opener)


def _broker_backend(broker: AmqpTestBroker) -> Backend:
    name = f"q{uuid.uuid4().hex[:10]}"
    broker.add_queue(
        name,
        QueueSettings(
            lock_duration=BROKER_LOCK,
            max_delivery_count=MAX_DELIVERY_COUNT,
            duplicate_detection_window=BROKER_DEDUP_WINDOW,
        ),
    )
    url = broker.connection_string(name)

    def opener(auto_renew: bool) -> OutboxQueue:
        return ServiceBusQueue.from_url(url, lock_renewal=60.0 if auto_renew else 0.0)

    # empty_wait: the least wait with which a consumer holding sessions looks for another.
    return Backend(
        "servicebus", BROKER_LOCK, MAX_DELIVERY_COUNT, BROKER_DEDUP_WINDOW, 3.0, 0.5, opener
    )


def _live_url() -> str:
    value = os.environ[LIVE_ENV].strip()
    if value.lower().startswith(("endpoint=", "sb://")):
        return value
    return f"sb://{value}/{LIVE_DEFAULT_QUEUE}"


def _live_backend() -> Backend:
    """The live queue's own settings, read with the administration client (needs Manage
    rights or the 'Azure Service Bus Data Owner' role), after checking what the suite needs."""
    from azure.servicebus.management import ServiceBusAdministrationClient

    url = _live_url()
    settings = parse_queue_url(url)
    if settings.connection_string is not None:
        admin = ServiceBusAdministrationClient.from_connection_string(settings.connection_string)
    else:
        from azure.identity import DefaultAzureCredential

        admin = ServiceBusAdministrationClient(settings.namespace, DefaultAzureCredential())
    with admin:
        props = admin.get_queue(settings.queue)
    missing = [
        what
        for what, ok in (
            ("sessions", props.requires_session),
            ("duplicate detection", props.requires_duplicate_detection),
        )
        if not ok
    ]
    if missing:
        pytest.fail(
            f"queue {settings.queue!r} needs {' and '.join(missing)} on; see docs/servicebus.md"
        )
    lock = _seconds(props.lock_duration)
    window = _seconds(props.duplicate_detection_history_time_window)
    _purge_live(url)

    def opener(auto_renew: bool) -> OutboxQueue:
        return ServiceBusQueue.from_url(url, lock_renewal=300.0 if auto_renew else 0.0)

    max_delivery_count = props.max_delivery_count or 10  # the service's default
    return Backend("azure", lock, max_delivery_count, window, 10.0, 3.0, opener, clock_slack=30.0)


def _seconds(value: timedelta | str | None) -> float:
    """A queue property's duration; the administration client types it loosely."""
    if not isinstance(value, timedelta):
        raise AssertionError(f"expected a duration from the administration client, got {value!r}")
    return value.total_seconds()


def _purge_live(url: str) -> None:
    """Leave the live queue and its dead letters empty, as every test expects."""
    from azure.servicebus import NEXT_AVAILABLE_SESSION, ServiceBusReceiveMode, ServiceBusSubQueue
    from azure.servicebus.exceptions import OperationTimeoutError

    settings = parse_queue_url(url)
    credential = None
    if settings.connection_string is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    with settings.client(credential) as client:
        while True:
            try:
                with client.get_queue_receiver(
                    settings.queue,
                    session_id=NEXT_AVAILABLE_SESSION,
                    max_wait_time=2,
                    receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE,
                ) as receiver:
                    while receiver.receive_messages(max_message_count=100, max_wait_time=2):
                        pass
            except OperationTimeoutError:
                break
        with client.get_queue_receiver(
            settings.queue,
            sub_queue=ServiceBusSubQueue.DEAD_LETTER,
            receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE,
        ) as dead:
            while dead.receive_messages(max_message_count=100, max_wait_time=2):
                pass


@pytest.fixture(
    params=[
        "sqlite",
        "servicebus",
        pytest.param(
            "azure",
            marks=[
                pytest.mark.azure,
                pytest.mark.skipif(not os.environ.get(LIVE_ENV), reason=f"{LIVE_ENV} is not set"),
            ],
        ),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        chosen = _sqlite_backend(tmp_path)
    elif request.param == "servicebus":
        chosen = _broker_backend(request.getfixturevalue("broker"))
    else:
        chosen = _live_backend()
    yield chosen
    chosen.close_all()


@pytest.fixture
def ids() -> Callable[[str], str]:
    """Ids unique to the test, so a live queue's duplicate detection never sees a rerun's."""
    prefix = uuid.uuid4().hex[:8]
    return lambda name: f"{prefix}-{name}"


def make(ids: Callable[[str], str]) -> Callable[..., OutboxMessage]:
    def msg(name: str, session: str = "s1", body: bytes | None = None) -> OutboxMessage:
        return OutboxMessage(
            body=body if body is not None else name.encode(),
            message_id=ids(name),
            session_id=ids(session),
            application_properties={"kind": "checkpoint", "n": 7},
        )

    return msg


def receive_n(queue: OutboxReceiver, count: int, wait: float) -> list[ReceivedMessage]:
    """Receive until ``count`` messages came (a receive may stop at a session's end)."""
    got: list[ReceivedMessage] = []
    deadline = time.monotonic() + wait * 3
    while len(got) < count and time.monotonic() < deadline:
        got += queue.receive(count - len(got), wait)
    return got


# --- the contract -----------------------------------------------------------------------------


def test_contract_backends_implement_the_protocols(backend: Backend) -> None:
    queue = backend.open()
    for protocol in (OutboxSender, OutboxReceiver, DeadLetterStore, OutboxQueue):
        assert isinstance(queue, protocol)


def test_contract_publish_receive_complete(backend: Backend, ids: Callable[[str], str]) -> None:
    msg = make(ids)
    queue = backend.open()
    before = time.time()
    queue.send([msg("a"), msg("b")])

    received = receive_n(queue, 2, backend.wait)

    assert [m.message_id for m in received] == [ids("a"), ids("b")]
    first = received[0]
    assert (first.body, first.session_id) == (b"a", ids("s1"))
    assert first.application_properties == {"kind": "checkpoint", "n": 7}
    assert [m.delivery_count for m in received] == [0, 0]  # 0-based, as the Python SDK
    assert before - backend.clock_slack <= first.enqueued_time <= time.time() + backend.clock_slack
    assert first.locked_until > time.time()
    assert received[0].lock_token != received[1].lock_token
    assert received[0].sequence_number < received[1].sequence_number

    queue.complete(received)

    assert queue.receive(10, backend.empty_wait) == []
    with pytest.raises(LockLostError) as lost:
        queue.complete(received[:1])
    assert lost.value.sequence_numbers == (first.sequence_number,)


def test_contract_abandon_redelivers_with_delivery_count_plus_one(
    backend: Backend, ids: Callable[[str], str]
) -> None:
    queue = backend.open()
    queue.send([make(ids)("a")])
    (first,) = receive_n(queue, 1, backend.wait)

    queue.abandon([first])

    (again,) = receive_n(queue, 1, backend.wait)
    assert again.message_id == ids("a")
    assert again.delivery_count == first.delivery_count + 1 == 1
    assert again.lock_token != first.lock_token
    with pytest.raises(LockLostError):
        queue.complete([first])  # the first delivery's token is dead
    queue.complete([again])


def test_contract_lock_expiry_redelivers_and_stale_settlement_fails(
    backend: Backend, ids: Callable[[str], str]
) -> None:
    holder, other = backend.open(auto_renew=False), backend.open(auto_renew=False)
    holder.send([make(ids)("a")])
    (first,) = receive_n(holder, 1, backend.wait)
    assert other.receive(10, backend.empty_wait) == []  # locked

    time.sleep(max(first.locked_until - time.time(), 0) + 0.3)

    (again,) = receive_n(other, 1, backend.wait)
    assert (again.message_id, again.delivery_count) == (ids("a"), 1)
    with pytest.raises(LockLostError) as lost:
        holder.complete([first])
    assert lost.value.sequence_numbers == (first.sequence_number,)
    other.complete([again])


def test_contract_renew_keeps_the_lock(backend: Backend, ids: Callable[[str], str]) -> None:
    msg = make(ids)
    holder, other = backend.open(auto_renew=False), backend.open(auto_renew=False)
    holder.send([msg("a"), msg("b")])
    received = receive_n(holder, 2, backend.wait)
    first_lock = received[0].locked_until
    renewals: list[list[float]] = []
    stop = threading.Event()

    def renew_like_a_worker() -> None:  # from another thread, as the worker's renewer does
        while not stop.wait(backend.lock_duration / 3):
            renewals.append(holder.renew_locks(received))

    renewer = threading.Thread(target=renew_like_a_worker)
    renewer.start()
    try:
        time.sleep(max(first_lock - time.time(), 0) + 0.2)  # past the first lock
        assert other.receive(10, backend.empty_wait) == []
    finally:
        stop.set()
        renewer.join()

    assert renewals and all(len(r) == 2 for r in renewals)
    assert all(until > first_lock for until in renewals[-1])
    holder.complete(received)  # still ours, with the original lock tokens


def test_contract_max_delivery_dead_letters_with_reason(
    backend: Backend, ids: Callable[[str], str]
) -> None:
    queue = backend.open()
    queue.send([make(ids)("poison", body=b"poison")])
    counts = []
    for _ in range(backend.max_delivery_count):
        (m,) = receive_n(queue, 1, backend.wait)
        counts.append(m.delivery_count)
        queue.abandon([m])

    assert counts == list(range(backend.max_delivery_count))
    assert queue.receive(10, backend.empty_wait) == []
    (dead,) = queue.list_dead_letters()
    assert dead.message_id == ids("poison")
    assert dead.reason == MAX_DELIVERY_COUNT_EXCEEDED == "MaxDeliveryCountExceeded"
    assert dead.delivery_count == backend.max_delivery_count
    assert dead.body == b"poison"


def test_contract_explicit_dead_letter_keeps_reason_and_description(
    backend: Backend, ids: Callable[[str], str]
) -> None:
    queue = backend.open()
    queue.send([make(ids)("bad")])
    (m,) = receive_n(queue, 1, backend.wait)

    queue.dead_letter(m, "SchemaMismatch", "column Foo is missing in table Events")

    assert queue.receive(10, backend.empty_wait) == []
    (dead,) = queue.list_dead_letters()
    assert (dead.reason, dead.description) == (
        "SchemaMismatch",
        "column Foo is missing in table Events",
    )
    assert (dead.message_id, dead.session_id, dead.body) == (ids("bad"), ids("s1"), b"bad")
    assert dead.application_properties == {"kind": "checkpoint", "n": 7}
    assert dead.enqueued_time == pytest.approx(m.enqueued_time, abs=0.01)
    assert dead.dead_lettered_time >= dead.enqueued_time
    assert dead.delivery_count == 1
    with pytest.raises(LockLostError):
        queue.complete([m])


def test_contract_dead_letters_listed_resent_and_deleted(
    backend: Backend, ids: Callable[[str], str]
) -> None:
    msg = make(ids)
    queue = backend.open()
    queue.send([msg(f"m{i}", f"s{i}") for i in range(3)])
    received = sorted(receive_n(queue, 3, backend.wait), key=lambda m: m.sequence_number)
    for m in received:
        queue.dead_letter(m, "Broken", f"because {m.message_id}")

    dead = queue.list_dead_letters()
    assert [d.message_id for d in dead] == [ids("m0"), ids("m1"), ids("m2")]
    assert [d.description for d in dead] == [f"because {ids(f'm{i}')}" for i in range(3)]
    assert [d.message_id for d in queue.list_dead_letters(limit=2)] == [ids("m0"), ids("m1")]

    queue.resend_dead_letter(dead[1].sequence_number)  # within the dedup window on purpose

    (replayed,) = receive_n(queue, 1, backend.wait)
    assert replayed.message_id == replay_message_id(ids("m1"), dead[1].sequence_number)
    assert (replayed.session_id, replayed.body) == (ids("s1"), b"m1")
    assert replayed.application_properties == {"kind": "checkpoint", "n": 7}
    assert replayed.delivery_count == 0
    queue.complete([replayed])
    assert [d.message_id for d in queue.list_dead_letters()] == [ids("m0"), ids("m2")]

    queue.delete_dead_letter(dead[0].sequence_number)

    assert [d.message_id for d in queue.list_dead_letters()] == [ids("m2")]
    with pytest.raises(KeyError, match="list_dead_letters"):
        queue.resend_dead_letter(dead[0].sequence_number)
    with pytest.raises(KeyError, match="No dead letter with sequence number"):
        queue.delete_dead_letter(dead[1].sequence_number)


def test_contract_duplicate_message_id_dropped_within_the_window(
    backend: Backend, ids: Callable[[str], str]
) -> None:
    msg = make(ids)
    queue = backend.open()
    sending = time.monotonic()
    queue.send([msg("a", body=b"first"), msg("a", body=b"same call"), msg("b")])
    accepted = time.monotonic()
    queue.send([msg("a", body=b"retry")])

    received = receive_n(queue, 2, backend.wait)

    assert queue.receive(10, backend.empty_wait) == []
    assert sorted((m.message_id, m.body) for m in received) == [
        (ids("a"), b"first"),
        (ids("b"), b"b"),
    ]
    queue.complete(received)
    queue.send([msg("a", body=b"after completion")])  # detection outlives consumption
    assert time.monotonic() - sending < backend.duplicate_detection_window  # still within
    assert queue.receive(10, backend.empty_wait) == []
    if backend.duplicate_detection_window <= 5:  # a live queue's window is 20 s at least
        time.sleep(max(accepted + backend.duplicate_detection_window + 0.2 - time.monotonic(), 0))
        queue.send([msg("a", body=b"after window")])
        (late,) = receive_n(queue, 1, backend.wait)
        assert late.body == b"after window"
        queue.complete([late])


def test_contract_fifo_per_session(backend: Backend, ids: Callable[[str], str]) -> None:
    msg = make(ids)
    queue = backend.open()
    for i in range(20):
        queue.send([msg(f"x{i}", "x")])
        queue.send([msg(f"y{i}", "y")])
    order: dict[str, list[int]] = defaultdict(list)
    deadline = time.monotonic() + 30
    while sum(map(len, order.values())) < 40 and time.monotonic() < deadline:
        batch = queue.receive(7, backend.wait)
        for m in batch:
            order[m.session_id].append(int(m.body[1:]))
        queue.complete(batch)
    assert order == {ids("x"): list(range(20)), ids("y"): list(range(20))}


def test_contract_abandoned_head_of_a_session_comes_back_first(
    backend: Backend, ids: Callable[[str], str]
) -> None:
    msg = make(ids)
    queue = backend.open()
    queue.send([msg("m0"), msg("m1"), msg("m2")])
    head, second = receive_n(queue, 2, backend.wait)
    assert (head.message_id, second.message_id) == (ids("m0"), ids("m1"))
    queue.abandon([head])  # still holding m1: the session stays ours

    rest = receive_n(queue, 2, backend.wait)

    assert [m.message_id for m in rest] == [ids("m0"), ids("m2")]
    queue.complete([second, *rest])


def test_contract_one_consumer_per_session_at_a_time(
    backend: Backend, ids: Callable[[str], str]
) -> None:
    msg = make(ids)
    a, b = backend.open(), backend.open()
    a.send([msg(f"{s}-{i}", s) for s in ("s1", "s2") for i in range(2)])

    (first,) = a.receive(1, backend.wait)
    mine = first.session_id
    other = ids("s2") if mine == ids("s1") else ids("s1")
    # b may not take the rest of a's session, even though that message is not locked.
    taken_by_b = receive_n(b, 2, backend.wait)
    assert [m.session_id for m in taken_by_b] == [other, other]
    assert b.receive(10, backend.empty_wait) == []
    (second,) = a.receive(10, backend.wait)
    assert second.session_id == mine

    b.complete(taken_by_b)
    a.complete([first, second])
    assert a.receive(10, backend.empty_wait) == []  # a holds nothing now: the session is free
    a.send([OutboxMessage(b"late", ids("late"), mine)])
    (late,) = receive_n(b, 1, backend.wait)
    assert (late.message_id, late.session_id) == (ids("late"), mine)
    b.complete([late])


def test_contract_ids_over_128_characters_keep_one_session(
    backend: Backend, ids: Callable[[str], str]
) -> None:
    thread = ids("t" * 300)
    queue = backend.open()
    queue.send([OutboxMessage(f"{i}".encode(), ids(f"m{i}"), thread) for i in range(3)])
    queue.send([OutboxMessage(b"dup", ids("x" * 200), thread)] * 2)

    received = receive_n(queue, 4, backend.wait)

    assert {m.session_id for m in received} == {queue_id(thread)}
    assert len(queue_id(thread)) <= 128
    assert [m.body for m in received] == [b"0", b"1", b"2", b"dup"]
    assert received[-1].message_id == queue_id(ids("x" * 200))
    queue.complete(received)


# --- Service Bus over the wire: what only this backend has -------------------------------------


def _broker_queue(broker: AmqpTestBroker, **settings: Any) -> str:
    name = f"q{uuid.uuid4().hex[:10]}"
    broker.add_queue(name, QueueSettings(**settings))
    return name


def test_batches_are_cut_at_the_standard_link_limit(
    broker: AmqpTestBroker, sb: Callable[..., ServiceBusQueue]
) -> None:
    name = _broker_queue(broker, max_message_size=STANDARD)
    queue = sb(name)
    assert queue.size_limits() == SizeLimits(STANDARD, STANDARD)
    assert queue.max_message_bytes == STANDARD - HEADER_RESERVE_BYTES
    bodies = [bytes([i]) * (100 * KB) for i in range(5)]

    queue.send([OutboxMessage(b, f"m{i}", "s1") for i, b in enumerate(bodies)])

    assert [m.body_bytes for m in broker.active(name)] == bodies
    assert broker.transfers(name) == 3  # 2 + 2 + 1 messages of 100 KB in 256 KB batches
    with pytest.raises(MessageTooLargeError, match=f"max_message_bytes={STANDARD - 4096}"):
        queue.send(
            [OutboxMessage(b"x", "small", "s1"), OutboxMessage(b"y" * STANDARD, "big", "s1")]
        )
    assert len(broker.active(name)) == 5  # nothing of the failed call was sent


def test_a_large_message_goes_alone_on_premium(
    broker: AmqpTestBroker, sb: Callable[..., ServiceBusQueue]
) -> None:
    name = _broker_queue(broker, max_message_size=4 * MB)
    big = b"z" * (2 * MB)
    queue = sb(name)
    assert queue.size_limits() == SizeLimits(4 * MB, PREMIUM_BATCH)

    queue.send(
        [
            OutboxMessage(b"a", "a", "s1"),
            OutboxMessage(big, "big", "s1"),
            OutboxMessage(b"c", "c", "s1"),
        ]
    )

    assert broker.transfers(name) == 3
    received = receive_n(queue, 3, 3.0)
    assert [m.body for m in received] == [b"a", big, b"c"]
    queue.complete(received)


def test_auto_lock_renewer_keeps_the_session_while_a_batch_is_processed(
    broker: AmqpTestBroker, sb: Callable[..., ServiceBusQueue]
) -> None:
    name = _broker_queue(broker, lock_duration=2.0)
    worker, other = sb(name, lock_renewal=30), sb(name)
    worker.send([OutboxMessage(b"a", "a", "s1"), OutboxMessage(b"b", "b", "s2")])
    held = receive_n(worker, 1, 3.0)

    time.sleep(2.6)  # ingesting, longer than the lock

    taken = other.receive(10, 0.5)
    assert {m.session_id for m in taken} <= {"s1", "s2"} - {held[0].session_id}
    worker.complete(held)  # still ours: the renewer kept the session lock
    other.complete(taken)


def test_the_worker_drains_service_bus_unchanged(
    broker: AmqpTestBroker, sb: Callable[..., ServiceBusQueue]
) -> None:
    """The real ingestor worker on this backend, its lock renewer thread included: chunked
    events of three threads are each ingested once, in thread order, and the queue drains."""
    name = _broker_queue(broker, lock_duration=BROKER_LOCK)
    saver, queue = sb(name), sb(name, lock_renewal=30)
    events = [
        Event(
            kind=EventKind.PUT,
            event_id=f"t{t}-e{i}",
            seq=i + 1,
            published_at=time.time(),
            thread_id=f"thread-{t}",
            checkpoint_id=f"c{i}",
            checkpoint_data=bytes([i]) * (300 * KB if i == 1 else 10),  # e1 spans 2 messages
        )
        for t in range(3)
        for i in range(4)
    ]
    for event in events:
        frames = split_frames(event.event_id, encode_event(event), saver.max_message_bytes)
        saver.send([OutboxMessage(encode_frame(f), f.message_id, event.thread_id) for f in frames])
    assert len(broker.active(name)) == len(events) + 3

    ingested: list[dict[str, Any]] = []

    class Collect:
        def ingest(self, rows: Sequence[dict[str, Any]], encoded: bytes | None = None) -> None:
            # The worker hands over the body it already encoded, byte-equal to the rows.
            assert encoded == encode_rows(rows)
            ingested.extend(rows)

    worker = Worker(queue, Collect(), max_wait=0.5)
    stop = threading.Event()
    runner = threading.Thread(target=worker.run, args=(stop,))
    runner.start()
    deadline = time.monotonic() + 30
    while len({r["EventId"] for r in ingested}) < len(events) and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    runner.join(timeout=30)

    order: dict[str, list[str]] = defaultdict(list)
    for row in ingested:
        if row["EventId"] not in order[row["ThreadId"]]:
            order[row["ThreadId"]].append(row["EventId"])
    assert order == {f"thread-{t}": [f"t{t}-e{i}" for i in range(4)] for t in range(3)}
    expected = [row for event in events for row in event_rows(event)]
    assert sorted(map(repr, ingested)) == sorted(map(repr, expected))  # each row once
    assert broker.active(name) == [] and broker.dead_letters(name) == []


def test_async_sender_publishes_over_the_wire(broker: AmqpTestBroker) -> None:
    name = _broker_queue(broker)
    url = broker.connection_string(name)

    async def publish() -> None:
        sender = open_async_sender(url)
        assert isinstance(sender, AsyncServiceBusSender)
        try:
            await sender.send([OutboxMessage(b"a", "a", "s1"), OutboxMessage(b"b", "b", "s1")])
            await sender.send([OutboxMessage(b"a", "a", "s1")])  # a retry: dropped
            assert await sender.size_limits() == SizeLimits(STANDARD, STANDARD)
        finally:
            await sender.close()

    asyncio.run(publish())
    assert [(m.message_id, m.body_bytes) for m in broker.active(name)] == [("a", b"a"), ("b", b"b")]


def test_async_sends_made_together_share_a_round_trip_and_fail_alone(
    broker: AmqpTestBroker,
) -> None:
    name = _broker_queue(broker, max_message_size=STANDARD)

    async def publish() -> list[Any]:
        sender = open_async_sender(broker.connection_string(name))
        try:
            await sender.send([OutboxMessage(b"warm-up", "w", "s0")])
            before = broker.transfers(name)
            await asyncio.gather(
                sender.send([OutboxMessage(b"put", "p", "s1")]),
                sender.send([OutboxMessage(b"writes", "w1", "s1")]),
            )
            assert broker.transfers(name) == before + 1  # one batch: same session, one trip
            return await asyncio.gather(
                sender.send([OutboxMessage(b"a", "a", "s2")]),
                sender.send([OutboxMessage(b"y" * STANDARD, "big", "s2")]),
                sender.send([OutboxMessage(b"b", "b", "s2")]),
                return_exceptions=True,
            )
        finally:
            await sender.close()

    results = asyncio.run(publish())
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], MessageTooLargeError)
    assert [m.message_id for m in broker.active(name)] == ["w", "p", "w1", "a", "b"]


def test_batches_sent_are_made_by_the_sending_sdk_sender(
    broker: AmqpTestBroker, sb: Callable[..., ServiceBusQueue]
) -> None:
    """A batch built for another AMQP transport than the sender's is rebuilt by the SDK at
    send time, every message encoded again (the aio sender paid that on every send)."""
    name = _broker_queue(broker)
    messages = [OutboxMessage(b"a", "a", "s1"), OutboxMessage(b"b", "b", "s1")]

    def spy(sdk_sender: Any) -> tuple[list[Any], list[Any]]:
        made: list[Any] = []
        sent: list[Any] = []
        create, send = sdk_sender.create_message_batch, sdk_sender.send_messages

        def create_message_batch(*args: Any, **kwargs: Any) -> Any:
            result = create(*args, **kwargs)
            if asyncio.iscoroutine(result):

                async def made_async() -> Any:
                    made.append(await result)
                    return made[-1]

                return made_async()
            made.append(result)
            return result

        def send_messages(item: Any, **kwargs: Any) -> Any:
            sent.append(item)
            return send(item, **kwargs)

        sdk_sender.create_message_batch = create_message_batch
        sdk_sender.send_messages = send_messages
        return made, sent

    queue = sb(name)
    made, sent = spy(queue._open_sender())
    queue.send(messages)
    assert len(sent) == 1 and all(any(item is m for m in made) for item in sent)

    async def publish() -> tuple[list[Any], list[Any]]:
        sender = open_async_sender(broker.connection_string(name))
        assert isinstance(sender, AsyncServiceBusSender)
        try:
            spied = spy(await sender._open_sender())
            await sender.send([OutboxMessage(b"c", "c", "s1"), OutboxMessage(b"d", "d", "s1")])
            return spied
        finally:
            await sender.close()

    made, sent = asyncio.run(publish())
    assert len(sent) == 1 and all(any(item is m for m in made) for item in sent)
    assert [m.message_id for m in broker.active(name)] == ["a", "b", "c", "d"]


def test_an_unknown_queue_says_what_to_do(sb: Callable[..., ServiceBusQueue]) -> None:
    queue = sb("missing")
    with pytest.raises(OutboxError, match="Create the queue with sessions enabled"):
        queue.send([OutboxMessage(b"a", "a", "s1")])
    with pytest.raises(OutboxError, match="queue 'missing'"):
        queue.receive(1, 0.1)


def test_open_queue_picks_the_backend_by_url(broker: AmqpTestBroker, tmp_path: Path) -> None:
    queue = open_queue(broker.connection_string("any"))
    assert isinstance(queue, ServiceBusQueue)
    assert "not-a-secret" not in repr(queue)
    close_later(queue)
    local = open_queue(f"sqlite:///{tmp_path / 'q.db'}")
    assert isinstance(local, SqliteQueue)
    local.close()
    with pytest.raises(ValueError, match="EntityPath") as error:
        open_queue(
            "Endpoint=sb://x.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=s3cret"
        )
    assert "s3cret" not in str(error.value)
    with pytest.raises(ValueError, match=r"SharedAccessKey=\*\*\*") as error:
        open_queue("HostName=x;SharedAccessKey=s3cret")
    assert "s3cret" not in str(error.value)
    with pytest.raises(ValueError, match="sqlite:///<path>"):
        open_queue("amqp://somewhere/q")
    with pytest.raises(ValueError, match="sqlite:///<path>"):
        open_async_sender("amqp://somewhere/q")
    sender = open_sender(f"sqlite:///{tmp_path / 'q.db'}")
    assert isinstance(sender, SqliteQueue)
    sender.close()


# --- the SDK boundary, offline ----------------------------------------------------------------


def sb_message(body: bytes, session: str = "s1", message_id: str = "m") -> ServiceBusMessage:
    return ServiceBusMessage(body, message_id=message_id, session_id=session)


def plan_offline(messages: list[ServiceBusMessage], limits: SizeLimits) -> list[Any]:
    """``plan_sends`` with batches as a sender on a link of ``limits`` makes them."""
    return run_plan(
        plan_sends(messages, limits),
        lambda: ServiceBusMessageBatch(max_size_in_bytes=limits.max_batch_bytes),
    )


def test_plan_fills_standard_batches_to_their_real_limit() -> None:
    limits = SizeLimits(STANDARD, STANDARD)
    messages = [sb_message(b"x" * (60 * KB), message_id=f"m{i}") for i in range(9)]

    plan = plan_offline(messages, limits)

    assert [type(item) for item in plan] == [ServiceBusMessageBatch] * 3
    assert [len(item) for item in plan if isinstance(item, ServiceBusMessageBatch)] == [4, 4, 1]
    assert all(
        item.size_in_bytes <= STANDARD for item in plan if isinstance(item, ServiceBusMessageBatch)
    )
    # the fifth 60 KB message really did not fit: the SDK's own batch refuses it
    full = plan[0]
    assert isinstance(full, ServiceBusMessageBatch)
    with pytest.raises(MessageSizeExceededError):
        full.add_message(sb_message(b"x" * (60 * KB)))


def test_plan_sends_premium_messages_over_a_batch_alone_and_refuses_over_the_entity_max() -> None:
    limits = SizeLimits(PREMIUM_MESSAGE, PREMIUM_BATCH)
    small, big = (
        sb_message(b"s" * (400 * KB), message_id="s"),
        sb_message(b"b" * (5 * MB), message_id="b"),
    )

    plan = plan_offline([small, small, small, big, small], limits)

    assert [len(i) if isinstance(i, ServiceBusMessageBatch) else "alone" for i in plan] == [
        2,
        1,
        "alone",
        1,
    ]
    with pytest.raises(MessageTooLargeError, match=f"max_message_bytes={PREMIUM_MESSAGE - 4096}"):
        plan_offline([sb_message(b"x" * (PREMIUM_MESSAGE + 1))], limits)
    with pytest.raises(ValueError):  # MessageTooLargeError is a ValueError, as the SDK's is
        plan_offline([sb_message(b"x" * (STANDARD + 1))], SizeLimits(STANDARD, STANDARD))


def test_plan_never_mixes_sessions_in_a_batch() -> None:
    plan = plan_offline(
        [
            sb_message(b"1", "a"),
            sb_message(b"2", "a"),
            sb_message(b"3", "b"),
            sb_message(b"4", "a"),
        ],
        SizeLimits(STANDARD, STANDARD),
    )
    assert [len(i) for i in plan if isinstance(i, ServiceBusMessageBatch)] == [2, 1, 1]


def _delivered_bytes(delivery_count: int, properties: dict[Any, Any]) -> bytes:
    """An AMQP message as Service Bus delivers it (header, broker annotations, properties)."""
    return encode_sections(
        [
            Described(ulong(0x70), [False, None, None, False, uint(delivery_count)]),
            Described(
                ulong(0x72),
                {
                    symbol("x-opt-sequence-number"): 42,
                    symbol("x-opt-enqueued-time"): timestamp(1_700_000_000_000),
                },
            ),
            Described(
                ulong(0x73),
                ["m-1", None, None, None, None, None, None, None, None, None, "thread-1"],
            ),
            Described(ulong(0x74), dict(properties)),
            Described(ulong(0x75), b"payload"),
        ]
    )


def test_received_message_from_the_sdk_keeps_types_and_zero_based_count() -> None:
    sdk = ServiceBusReceivedMessage.from_bytes(
        _delivered_bytes(0, {"kind": "checkpoint", "part": 2})
    )
    assert sdk.application_properties == {b"kind": b"checkpoint", b"part": 2}  # the SDK's bytes

    received = to_received_message(sdk, locked_until=123.0)

    assert received.application_properties == {"kind": "checkpoint", "part": 2}
    assert (received.message_id, received.session_id, received.body) == (
        "m-1",
        "thread-1",
        b"payload",
    )
    assert (received.sequence_number, received.delivery_count) == (42, 0)
    assert received.enqueued_time == 1_700_000_000.0
    assert received.locked_until == 123.0


def test_dead_letter_from_the_sdk_drops_the_dead_letter_properties() -> None:
    sdk = ServiceBusReceivedMessage.from_bytes(
        _delivered_bytes(
            3,
            {
                "kind": "checkpoint",
                "DeadLetterReason": MAX_DELIVERY_COUNT_EXCEEDED,
                "DeadLetterErrorDescription": "delivered 3 times",
            },
        )
    )

    dead = to_dead_letter(sdk)

    assert (dead.reason, dead.description) == (MAX_DELIVERY_COUNT_EXCEEDED, "delivered 3 times")
    assert dead.application_properties == {"kind": "checkpoint"}
    assert (dead.delivery_count, dead.sequence_number) == (3, 42)
    assert dead.dead_lettered_time == dead.enqueued_time == 1_700_000_000.0


def test_sdk_errors_become_errors_that_say_what_to_do() -> None:
    where = "queue 'events' in ns.servicebus.windows.net"
    auth = _translate(ServiceBusAuthorizationError(message="Unauthorized"), "sending", where)
    assert "Azure Service Bus Data Sender" in str(auth) and where in str(auth)
    assert "connection string's key" in str(
        _translate(ServiceBusAuthenticationError(message="bad token"), "x", where)
    )
    size = _translate(MessageSizeExceededError(message="too big"), "sending", where)
    assert isinstance(size, MessageTooLargeError) and isinstance(size, ValueError)


@pytest.mark.parametrize(
    ("url", "namespace", "queue", "secret"),
    [
        ("sb://ns1.servicebus.windows.net/events", "ns1.servicebus.windows.net", "events", False),
        ("sb://ns1/events/", "ns1.servicebus.windows.net", "events", False),
        (
            "Endpoint=sb://ns2.servicebus.windows.net/;SharedAccessKeyName=send;"
            "SharedAccessKey=abc=;EntityPath=events",
            "ns2.servicebus.windows.net",
            "events",
            True,
        ),
        (
            "endpoint=sb://ns3.servicebus.chinacloudapi.cn/;"
            "sharedaccesssignature=SharedAccessSignature sr=x&sig=y&se=1;entitypath=q",
            "ns3.servicebus.chinacloudapi.cn",
            "q",
            True,
        ),
    ],
)
def test_queue_url_forms(url: str, namespace: str, queue: str, secret: bool) -> None:
    settings = parse_queue_url(url)
    assert (settings.namespace, settings.queue) == (namespace, queue)
    assert (settings.connection_string is not None) == secret
    assert "abc=" not in repr(settings) and "sig=y" not in repr(settings)
    assert "sig=y" not in redact_queue_url(url) and "abc=" not in redact_queue_url(url)


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        ("sb://ns.servicebus.windows.net/", "exactly one queue name"),
        ("sb://ns.servicebus.windows.net/a/b", "exactly one queue name"),
        ("sb://user:pw@ns/q", "connection string"),
        ("Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKey=v;EntityPath=q", "KeyName"),
        (
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=v",
            "EntityPath",
        ),
        ("Endpoint=sb://ns.servicebus.windows.net/;EntityPath=q", "SharedAccessKey"),
        ("Endpoint=;SharedAccessKey=v;EntityPath=q", "Endpoint=sb://"),
        ("Endpoint=sb://ns/;junk;EntityPath=q", "key=value"),
    ],
)
def test_bad_queue_urls_say_what_is_expected(url: str, hint: str) -> None:
    with pytest.raises(ValueError, match=hint) as error:
        parse_queue_url(url)
    assert "SharedAccessKey=v" not in str(error.value) and "pw" not in str(error.value)


def test_one_sender_is_safe_across_threads(
    broker: AmqpTestBroker, sb: Callable[..., ServiceBusQueue]
) -> None:
    name = _broker_queue(broker)
    queue = sb(name)
    batches = [[OutboxMessage(b"x", f"m{t}-{i}", f"s{t}") for i in range(5)] for t in range(4)]
    threads = [threading.Thread(target=queue.send, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    stored = broker.active(name)

    assert len(stored) == 20
    for t in range(4):
        in_session = [m.message_id for m in stored if m.session_id == f"s{t}"]
        assert in_session == [f"m{t}-{i}" for i in range(5)]
