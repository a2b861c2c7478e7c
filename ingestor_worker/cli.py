"""``langgraph-kusto``: the local stack, provisioning, the worker, dead letters and the demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from azure.kusto.data.exceptions import KustoError, KustoNetworkError
from langgraph.checkpoint.kusto.kusto import KustoQueries
from langgraph.checkpoint.kusto.outbox import OutboxError
from langgraph.checkpoint.kusto.settings import (
    CLUSTER_ENV,
    DATABASE_ENV,
    DEFAULT_LOCAL_PORT,
    LOCAL_DIR,
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


class _Parser(argparse.ArgumentParser):
    """Argument mistakes as one line naming the command, not argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")

    def parse_known_args(
        self, args: Iterable[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        """Unknown arguments are an error of the (sub)command that met them: argparse would
        hand a subcommand's leftovers to the top-level parser, whose help does not list
        that subcommand's flags."""
        parsed, unknown = super().parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed, unknown


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    # The demo and the dead-letter tools print what matters; services log at INFO.
    quiet_by_default = args.command in ("demo", "dlq")
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose
        else (logging.WARNING if quiet_by_default else logging.INFO),
        handlers=[handler],
    )
    if not args.verbose:
        # The Azure SDKs log every AMQP link state change and HTTP request at INFO.
        logging.getLogger("azure").setLevel(logging.WARNING)
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
        print(f"langgraph-kusto: Kusto refused the request: {_summary(exc)}", file=sys.stderr)
        return 1
    except OutboxError as exc:
        print(f"langgraph-kusto: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _summary(error: KustoError) -> str:
    """The error in one line: the HTTP status and the first line of the answer. A server
    that is not Kusto (a wrong --cluster) answers with a whole HTML page."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    status = getattr(getattr(error, "http_response", None), "status_code", None)
    summary = first if status is None else f"HTTP {status}: {first}"
    if first.startswith("<"):
        return (
            f"{summary} (an HTML page of {len(lines)} lines, not a Kusto answer: does the "
            "cluster URL name a Kusto cluster?)"
        )
    if len(lines) > 1:
        return f"{summary} (and {len(lines) - 1} more lines)"
    return summary


def _parser() -> argparse.ArgumentParser:
    from .dlq import add_dlq_arguments, run_dlq_command
    from .local_stack import add_local_up_arguments, port_number, run_local_up
    from .service import add_worker_arguments, run_worker_command

    parser = _Parser(
        prog="langgraph-kusto",
        description="LangGraph checkpoints in Azure Data Explorer through an outbox queue.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    local = commands.add_parser("local-kusto", help="run the local Kusto-compatible server")
    local.add_argument(
        "--port",
        type=port_number,
        default=None,
        help=f"0 picks a free port (default: that of ${CLUSTER_ENV} on loopback, "
        f"else {DEFAULT_LOCAL_PORT})",
    )
    local.add_argument("--data", type=Path, default=Path(LOCAL_DIR) / "kusto", help="data dir")
    local.add_argument("--database", default=None, help=f"database name (${DATABASE_ENV})")
    local.set_defaults(handler=_local_kusto)

    stack = commands.add_parser("local", help="the local stack (Kusto server and worker)")
    stack_commands = stack.add_subparsers(dest="local_command", required=True, metavar="ACTION")
    up = stack_commands.add_parser(
        "up",
        help="run the local Kusto server and a worker in the foreground until Ctrl-C; apps "
        "then use the saver with no settings",
    )
    add_local_up_arguments(up)
    up.set_defaults(handler=run_local_up)

    provision = commands.add_parser("provision", help="apply provision.kql to a database")
    _connection_flags(provision)
    provision.set_defaults(handler=_provision)

    worker = commands.add_parser("worker", help="run the ingestor worker until SIGTERM/SIGINT")
    add_worker_arguments(worker)
    worker.set_defaults(handler=run_worker_command)

    dlq = commands.add_parser("dlq", help="list, show, replay or purge dead letters")
    add_dlq_arguments(dlq)
    dlq.set_defaults(handler=run_dlq_command)

    demo = commands.add_parser("demo", help="a tour of the whole pipeline on this machine")
    demo.add_argument("--data", type=Path, default=None, help="keep the demo's data here")
    demo.set_defaults(handler=_demo)
    return parser


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster", default=None, help=f"Kusto cluster URL (${CLUSTER_ENV})")
    parser.add_argument("--database", default=None, help=f"Kusto database (${DATABASE_ENV})")


def _local_kusto(args: argparse.Namespace) -> int:
    from langgraph.checkpoint.kusto.local.kusto_server import serve_local_kusto

    from .local_stack import SERVER_START_ERRORS, default_port, server_error

    port = default_port() if args.port is None else args.port
    try:
        serve_local_kusto(args.data, port, resolve(database=args.database).database)
    except SERVER_START_ERRORS as exc:
        raise server_error(exc, args.data, port) from None
    return 0


def _provision(args: argparse.Namespace) -> int:
    from langgraph.checkpoint.kusto.schema import apply_provision

    settings = resolve(cluster=args.cluster, database=args.database)
    queries = _connect(settings.cluster, settings.database)
    try:
        applied = apply_provision(queries)
    finally:
        queries.close()
    print(f"provisioned {settings.database} on {settings.cluster}: {applied} commands")
    return 0


def _connect(cluster: str, database: str) -> KustoQueries:
    try:
        return KustoQueries(cluster, database)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _demo(args: argparse.Namespace) -> int:
    from langgraph.checkpoint.kusto.ingestor_worker.demo import run_demo

    run_demo(args.data)
    return 0


if __name__ == "__main__":
    # Run the package's copy of this module, not this __main__ one: the subcommand modules
    # raise the package's UsageError, and only that class is caught by the package's main.
    from langgraph.checkpoint.kusto.ingestor_worker import cli

    sys.exit(cli.main())
