"""``langgraph-kusto``: the local Kusto server, provisioning, the worker and the demo."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from azure.kusto.data.exceptions import KustoError, KustoNetworkError
from langgraph.checkpoint.kusto.kusto import KustoQueries
from langgraph.checkpoint.kusto.settings import (
    CLUSTER_ENV,
    DATABASE_ENV,
    DEFAULT_LOCAL_PORT,
    LOCAL_DIR,
    QUEUE_ENV,
    resolve,
)

_STANDARD_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's extras.

    Callers put identifiers and counts in ``extra``; never payloads or secrets.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD_RECORD_FIELDS})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class UsageError(Exception):
    """A mistake on the command line or in settings: printed without a traceback."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    quiet_by_default = args.command == "demo"
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose
        else (logging.WARNING if quiet_by_default else logging.INFO),
        handlers=[handler],
    )
    try:
        return int(args.handler(args) or 0)
    except UsageError as exc:
        print(f"langgraph-kusto: {exc}", file=sys.stderr)
        return 2
    except KustoNetworkError as exc:
        print(
            f"langgraph-kusto: cannot reach Kusto ({exc}). Is the cluster URL right, and is "
            "the local server running (`langgraph-kusto local-kusto`)?",
            file=sys.stderr,
        )
        return 1
    except KustoError as exc:
        print(f"langgraph-kusto: Kusto refused the request: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="langgraph-kusto",
        description="LangGraph checkpoints in Azure Data Explorer through an outbox queue.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    local = commands.add_parser("local-kusto", help="run the local Kusto-compatible server")
    local.add_argument("--port", type=int, default=DEFAULT_LOCAL_PORT, help="0 picks a free port")
    local.add_argument("--data", type=Path, default=Path(LOCAL_DIR) / "kusto", help="data dir")
    local.add_argument("--database", default=None, help=f"database name (${DATABASE_ENV})")
    local.set_defaults(handler=_local_kusto)

    provision = commands.add_parser("provision", help="apply provision.kql to a database")
    _connection_flags(provision, queue=False)
    provision.set_defaults(handler=_provision)

    worker = commands.add_parser("worker", help="run the ingestor worker until SIGTERM/SIGINT")
    _connection_flags(worker, queue=True)
    worker.add_argument("--max-batch-messages", type=int, default=500)
    worker.add_argument("--max-wait", type=float, default=1.0, help="seconds to wait for messages")
    worker.set_defaults(handler=_worker)

    demo = commands.add_parser("demo", help="run an agent through the whole local pipeline")
    demo.add_argument("--data", type=Path, default=None, help="keep the demo's data here")
    demo.set_defaults(handler=_demo)
    return parser


def _connection_flags(parser: argparse.ArgumentParser, *, queue: bool) -> None:
    if queue:
        parser.add_argument("--queue", default=None, help=f"queue URL (${QUEUE_ENV})")
    parser.add_argument("--cluster", default=None, help=f"Kusto cluster URL (${CLUSTER_ENV})")
    parser.add_argument("--database", default=None, help=f"Kusto database (${DATABASE_ENV})")


def _local_kusto(args: argparse.Namespace) -> int:
    from langgraph.checkpoint.kusto.local.kusto_server import serve_local_kusto

    serve_local_kusto(args.data, args.port, resolve(database=args.database).database)
    return 0


def _provision(args: argparse.Namespace) -> int:
    from langgraph.checkpoint.kusto.schema import provision_commands

    settings = resolve(cluster=args.cluster, database=args.database)
    queries = _connect(settings.cluster, settings.database)
    try:
        commands = provision_commands()
        for command in commands:
            queries.command(command)
    finally:
        queries.close()
    print(f"provisioned {settings.database} on {settings.cluster}: {len(commands)} commands")
    return 0


def _connect(cluster: str, database: str) -> KustoQueries:
    try:
        return KustoQueries(cluster, database)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _worker(args: argparse.Namespace) -> int:
    from langgraph.checkpoint.kusto.ingestor_worker.ingest import KustoIngestor
    from langgraph.checkpoint.kusto.ingestor_worker.worker import Worker
    from langgraph.checkpoint.kusto.outbox import open_queue

    settings = resolve(args.queue, args.cluster, args.database)
    try:
        receiver = open_queue(settings.queue)
        ingestor = KustoIngestor(settings.cluster, settings.database)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    worker = Worker(
        receiver, ingestor, max_batch_messages=args.max_batch_messages, max_wait=args.max_wait
    )
    try:
        worker.run(stop)
    finally:
        ingestor.close()
        receiver.close()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from langgraph.checkpoint.kusto.ingestor_worker.demo import run_demo

    run_demo(args.data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
