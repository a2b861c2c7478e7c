"""``langgraph-kusto local up``: the local Kusto server and a worker, in the foreground.

Both run in this one process (the server and the worker on their own threads), so there
is nothing to orphan: SIGINT (Ctrl-C) or SIGTERM stops the worker first (it finishes or
gives back the batch in hand), then the server, and the process exits. The defaults are
the saver's (``settings.py``), so an app on the same machine, started from the same
directory, needs no settings at all: ``AsyncKustoSaver.from_conn_string()``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from langgraph.checkpoint.kusto.kusto import KustoQueries, cluster_port, is_local_cluster
from langgraph.checkpoint.kusto.outbox import OutboxQueue, open_queue, redact_queue_url
from langgraph.checkpoint.kusto.schema import apply_provision
from langgraph.checkpoint.kusto.settings import (
    CLUSTER_ENV,
    DATABASE_ENV,
    DEFAULT_LOCAL_PORT,
    LOCAL_DIR,
    QUEUE_ENV,
    Settings,
    resolve,
)

from .cli import UsageError

if TYPE_CHECKING:
    from langgraph.checkpoint.kusto.local.kusto_server import LocalKustoServer

logger = logging.getLogger("langgraph.checkpoint.kusto.local_stack")

READY = "ready: Ctrl-C stops the worker, then the server"
"""The line ``local up`` prints once apps can use the stack (scripts may wait for it)."""

MAX_PORT = 65535
_PORT_ERRORS = frozenset({errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL})

SUPERVISE_INTERVAL = 0.2
JOIN_GRACE = 5.0
"""Beyond the worker's shutdown deadline, how long to wait for its thread before exiting."""


def default_port() -> int:
    """The port apps expect the local server on: that of ``$LANGGRAPH_KUSTO_CLUSTER`` when it
    names a loopback address with a port, else the saver's default. A port apps could not
    use either is a ``UsageError``."""
    cluster = resolve().cluster
    try:
        port = cluster_port(cluster)
    except ValueError as exc:
        raise UsageError(f"{exc} (${CLUSTER_ENV}, which --port overrides)") from None
    return port if is_local_cluster(cluster) and port is not None else DEFAULT_LOCAL_PORT


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0 for "any free one"."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"a port is 0-{MAX_PORT}, got {port}")
    return port


def open_local_kusto(data: Path, port: int, database: str) -> LocalKustoServer:
    """The local server on ``port``, or a one-line ``UsageError`` saying what is in the way."""
    from langgraph.checkpoint.kusto.local.kusto_server import LocalKustoServer

    try:
        return LocalKustoServer(data, port, database)
    except SERVER_START_ERRORS as exc:
        raise server_error(exc, data, port) from None


SERVER_START_ERRORS = (OSError, RuntimeError, ValueError)
"""What the local server raises for a reason the user can fix: a busy port or unusable
data directory (OSError), a DuckDB file held by another server (RuntimeError), a
database name it cannot use (ValueError)."""


def server_error(exc: OSError | RuntimeError | ValueError, data: Path, port: int) -> UsageError:
    """What keeps the local server from starting, as a one-line ``UsageError``."""
    if isinstance(exc, OSError) and exc.errno in _PORT_ERRORS:
        return UsageError(
            f"cannot listen on port {port} ({exc.strerror}); is another `local up` or "
            "`local-kusto` running? Stop it, or choose another port with --port"
        )
    if isinstance(exc, OSError):
        return UsageError(f"cannot keep the Kusto data in {data}: {exc}")
    return UsageError(str(exc))  # the message names the file or the database


def add_local_up_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port",
        type=port_number,
        default=None,
        help=f"Kusto port; 0 picks a free one (default: that of ${CLUSTER_ENV} on loopback, "
        f"else {DEFAULT_LOCAL_PORT})",
    )
    parser.add_argument(
        "--data", type=Path, default=Path(LOCAL_DIR) / "kusto", help="Kusto data directory"
    )
    parser.add_argument("--queue", default=None, help=f"queue URL (${QUEUE_ENV})")
    parser.add_argument("--database", default=None, help=f"database name (${DATABASE_ENV})")


def run_local_up(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Serve until SIGINT/SIGTERM; 0 after a clean stop."""
    stream = sys.stdout if out is None else out
    settings = resolve(queue=args.queue, database=args.database)
    port = default_port() if args.port is None else args.port
    try:
        receiver = open_queue(settings.queue)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        server = open_local_kusto(args.data, port, settings.database)
        stop = threading.Event()
        previous = _stop_on_signals(stop)
        try:
            server.start()
            _say(stream, f"kusto:   {server.url}  database {settings.database}  data {args.data}")
            _provision(server.url, settings.database, stream)
            return _run_worker(server.url, settings, receiver, stop, stream)
        finally:
            server.close()
            _say(stream, "kusto:   stopped")
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    finally:
        receiver.close()


def _provision(cluster: str, database: str, stream: TextIO) -> None:
    queries = KustoQueries(cluster, database)
    try:
        applied = apply_provision(queries)
    finally:
        queries.close()
    _say(stream, f"schema:  provision.kql applied ({applied} commands)")


def _run_worker(
    cluster: str, settings: Settings, receiver: OutboxQueue, stop: threading.Event, out: TextIO
) -> int:
    from .ingest import KustoIngestor
    from .worker import DEFAULT_SHUTDOWN_TIMEOUT, Worker

    ingestor = KustoIngestor(cluster, settings.database)
    worker = Worker(receiver, ingestor)
    failed = threading.Event()

    def work() -> None:
        try:
            worker.run(stop)
        except Exception:
            logger.exception("worker failed")
            failed.set()
            stop.set()

    thread = threading.Thread(target=work, name="worker", daemon=True)
    try:
        thread.start()
        _say(out, f"worker:  {redact_queue_url(settings.queue)} -> {cluster} ({settings.database})")
        _explain_app_settings(cluster, settings.queue, settings.database, out)
        _say(out, READY)
        while not stop.wait(SUPERVISE_INTERVAL):
            pass
        _say(out, "stopping: the worker finishes the batch in hand")
        thread.join(DEFAULT_SHUTDOWN_TIMEOUT + JOIN_GRACE)
        if thread.is_alive():
            logger.critical("the worker did not stop in time; exiting anyway")
            return 1
        _say(out, "worker:  stopped")
        return 1 if failed.is_set() else 0
    finally:
        ingestor.close()


def _explain_app_settings(cluster: str, queue: str, database: str, out: TextIO) -> None:
    """Tell how an app reaches this stack: with no settings when an app without arguments
    (flags, then environment, then defaults) lands here."""
    if resolve() == Settings(queue, cluster, database):
        _say(out, "apps:    KustoSaver / AsyncKustoSaver.from_conn_string() with no arguments")
        if queue.startswith("sqlite:///") and not queue.startswith("sqlite:////"):
            _say(out, f"         (the queue path is relative: start apps in {os.getcwd()})")
        return
    _say(
        out,
        f"apps:    set {CLUSTER_ENV}={cluster} {QUEUE_ENV}={redact_queue_url(queue)} "
        f"{DATABASE_ENV}={database}",
    )


def _stop_on_signals(stop: threading.Event) -> dict[int, Any]:
    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signals = (signal.SIGINT, signal.SIGTERM)
    return {signum: signal.signal(signum, request_stop) for signum in signals}


def _say(out: TextIO, line: str) -> None:
    print(line, file=out, flush=True)
