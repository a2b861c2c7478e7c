"""Large-value benchmark: a 50 MB channel value through ours and AsyncSqliteSaver, one run.

    python bench/bench_large_values.py [--mb 50] [--rounds 3]

Ours: ``AsyncKustoSaver`` (``session``) puts the value on a SQLite outbox; a worker in
managed mode (its default) ingests it, falling back to queued ingestion through azurite
since the event exceeds streaming's 4 MB; a fresh ``eventual`` saver (no cache) gets it
back from the local Kusto server. Prints the median put and get seconds of each saver, the
ratio ours / sqlite, and the worker's ingestion time (publish to queryable) on its own
line, since AsyncSqliteSaver has no such step. Needs azurite
(``bash scripts/setup.d/30-azurite.sh``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver, empty_checkpoint
from langgraph.checkpoint.kusto import AsyncKustoSaver
from langgraph.checkpoint.kusto.ingestor_worker.ingest import IngestionMode, KustoIngestor
from langgraph.checkpoint.kusto.ingestor_worker.worker import Worker
from langgraph.checkpoint.kusto.kusto import KustoQueries
from langgraph.checkpoint.kusto.local.kusto_server import LocalKustoServer, start_azurite
from langgraph.checkpoint.kusto.outbox import open_queue
from langgraph.checkpoint.kusto.schema import provision_commands
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

DATABASE = "langgraph"


def checkpoint_with(value: bytes) -> tuple[RunnableConfig, Any]:
    config: RunnableConfig = {
        "configurable": {"thread_id": f"large-{uuid.uuid4().hex[:8]}", "checkpoint_ns": ""}
    }
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = {"big": value}
    checkpoint["channel_versions"] = {"big": "1"}
    return config, checkpoint


async def timed(action: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await action()
    return time.perf_counter() - started, result


def drain(queue_url: str, server: LocalKustoServer) -> None:
    """The worker, managed mode, until the value is queryable."""
    queue = open_queue(queue_url)
    ingestor = KustoIngestor(server.url, DATABASE, mode=IngestionMode.MANAGED)
    try:
        worker = Worker(queue, ingestor, max_wait=0.05)
        while queue.depth():
            worker.run_once()
    finally:
        ingestor.close()
        queue.close()
    server.wait_for_queued_ingestion(timeout=300)


async def ours(
    value: bytes, server: LocalKustoServer, queue_url: str
) -> tuple[float, float, float]:
    config, checkpoint = checkpoint_with(value)
    async with AsyncKustoSaver.from_conn_string(queue_url, server.url, DATABASE) as writer:
        put, _ = await timed(lambda: writer.aput(config, checkpoint, {"step": 0}, {"big": "1"}))
    ingest, _ = await timed(lambda: asyncio.to_thread(drain, queue_url, server))
    async with AsyncKustoSaver.from_conn_string(
        queue_url, server.url, DATABASE, consistency="eventual"
    ) as reader:
        get, found = await timed(lambda: reader.aget_tuple(config))
    check(found, value)
    return put, get, ingest


async def sqlite(value: bytes, path: Path) -> tuple[float, float]:
    config, checkpoint = checkpoint_with(value)
    saver: BaseCheckpointSaver[Any]
    async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
        put, _ = await timed(lambda: saver.aput(config, checkpoint, {"step": 0}, {"big": "1"}))
    async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
        get, found = await timed(lambda: saver.aget_tuple(config))
    check(found, value)
    return put, get


def check(found: Any, value: bytes) -> None:
    if found is None or found.checkpoint["channel_values"].get("big") != value:
        raise SystemExit("the value did not round-trip byte-exact: the benchmark is void")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50, help="value size in MiB")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-large-") as tmp, start_azurite() as azurite:
        root = Path(tmp)
        server = LocalKustoServer(root / "kusto", storage=azurite.connection_string).start()
        try:
            queries = KustoQueries(server.url, DATABASE)
            for command in provision_commands():
                queries.command(command)
            queries.close()
            queue_url = f"sqlite:///{root / 'outbox.db'}"
            results: dict[str, list[tuple[float, ...]]] = {"ours": [], "sqlite": []}
            for round_ in range(args.rounds):
                value = os.urandom(args.mb * 1024 * 1024)
                results["ours"].append(await ours(value, server, queue_url))
                results["sqlite"].append(await sqlite(value, root / f"sqlite-{round_}.db"))
        finally:
            server.close()

    def median(name: str, index: int) -> float:
        return statistics.median(r[index] for r in results[name])

    print(f"{args.mb} MiB channel value, median of {args.rounds} rounds (seconds)")
    print(f"{'':<26}{'ours':>10}{'sqlite':>10}{'ours/sqlite':>14}")
    for index, op in enumerate(("put", "get")):
        a, b = median("ours", index), median("sqlite", index)
        print(f"{op:<26}{a:>10.3f}{b:>10.3f}{a / b:>13.2f}x")
    print(f"{'ingest (worker, ours)':<26}{median('ours', 2):>10.3f}")
    print("ours: put = publish to the outbox (session); get = fresh eventual saver, from Kusto")


if __name__ == "__main__":
    asyncio.run(main())
