"""Throughput of the embedded SQLite outbox, against the targets the design sets.

Prints enqueues per second (one ``send`` per message, as the saver publishes an event of
one message; and ten per ``send``), then receive+complete per second with one consumer and
with three consumer processes, each with its ratio to the target (10,000 enqueues/s,
4,000 receive+complete/s). Run: ``python bench/bench_outbox.py [--messages N]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

from langgraph.checkpoint.kusto.outbox import OutboxMessage
from langgraph.checkpoint.kusto.outbox.sqlite import SqliteQueue

ENQUEUE_TARGET = 10_000
RECEIVE_COMPLETE_TARGET = 4_000
SESSIONS = 200
BODY = b"x" * 512
"""About the size of a small checkpoint event's frame."""
DEFAULT_RECEIVE_BATCH = 100
"""Messages per ``receive`` (the worker asks for up to 500)."""


def messages(count: int, tag: str) -> list[OutboxMessage]:
    properties: dict[str, str | int] = {"kind": "checkpoint", "part": 0}
    return [
        OutboxMessage(BODY, f"{tag}-{i}", f"thread-{i % SESSIONS}", properties)
        for i in range(count)
    ]


def enqueue_rate(path: Path, count: int, per_send: int) -> float:
    outgoing = messages(count, f"e{per_send}")
    with SqliteQueue(path) as queue:
        started = time.perf_counter()
        for i in range(0, count, per_send):
            queue.send(outgoing[i : i + per_send])
        return count / (time.perf_counter() - started)


def preload(path: Path, count: int, tag: str) -> None:
    with SqliteQueue(path) as queue:
        outgoing = messages(count, tag)
        for i in range(0, count, 500):
            queue.send(outgoing[i : i + 500])


def consume(path: str, batch_size: int, start: Any, done: Any) -> None:
    with SqliteQueue(path) as queue:
        start.wait()
        handled = 0
        while batch := queue.receive(batch_size, 0.05):
            queue.complete(batch)
            handled += len(batch)
        done.put(handled)


def receive_complete_rate(path: Path, count: int, consumers: int, batch_size: int) -> float:
    preload(path, count, f"r{consumers}")
    ctx = multiprocessing.get_context("spawn")
    start, done = ctx.Barrier(consumers + 1), ctx.Queue()
    workers = [
        ctx.Process(target=consume, args=(str(path), batch_size, start, done))
        for _ in range(consumers)
    ]
    for worker in workers:
        worker.start()
    start.wait()  # the clock starts once every consumer is up (spawn start-up is slow)
    started = time.perf_counter()
    handled = sum(done.get(timeout=600) for _ in workers)
    elapsed = time.perf_counter() - started
    for worker in workers:
        worker.join()
    if handled != count:
        raise SystemExit(f"consumers handled {handled} of {count} messages")
    return count / elapsed


def report(name: str, rate: float, target: int) -> None:
    print(f"{name:<56} {rate:>8,.0f} msg/s  {rate / target:>5.2f} x target ({target:,}/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--receive-batch", type=int, default=DEFAULT_RECEIVE_BATCH)
    args = parser.parse_args()
    count, batch = args.messages, args.receive_batch
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"SQLite outbox: {count:,} messages of {len(BODY)} bytes over {SESSIONS} sessions")
        for per_send, db in ((1, "a.db"), (10, "b.db")):
            rate = enqueue_rate(root / db, count, per_send)
            report(f"enqueue, {per_send} message(s) per send", rate, ENQUEUE_TARGET)
        for consumers, db in ((1, "c.db"), (3, "d.db")):
            rate = receive_complete_rate(root / db, count, consumers, batch)
            name = f"receive+complete, {consumers} consumer process(es), {batch}/receive"
            report(name, rate, RECEIVE_COMPLETE_TARGET)


if __name__ == "__main__":
    main()
