"""Tools for the worker tests: a fault-injecting Kusto proxy, a load publisher, read-back.

The proxy sits in front of the local Kusto server.

Queries and management commands pass through untouched. Streaming-ingest requests
(``POST /v1/rest/ingest/<db>/<table>``) can be made to fail on demand, the ways Azure Data
Explorer fails:

* ``THROTTLE``: 429 with Kusto's error envelope and ``Retry-After``;
* ``SERVER_ERROR``: 503 with ``"@permanent": false``;
* ``DROP``: the connection closes without an answer (nothing reached Kusto);
* ``TIMEOUT``: no answer for ``timeout_hold`` seconds, then the request *is* forwarded (Kusto
  commits it) and the connection closes: the ambiguous case a client timeout leaves;
* permanent rejects: any request carrying a row of a chosen event is refused with 400 and
  ``"@permanent": true``, naming the offending ``RowId``.

It also records, in order, every ingestion Kusto accepted (the rows' ids, threads and event
sequence numbers), which is how tests observe ingestion operations and their order.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import os
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import urlsplit

from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.kusto import KustoSaver
from langgraph.checkpoint.kusto.kusto import KustoQueries
from langgraph.checkpoint.kusto.outbox import OutboxMessage, open_queue
from langgraph.checkpoint.kusto.queries import Query
from langgraph.checkpoint.kusto.shared.envelope import Event

INGEST_PREFIX = "/v1/rest/ingest/"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class Fault(StrEnum):
    PASS = "pass"  # no fault: lets a request through in a sequence of faults
    THROTTLE = "throttle"
    SERVER_ERROR = "server_error"
    DROP = "drop"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class IngestedRow:
    row_id: str
    event_id: str
    thread_id: str
    event_seq: int
    row_kind: str


@dataclass(frozen=True, slots=True)
class Ingestion:
    """One ingestion operation Kusto accepted; ``index`` is its place in acceptance order."""

    index: int
    rows: tuple[IngestedRow, ...]

    @property
    def event_ids(self) -> set[str]:
        return {row.event_id for row in self.rows}


def kusto_error(code: str, message: str, *, permanent: bool) -> dict[str, Any]:
    """Kusto's error envelope, as the service sends it and azure-kusto-data parses it."""
    return {
        "error": {
            "code": code,
            "message": message,
            "@type": "Kusto.DataNode.Exceptions.KustoException",
            "@message": message,
            "@context": {"service": "fault-proxy"},
            "@permanent": permanent,
        }
    }


class FaultProxy:
    """Listens on 127.0.0.1 (a free port); ``url`` is the cluster URL to give the worker."""

    def __init__(self, upstream: str, *, timeout_hold: float = 3.0) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.timeout_hold = timeout_hold
        self.ingested: list[Ingestion] = []
        self.faults_served: Counter[str] = Counter()
        self.rejected_requests = 0
        self._faults: deque[Fault] = deque()
        self._rejected_events: set[str] = set()
        self._delay = 0.0
        self._ingest_requests = 0
        self._lock = threading.Condition()
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what to do -------------------------------------------------------------

    def fail_next(self, *faults: Fault) -> None:
        """The next ingestion requests fail with these faults, one request each, in order."""
        with self._lock:
            self._faults.extend(faults)

    def reject_events(self, event_ids: Iterable[str]) -> None:
        """Refuse permanently every ingestion request carrying a row of these events."""
        with self._lock:
            self._rejected_events.update(event_ids)

    def delay_ingestion(self, seconds: float) -> None:
        """Hold every ingestion request this long before forwarding it (a slow Kusto)."""
        self._delay = seconds

    def wait_for_ingestion_requests(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` ingestion requests have arrived in total."""
        with self._lock:
            return self._lock.wait_for(lambda: self._ingest_requests >= count, timeout)

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    def ingested_events(self) -> Counter[str]:
        """How many accepted operations carried each event (more than one: a duplicate)."""
        with self._lock:
            return Counter(e for ingestion in self.ingested for e in ingestion.event_ids)

    # -- the handler's side --------------------------------------------------------

    def _decide(self, event_ids: set[str]) -> tuple[Fault | None, str | None]:
        """(fault to inject, or an event to refuse permanently) for one ingestion request."""
        with self._lock:
            self._ingest_requests += 1
            self._lock.notify_all()
            refused = sorted(event_ids & self._rejected_events)
            if refused:
                self.rejected_requests += 1
                return None, refused[0]
            if self._faults:
                fault = self._faults.popleft()
                self.faults_served[fault] += 1
                return (None if fault is Fault.PASS else fault), None
        return None, None

    def _record(self, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            self.ingested.append(
                Ingestion(
                    len(self.ingested),
                    tuple(
                        IngestedRow(
                            str(r["RowId"]),
                            str(r["EventId"]),
                            str(r["ThreadId"]),
                            int(r["EventSeq"]),
                            str(r["RowKind"]),
                        )
                        for r in rows
                    ),
                )
            )

    def _pause(self, seconds: float) -> None:
        self._closing.wait(seconds)

    def _forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=120)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects

        def do_GET(self) -> None:
            self._pass_through(self._read_body())

        def do_POST(self) -> None:
            body = self._read_body()
            if not self.path.startswith(INGEST_PREFIX):
                self._pass_through(body)
                return
            data = (
                gzip.decompress(body)
                if "gzip" in self.headers.get("Content-Encoding", "")
                else body
            )
            rows = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
            decision, refused = proxy._decide({str(r.get("EventId")) for r in rows})
            if refused is not None:
                row_id = next(r["RowId"] for r in rows if r.get("EventId") == refused)
                self._answer(
                    400,
                    kusto_error(
                        "BadRequest_InvalidRecord",
                        f"Record with RowId '{row_id}' was rejected: value out of range "
                        "for column 'Payload' (injected by the fault proxy)",
                        permanent=True,
                    ),
                )
            elif decision is Fault.THROTTLE:
                self._answer(
                    429,
                    kusto_error("TooManyRequests", "throttled (fault proxy)", permanent=False),
                    [("Retry-After", "0.2")],
                )
            elif decision is Fault.SERVER_ERROR:
                self._answer(
                    503,
                    kusto_error(
                        "ServiceUnavailable", "service unavailable (fault proxy)", permanent=False
                    ),
                )
            elif decision is Fault.DROP:
                self._drop()
            elif decision is Fault.TIMEOUT:
                proxy._pause(proxy.timeout_hold)
                status, _, _ = proxy._forward("POST", self.path, self._upstream_headers(), body)
                if status == 200:
                    proxy._record(rows)
                self._drop()
            else:
                if proxy._delay:
                    proxy._pause(proxy._delay)
                status, headers, answer = proxy._forward(
                    "POST", self.path, self._upstream_headers(), body
                )
                if status == 200:
                    proxy._record(rows)
                self._relay(status, headers, answer)

        def _read_body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks: list[bytes] = []
                while True:
                    size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _upstream_headers(self) -> dict[str, str]:
            return {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}

        def _pass_through(self, body: bytes) -> None:
            status, headers, answer = proxy._forward(
                self.command, self.path, self._upstream_headers(), body
            )
            self._relay(status, headers, answer)

        def _relay(self, status: int, headers: Sequence[tuple[str, str]], body: bytes) -> None:
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _answer(
            self, status: int, body: dict[str, Any], headers: Sequence[tuple[str, str]] = ()
        ) -> None:
            data = json.dumps(body).encode()
            self._relay(status, [("Content-Type", "application/json"), *headers], data)

        def _drop(self) -> None:
            self.close_connection = True
            with contextlib.suppress(OSError):  # the client may have given up already
                self.connection.shutdown(socket.SHUT_RDWR)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the tests assert on what the proxy records, not on its access log

    return Handler


# -- load and read-back ------------------------------------------------------------------

COUNT_ROWS_BY_EVENT = """\
declare query_parameters(prefix:string);
CheckpointEvents
| where ThreadId startswith prefix and RowKind != "dead_letter"
| summarize Rows = count() by EventId"""

COUNT_EVENTS = """\
declare query_parameters(prefix:string);
CheckpointEvents
| where ThreadId startswith prefix and RowKind != "dead_letter"
| distinct EventId
| count"""

DEAD_LETTER_NOTES = """\
declare query_parameters(prefix:string);
CheckpointEvents
| where ThreadId startswith prefix and RowKind == "dead_letter"
| project EventId, Reason = tostring(Metadata.reason)"""


@dataclass(frozen=True, slots=True)
class Published:
    """Events published for a test, per thread in publish order."""

    events: list[Event]
    messages: list[OutboxMessage]

    def by_thread(self) -> dict[str, list[Event]]:
        threads: dict[str, list[Event]] = {}
        for event in self.events:
            threads.setdefault(event.thread_id, []).append(event)
        return threads

    @property
    def event_ids(self) -> set[str]:
        return {event.event_id for event in self.events}


def build_checkpoints(
    threads: Sequence[str],
    per_thread: int,
    *,
    value_bytes: int = 0,
    max_message_bytes: int | None = None,
) -> Published:
    """Checkpoint events, thread after thread per step, built by the saver's own code.

    Each carries one channel value (its step, or ``value_bytes`` random bytes). A queue-less
    saver builds them, so publishing is one bulk send instead of one ``put`` per event.
    """
    saver = KustoSaver(
        cast(Any, None),
        cast(Any, None),
        consistency="eventual",
        **({"max_message_bytes": max_message_bytes} if max_message_bytes else {}),
    )
    events: list[Event] = []
    messages: list[OutboxMessage] = []
    for step in range(per_thread):
        for thread_id in threads:
            checkpoint = empty_checkpoint()
            checkpoint["id"] = str(uuid6(clock_seq=step))
            checkpoint["channel_values"] = {
                "step": os.urandom(value_bytes) if value_bytes else step
            }
            checkpoint["channel_versions"] = {"step": saver.get_next_version(None, None)}
            event, _ = saver._put_event(
                {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}},
                checkpoint,
                {"source": "loop", "step": step},
                checkpoint["channel_versions"],
            )
            events.append(event)
            messages.extend(saver._messages(event))
    return Published(events, messages)


def send_all(queue_url: str, messages: Sequence[OutboxMessage], group: int = 1000) -> None:
    queue = open_queue(queue_url)
    try:
        for start in range(0, len(messages), group):
            queue.send(messages[start : start + group])
    finally:
        queue.close()


def rows_by_event(cluster: str, database: str, prefix: str) -> dict[str, int]:
    """Stored rows per event id for threads starting with ``prefix`` (copies included;
    the worker's dead-letter notes are not the events' rows)."""
    queries = KustoQueries(cluster, database)
    try:
        return {
            str(row["EventId"]): int(row["Rows"])
            for row in queries.run(Query(COUNT_ROWS_BY_EVENT, {"prefix": prefix}))
        }
    finally:
        queries.close()


def dead_letter_notes(cluster: str, database: str, prefix: str) -> dict[str, str]:
    """The worker's dead-letter notes for threads starting with ``prefix``: event id ->
    reason."""
    queries = KustoQueries(cluster, database)
    try:
        return {
            str(row["EventId"]): str(row["Reason"])
            for row in queries.run(Query(DEAD_LETTER_NOTES, {"prefix": prefix}))
        }
    finally:
        queries.close()


def count_events(cluster: str, database: str, prefix: str) -> int:
    """Distinct events stored for threads starting with ``prefix``."""
    queries = KustoQueries(cluster, database)
    try:
        [row] = queries.run(Query(COUNT_EVENTS, {"prefix": prefix}))
        return int(row["Count"])
    finally:
        queries.close()


def assert_readable_exactly_once(
    queue_url: str, cluster: str, database: str, published: Published
) -> None:
    """Through the saver's read path, every thread lists each of its checkpoints once,
    newest first, and its latest checkpoint is the last one published."""
    with KustoSaver.from_conn_string(
        queue_url, cluster, database, consistency="eventual"
    ) as reader:
        for thread_id, events in published.by_thread().items():
            listed = [
                t.checkpoint["id"] for t in reader.list({"configurable": {"thread_id": thread_id}})
            ]
            expected = [e.checkpoint_id for e in reversed(events)]
            assert listed == expected, f"thread {thread_id}: read {len(listed)} of {len(expected)}"


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)
