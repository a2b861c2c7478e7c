"""Worker processes on the local stack: SIGKILL crashes, three workers on one queue, SIGTERM.

Workers run as the service runs in a container (``run_worker_command`` in a subprocess,
through ``python -m ...ingestor_worker.service``), against the shared local Kusto server
(directly, or behind the fault proxy, which records every ingestion Kusto accepted).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fault_proxy import (
    FaultProxy,
    assert_readable_exactly_once,
    build_checkpoints,
    count_events,
    rows_by_event,
    send_all,
    wait_until,
)
from langgraph.checkpoint.kusto.ingestor_worker.ingest import KustoIngestor
from langgraph.checkpoint.kusto.ingestor_worker.worker import Worker
from langgraph.checkpoint.kusto.outbox.sqlite import SqliteQueue
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

DATABASE = "langgraph"
SERVICE_MODULE = "langgraph.checkpoint.kusto.ingestor_worker.service"


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    log: Path

    def records(self) -> list[dict[str, Any]]:
        lines = self.log.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def events_ingested(self) -> int:
        return sum(r["events"] for r in self.records() if r["message"] == "batch ingested")

    def wait_started(self, timeout: float) -> bool:
        """Until the worker logs that it runs (and so handles SIGTERM)."""
        return wait_until(
            lambda: any(r["message"] == "worker started" for r in self.records()), timeout
        )

    def terminate(self, timeout: float) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds until exit)."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        return code, time.monotonic() - started


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    started: list[WorkerProcess] = []

    def start(
        queue_url: str, cluster: str, *flags: str, env: dict[str, str] | None = None
    ) -> WorkerProcess:
        log = tmp_path / f"worker-{len(started)}.log"
        command = [sys.executable, "-m", SERVICE_MODULE, "--queue", queue_url]
        command += ["--cluster", cluster, "--database", DATABASE, "--max-wait", "0.05"]
        command += ["--health-port", "0", *flags]
        with log.open("wb") as stderr:
            process = subprocess.Popen(
                command,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**os.environ, **(env or {})},
            )
        started.append(WorkerProcess(process, log))
        return started[-1]

    yield start
    for worker in started:
        if worker.process.poll() is None:
            worker.process.kill()
        worker.process.wait(timeout=10)


def _threads(tag: str, count: int) -> tuple[str, list[str]]:
    prefix = f"{tag}-{uuid.uuid4().hex[:8]}-"
    return prefix, [f"{prefix}{i}" for i in range(count)]


def _assert_nothing_locked_or_dead(queue_url: str) -> None:
    """A fresh consumer gets every message still queued at once: nobody holds a lock."""
    queue = SqliteQueue.from_url(queue_url)
    try:
        depth = queue.depth()
        received = queue.receive(max(depth, 1), 0) if depth else []
        assert len(received) == depth, f"{depth - len(received)} messages still locked"
        if received:
            queue.abandon(received)
        assert queue.dead_letter_count() == 0
    finally:
        queue.close()


def _queue_empty(queue_url: str) -> bool:
    queue = SqliteQueue.from_url(queue_url)
    try:
        return queue.depth() == 0
    finally:
        queue.close()


def _drain_in_process(queue_url: str, cluster: str) -> None:
    queue = SqliteQueue.from_url(queue_url)
    ingestor = KustoIngestor(cluster, DATABASE)
    worker = Worker(queue, ingestor, max_wait=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: queue.depth() == 0, 60)
    finally:
        stop.set()
        thread.join(timeout=30)
        ingestor.close()
        queue.close()


@pytest.mark.slow
def test_sigkill_at_random_moments_during_a_20000_event_load_loses_nothing(
    kusto_server: Any, private_queue: str, spawn: Any
) -> None:
    prefix, threads = _threads("crash", 200)
    published = build_checkpoints(threads, 100)
    seed = random.randrange(1 << 30)
    chance = random.Random(seed)

    def publish_gradually() -> None:
        # The load keeps arriving while workers die: 20,000 events over ~12 seconds.
        for start in range(0, len(published.messages), 500):
            send_all(private_queue, published.messages[start : start + 500])
            time.sleep(0.3)

    publisher = threading.Thread(target=publish_gradually, daemon=True)
    publisher.start()
    flags = ("--lock-duration", "2")
    for _ in range(10):
        worker = spawn(private_queue, kusto_server.url, *flags)
        time.sleep(chance.uniform(0.8, 3.0))
        assert worker.process.poll() is None, f"the worker exited early (seed {seed})"
        worker.process.send_signal(signal.SIGKILL)
        worker.process.wait(timeout=10)
    publisher.join(timeout=60)
    last = spawn(private_queue, kusto_server.url, *flags)
    total = len(published.events)
    assert wait_until(
        lambda: count_events(kusto_server.url, DATABASE, prefix) == total, 150, interval=0.5
    ), f"seed {seed}: {total - count_events(kusto_server.url, DATABASE, prefix)} events missing"
    assert wait_until(lambda: _queue_empty(private_queue), 30)
    assert last.wait_started(timeout=30)
    assert last.terminate(timeout=40)[0] == 0

    stored = rows_by_event(kusto_server.url, DATABASE, prefix)
    assert set(stored) == published.event_ids
    _assert_nothing_locked_or_dead(private_queue)
    assert_readable_exactly_once(private_queue, kusto_server.url, DATABASE, published)


def test_three_workers_drain_200_threads_in_order_without_loss_or_visible_duplicates(
    kusto_server: Any, private_queue: str, spawn: Any
) -> None:
    prefix, threads = _threads("scale", 200)
    published = build_checkpoints(threads, 100)
    send_all(private_queue, published.messages)
    with FaultProxy(kusto_server.url) as proxy:  # no faults: it records what Kusto accepted
        workers = [spawn(private_queue, proxy.url) for _ in range(3)]
        total = len(published.events)
        assert wait_until(lambda: len(proxy.ingested_events()) == total, 150, interval=0.5)
        assert wait_until(lambda: _queue_empty(private_queue), 30)
        for worker in workers:
            assert worker.wait_started(timeout=30)
            assert worker.terminate(timeout=40)[0] == 0
        ingestions = list(proxy.ingested)

    # Per thread, Kusto accepted the events in publish order (EventSeq), each event in
    # exactly one operation, whole.
    first_seen: dict[str, list[int]] = {}
    operations_of: dict[str, int] = {}
    for ingestion in ingestions:
        for event_id in ingestion.event_ids:
            operations_of[event_id] = operations_of.get(event_id, 0) + 1
        for row in ingestion.rows:
            if row.row_kind == "checkpoint":
                first_seen.setdefault(row.thread_id, []).append(row.event_seq)
    expected = {t: [e.seq for e in events] for t, events in published.by_thread().items()}
    assert first_seen == expected
    assert set(operations_of.values()) == {1}
    assert sum(len(i.rows) for i in ingestions) == 2 * total
    # All three did a share of the work, and their logs account for every event.
    shares = [worker.events_ingested() for worker in workers]
    assert all(share > 0 for share in shares), shares
    assert sum(shares) == total
    assert set(rows_by_event(kusto_server.url, DATABASE, prefix)) == published.event_ids
    _assert_nothing_locked_or_dead(private_queue)
    assert_readable_exactly_once(private_queue, kusto_server.url, DATABASE, published)


class _Collector:
    """A stand-in OpenTelemetry collector: keeps the OTLP/HTTP metric exports it receives."""

    def __init__(self) -> None:
        self.exports: list[ExportMetricsServiceRequest] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                collector.exports.append(ExportMetricsServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def last_sum(self, name: str) -> float:
        """The last exported value of a cumulative counter, all attributes summed."""
        value = 0.0
        for export in self.exports:
            for resource in export.resource_metrics:
                for scope in resource.scope_metrics:
                    for metric in scope.metrics:
                        if metric.name == name:
                            value = sum(p.as_int or p.as_double for p in metric.sum.data_points)
        return value


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _health(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        return int(response.status)


def test_sigterm_mid_batch_finishes_it_exits_0_and_exports_metrics(
    kusto_server: Any, private_queue: str, spawn: Any
) -> None:
    prefix, threads = _threads("term", 30)
    published = build_checkpoints(threads, 10)
    send_all(private_queue, published.messages)
    collector = _Collector()
    port = _free_port()
    try:
        with FaultProxy(kusto_server.url) as proxy:
            proxy.delay_ingestion(1.5)  # the batch is in Kusto's hands for a while
            worker = spawn(
                private_queue,
                proxy.url,
                "--shutdown-timeout",
                "10",
                "--max-batch-events",
                "100",
                "--health-port",
                str(port),
                env={
                    "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
                    "OTEL_METRIC_EXPORT_INTERVAL": "60000",  # only the final export, at exit
                },
            )
            assert proxy.wait_for_ingestion_requests(1, timeout=30)
            assert _health(port) == 200
            code, elapsed = worker.terminate(timeout=30)
            ingested = proxy.ingested_events()
        assert code == 0, worker.log.read_text()
        assert elapsed < 10
        # The batch in Kusto's hands when SIGTERM came was finished, and nothing else began.
        assert len(ingested) == 100
        assert set(ingested.values()) == {1}
        assert worker.events_ingested() == 100
        assert collector.last_sum("langgraph_kusto.worker.events.ingested") == 100
    finally:
        collector.close()
    _assert_nothing_locked_or_dead(private_queue)
    _drain_in_process(private_queue, kusto_server.url)
    assert set(rows_by_event(kusto_server.url, DATABASE, prefix)) == published.event_ids
    assert_readable_exactly_once(private_queue, kusto_server.url, DATABASE, published)


def test_sigterm_while_kusto_hangs_gives_the_batch_back_within_the_deadline(
    kusto_server: Any, private_queue: str, spawn: Any
) -> None:
    prefix, threads = _threads("hang", 10)
    published = build_checkpoints(threads, 10)
    send_all(private_queue, published.messages)
    with FaultProxy(kusto_server.url) as proxy:
        proxy.delay_ingestion(60)  # Kusto never answers in time
        worker = spawn(private_queue, proxy.url, "--shutdown-timeout", "5")
        assert proxy.wait_for_ingestion_requests(1, timeout=30)
        code, elapsed = worker.terminate(timeout=30)
        assert code == 0, worker.log.read_text()
        assert elapsed < 5.0
        given_back = [
            r for r in worker.records() if r["message"] == "events given back to the queue"
        ]
        assert [(r["events"], r["cause"]) for r in given_back] == [(100, "shutdown")]
        _assert_nothing_locked_or_dead(private_queue)
        proxy.delay_ingestion(0)
        _drain_in_process(private_queue, proxy.url)
    assert set(rows_by_event(kusto_server.url, DATABASE, prefix)) == published.event_ids
    assert_readable_exactly_once(private_queue, kusto_server.url, DATABASE, published)
