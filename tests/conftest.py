"""The local stack for tests: the local Kusto server, a SQLite outbox, a worker."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.kusto.ingestor_worker.ingest import KustoIngestor
from langgraph.checkpoint.kusto.ingestor_worker.worker import Worker
from langgraph.checkpoint.kusto.kusto import KustoQueries
from langgraph.checkpoint.kusto.local.kusto_server import LocalKustoServer, start_local_kusto
from langgraph.checkpoint.kusto.outbox import open_queue
from langgraph.checkpoint.kusto.schema import provision_commands

DATABASE = "langgraph"


@dataclass
class LocalStack:
    server: LocalKustoServer
    queue_url: str
    database: str = DATABASE

    @property
    def cluster(self) -> str:
        return self.server.url

    def queries(self) -> KustoQueries:
        return KustoQueries(self.cluster, self.database)


@pytest.fixture(scope="session")
def kusto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKustoServer]:
    server = start_local_kusto(tmp_path_factory.mktemp("kusto"), port=0, database=DATABASE)
    queries = KustoQueries(server.url, DATABASE)
    for command in provision_commands():
        queries.command(command)
    queries.close()
    yield server
    server.close()


@pytest.fixture(scope="session")
def stack(
    kusto_server: LocalKustoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    """The shared stack with one in-process worker draining the queue."""
    queue_url = f"sqlite:///{tmp_path_factory.mktemp('queue') / 'outbox.db'}"
    stop = threading.Event()
    receiver = open_queue(queue_url)
    ingestor = KustoIngestor(kusto_server.url, DATABASE)
    worker = Worker(receiver, ingestor, max_wait=0.05)
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    yield LocalStack(kusto_server, queue_url)
    stop.set()
    thread.join(timeout=10)
    ingestor.close()
    receiver.close()


@pytest.fixture
def private_queue(tmp_path: Path) -> str:
    """A queue no worker drains, for tests that control the worker themselves."""
    return f"sqlite:///{tmp_path / 'outbox.db'}"


@pytest.fixture
def start_worker(kusto_server: LocalKustoServer) -> Iterator[Callable[..., None]]:
    """``start_worker(queue_url, **worker_options)``: a worker in this process draining
    that queue (a ``private_queue``) into the local Kusto; each is stopped at teardown."""
    running: list[tuple[threading.Event, threading.Thread, KustoIngestor, Any]] = []

    def start(queue_url: str, **options: Any) -> None:
        queue = open_queue(queue_url)
        ingestor = KustoIngestor(kusto_server.url, DATABASE)
        stop = threading.Event()
        options.setdefault("max_wait", 0.05)
        thread = threading.Thread(
            target=Worker(queue, ingestor, **options).run, args=(stop,), daemon=True
        )
        thread.start()
        running.append((stop, thread, ingestor, queue))

    yield start
    for stop, thread, ingestor, queue in running:
        stop.set()
        thread.join(timeout=30)
        ingestor.close()
        queue.close()
