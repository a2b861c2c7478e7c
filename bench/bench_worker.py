"""Benchmark the ingestor worker on the local stack (local Kusto server + SQLite queue).

Prints:
  * events/s for 1 and 3 worker processes draining a backlog;
  * ingestion operations per 10,000 events (from the workers' own "batch ingested" logs);
  * publish -> queryable lag p50/p99 at a steady 1,000 events/s (one worker).

    .venv/bin/python bench/bench_worker.py [--events 20000] [--threads 200]
                                           [--rate 1000] [--duration 30]

The Kusto server runs as its own process (as Kusto is elsewhere in production); workers
run as ``run_worker_command`` does in a container, with default batching settings unless
flags after ``--`` say otherwise. Lag is measured by a reader polling Kusto every
``--poll`` seconds: an event's lag is the time from its ``published_at`` to the answer of
the first query that returned it, so it includes up to one poll interval plus a query.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.kusto import KustoSaver
from langgraph.checkpoint.kusto.kusto import KustoQueries
from langgraph.checkpoint.kusto.outbox import OutboxMessage
from langgraph.checkpoint.kusto.outbox.sqlite import SqliteQueue
from langgraph.checkpoint.kusto.queries import Query
from langgraph.checkpoint.kusto.schema import provision_commands
from langgraph.checkpoint.kusto.shared.envelope import Event

DATABASE = "langgraph"
SERVICE_MODULE = "langgraph.checkpoint.kusto.ingestor_worker.service"
CLI_MODULE = "langgraph.checkpoint.kusto.ingestor_worker.cli"

COUNT_EVENTS = """\
declare query_parameters(prefix:string);
CheckpointEvents
| where ThreadId startswith prefix and RowKind != "dead_letter"
| distinct EventId
| count"""

# Only events published after the oldest one not seen yet: the answer stays small.
NEW_EVENTS = """\
declare query_parameters(prefix:string, since:long);
CheckpointEvents
| where ThreadId startswith prefix and RowKind == "checkpoint" and EventSeq >= since
| project EventId"""


@contextmanager
def local_kusto(data_dir: Path) -> Iterator[str]:
    """``langgraph-kusto local-kusto`` in its own process; yields its URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", CLI_MODULE, "local-kusto", "--port", "0", "--data", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        if not url.startswith("http"):
            raise RuntimeError("the local Kusto server did not start")
        queries = KustoQueries(url, DATABASE)
        for command in provision_commands():
            queries.command(command)
        queries.close()
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


class EventFactory:
    """Checkpoint events built by the saver's own code, without a queue."""

    def __init__(self) -> None:
        self._saver = KustoSaver(cast(Any, None), cast(Any, None), consistency="eventual")
        self._step = 0

    def build(self, thread_id: str) -> tuple[Event, list[OutboxMessage]]:
        checkpoint = empty_checkpoint()
        checkpoint["id"] = str(uuid6(clock_seq=self._step % 16384))
        checkpoint["channel_values"] = {"step": self._step}
        checkpoint["channel_versions"] = {"step": self._saver.get_next_version(None, None)}
        event, _ = self._saver._put_event(
            {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}},
            checkpoint,
            {"source": "loop", "step": self._step},
            checkpoint["channel_versions"],
        )
        self._step += 1
        return event, self._saver._messages(event)


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    log: Path

    def records(self) -> list[dict[str, Any]]:
        lines = self.log.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def started(self) -> bool:
        return any(r["message"] == "worker started" for r in self.records())

    def operations(self) -> tuple[int, int]:
        """(ingestion operations, events) this worker reported."""
        batches = [r for r in self.records() if r["message"] == "batch ingested"]
        return len(batches), sum(r["events"] for r in batches)


@contextmanager
def workers(
    count: int, queue_url: str, cluster: str, work_dir: Path, extra: Sequence[str]
) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    for index in range(count):
        log = work_dir / f"worker-{uuid.uuid4().hex[:6]}-{index}.log"
        command = [sys.executable, "-m", SERVICE_MODULE, "--queue", queue_url]
        command += ["--cluster", cluster, "--database", DATABASE, "--health-port", "0", *extra]
        with log.open("wb") as stderr:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        started.append(WorkerProcess(process, log))
    try:
        wait_for(lambda: all(w.started() for w in started), 60, "workers to start")
        yield started
    finally:
        for worker in started:
            worker.process.send_signal(signal.SIGTERM)
        for worker in started:
            worker.process.wait(timeout=60)


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def count_events(cluster: str, prefix: str) -> int:
    queries = KustoQueries(cluster, DATABASE)
    try:
        [row] = queries.run(Query(COUNT_EVENTS, {"prefix": prefix}))
        return int(row["Count"])
    finally:
        queries.close()


def ops_per_10k(fleet: list[WorkerProcess]) -> float:
    operations = sum(w.operations()[0] for w in fleet)
    events = sum(w.operations()[1] for w in fleet)
    return operations * 10_000 / events if events else float("nan")


def throughput(
    cluster: str, work_dir: Path, worker_count: int, events: int, threads: int, extra: Sequence[str]
) -> tuple[float, float]:
    """Drain ``events`` published at once; returns (events/s, operations per 10k events)."""
    prefix = f"tp{worker_count}-{uuid.uuid4().hex[:6]}-"
    factory = EventFactory()
    messages = [m for i in range(events) for m in factory.build(f"{prefix}{i % threads}")[1]]
    queue_url = f"sqlite:///{work_dir / f'tp-{worker_count}.db'}"
    queue = SqliteQueue.from_url(queue_url)
    try:
        with workers(worker_count, queue_url, cluster, work_dir, extra) as fleet:
            started = time.monotonic()
            for start in range(0, len(messages), 1000):
                queue.send(messages[start : start + 1000])
            wait_for(lambda: queue.depth() == 0, 600, "the backlog to drain", interval=0.02)
            elapsed = time.monotonic() - started
        if count_events(cluster, prefix) != events:
            raise RuntimeError("not every event reached Kusto")
        return events / elapsed, ops_per_10k(fleet)
    finally:
        queue.close()


def steady_lag(
    cluster: str,
    work_dir: Path,
    rate: int,
    duration: float,
    threads: int,
    poll: float,
    extra: Sequence[str],
) -> tuple[float, float, int, float]:
    """Publish at ``rate`` events/s for ``duration`` s with one worker; returns (p50, p99,
    events measured, operations per 10k events). The first 5 seconds are warm-up."""
    prefix = f"lag-{uuid.uuid4().hex[:6]}-"
    queue_url = f"sqlite:///{work_dir / 'lag.db'}"
    queue = SqliteQueue.from_url(queue_url)
    factory = EventFactory()
    pending: dict[str, tuple[float, int]] = {}  # event id -> (published_at, seq)
    lags: list[tuple[float, float]] = []  # (published_at, lag)
    lock = threading.Lock()
    publishing = threading.Event()
    publishing.set()

    def publish() -> None:
        tick = 0.01
        per_tick = max(1, round(rate * tick))
        started = time.monotonic()
        sent = 0
        while time.monotonic() - started < duration:
            batch: list[OutboxMessage] = []
            for _ in range(per_tick):
                event, messages = factory.build(f"{prefix}{sent % threads}")
                with lock:
                    pending[event.event_id] = (event.published_at, event.seq)
                batch.extend(messages)
                sent += 1
            queue.send(batch)
            # An absolute schedule: a slow tick is made up for, so the rate holds.
            time.sleep(max(0.0, started + sent / rate - time.monotonic()))
        publishing.clear()

    def watch() -> None:
        queries = KustoQueries(cluster, DATABASE)
        try:
            while publishing.is_set() or pending:
                with lock:
                    since = min((seq for _, seq in pending.values()), default=None)
                if since is not None:
                    rows = queries.run(Query(NEW_EVENTS, {"prefix": prefix, "since": since}))
                    answered = time.time()
                    with lock:
                        for row in rows:
                            found = pending.pop(str(row["EventId"]), None)
                            if found is not None:
                                lags.append((found[0], answered - found[0]))
                time.sleep(poll)
        finally:
            queries.close()

    try:
        with workers(1, queue_url, cluster, work_dir, extra) as fleet:
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            begin = time.time()
            publish()
            watcher.join(timeout=120)
        measured = sorted(lag for at, lag in lags if at >= begin + 5)
        cuts = statistics.quantiles(measured, n=100)
        return cuts[49], cuts[98], len(measured), ops_per_10k(fleet)
    finally:
        queue.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="backlog per throughput run")
    parser.add_argument("--threads", type=int, default=200, help="LangGraph threads (sessions)")
    parser.add_argument("--rate", type=int, default=1000, help="events/s for the lag run")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of the lag run")
    parser.add_argument("--poll", type=float, default=0.05, help="reader poll interval (s)")
    parser.add_argument("worker_flags", nargs="*", help="after --: extra worker flags")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        work_dir = Path(tmp)
        with local_kusto(work_dir / "kusto") as cluster:
            print(f"local stack: Kusto {cluster} in its own process, SQLite queue")
            flags = " ".join(args.worker_flags) or "none"
            print(f"machine: {os.cpu_count()} CPUs; worker flags beyond the defaults: {flags}")
            for count in (1, 3):
                rate, ops = throughput(
                    cluster, work_dir, count, args.events, args.threads, args.worker_flags
                )
                print(
                    f"{count} worker(s): {rate:,.0f} events/s draining {args.events:,} events of "
                    f"{args.threads} threads; {ops:.1f} ingestion operations per 10,000 events"
                )
            p50, p99, measured, ops = steady_lag(
                cluster,
                work_dir,
                args.rate,
                args.duration,
                args.threads,
                args.poll,
                args.worker_flags,
            )
            print(
                f"steady {args.rate:,} events/s, 1 worker: publish->queryable lag "
                f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms over {measured:,} events "
                f"(poll every {args.poll * 1000:.0f} ms); {ops:.1f} ingestion operations per "
                "10,000 events"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
