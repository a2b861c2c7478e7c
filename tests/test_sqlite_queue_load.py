"""The SQLite outbox under load: one producer process, three consumer processes, 20,000
messages over 200 sessions. Every message is completed exactly once and each session's
messages are taken in the order they were sent, although consumers change sessions all
the time."""

from __future__ import annotations

import multiprocessing
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.kusto.outbox import LockLostError, OutboxMessage
from langgraph.checkpoint.kusto.outbox.sqlite import SqliteQueue

SESSIONS = 200
PER_SESSION = 100
CONSUMERS = 3
SEND_CHUNK = 50
"""Messages per ``send``: one round of sessions goes out in four transactions."""

pytestmark = pytest.mark.slow


def _produce(path: str, start: Any) -> None:
    with SqliteQueue(path) as queue:
        start.wait()
        for index in range(PER_SESSION):
            round_ = [
                OutboxMessage(f"{s}:{index}".encode(), f"{s}:{index}", f"thread-{s}")
                for s in range(SESSIONS)
            ]
            for i in range(0, SESSIONS, SEND_CHUNK):
                queue.send(round_[i : i + SEND_CHUNK])


def _consume(path: str, start: Any, produced: Any, ticket: Any, results: Any) -> None:
    """Receive, stamp each message with a global ticket while its lock is held, complete.

    A session is held by one consumer at a time, so the tickets of one session's messages
    give the order in which the consumers, together, took them."""
    completed: list[tuple[int, int, int, int]] = []
    lost = 0
    with SqliteQueue(path) as queue:
        start.wait()
        while True:
            batch = queue.receive(max_messages=100, max_wait=0.05)
            if not batch:
                if produced.is_set() and queue.depth() == 0:
                    break
                continue
            with ticket.get_lock():
                first = ticket.value + 1
                ticket.value += len(batch)
            try:
                queue.complete(batch)
            except LockLostError:
                lost += 1
                continue
            for offset, message in enumerate(batch):
                session, index = map(int, message.body.decode().split(":"))
                completed.append((session, index, first + offset, message.delivery_count))
    results.put((completed, lost))


def test_one_producer_three_consumers_20000_messages_over_200_sessions(tmp_path: Path) -> None:
    path = str(tmp_path / "outbox.db")
    SqliteQueue(path).close()  # schema in place before the race starts
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(CONSUMERS + 1)  # nobody begins before all are up: spawn is slow
    produced, ticket, results = ctx.Event(), ctx.Value("q", 0), ctx.Queue()
    consumers = [
        ctx.Process(target=_consume, args=(path, start, produced, ticket, results))
        for _ in range(CONSUMERS)
    ]
    for process in consumers:
        process.start()
    producer = ctx.Process(target=_produce, args=(path, start))
    producer.start()
    producer.join(timeout=120)
    assert producer.exitcode == 0
    produced.set()
    outcomes = [results.get(timeout=120) for _ in consumers]
    for process in consumers:
        process.join(timeout=30)
        assert process.exitcode == 0

    everything = [c for completed, _ in outcomes for c in completed]
    assert sum(lost for _, lost in outcomes) == 0  # no lock ran out, no settlement failed
    assert len(everything) == SESSIONS * PER_SESSION  # each completed once: no duplicates...
    assert {(s, i) for s, i, _, _ in everything} == {
        (s, i) for s in range(SESSIONS) for i in range(PER_SESSION)
    }  # ... and nothing lost
    assert all(count == 0 for *_, count in everything)  # nothing needed a redelivery
    by_session: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for session, index, stamp, _ in everything:
        by_session[session].append((stamp, index))
    for session, stamped in by_session.items():
        assert [index for _, index in sorted(stamped)] == list(range(PER_SESSION)), session
    shares = [len(completed) for completed, _ in outcomes]
    assert all(share > 0 for share in shares), shares  # all three took part
    consumers_of: dict[int, set[int]] = defaultdict(set)
    for consumer, (completed, _) in enumerate(outcomes):
        for session, *_ in completed:
            consumers_of[session].add(consumer)
    # Sessions changed hands, so the order above held across consumers, not within one.
    # (How many depends on scheduling on a shared machine; one is enough to prove it.)
    assert any(len(c) > 1 for c in consumers_of.values())
    with SqliteQueue(path) as queue:
        assert (queue.depth(), queue.dead_letter_count()) == (0, 0)
