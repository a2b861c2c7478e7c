"""The worker as a service: settings, metrics export, health endpoint, signals, shutdown.

``langgraph-kusto worker`` runs ``run_worker_command``. Every setting comes from a flag,
else an environment variable, else a default that suits a production replica. SIGTERM or
SIGINT stops receiving; the batch in hand is finished, or given back to the queue, within
``--shutdown-timeout`` seconds, and the process exits 0. ``GET /healthz`` on
``--health-port`` answers 200 while the worker runs and makes progress, 503 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from langgraph.checkpoint.kusto.kusto import is_local_cluster
from langgraph.checkpoint.kusto.outbox import OutboxError
from langgraph.checkpoint.kusto.settings import CLUSTER_ENV, DATABASE_ENV, QUEUE_ENV, resolve
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource

from . import retry, worker
from .ingest import IngestionMode
from .metrics import WorkerMetrics

logger = logging.getLogger("langgraph.checkpoint.kusto.worker.service")

HEALTH_PORT_ENV = "LANGGRAPH_KUSTO_HEALTH_PORT"
DEFAULT_HEALTH_PORT = 8080
HEALTH_HOST = "0.0.0.0"
"""All interfaces: container platforms probe the container's address, not its loopback."""
HEALTH_PATH = "/healthz"

INGESTION_MODE_ENV = "LANGGRAPH_KUSTO_INGESTION_MODE"
DEFAULT_INGESTION_MODE = IngestionMode.MANAGED
"""Small batches stream; an event too large to stream still gets in (queued)."""
DEFAULT_LOCAL_INGESTION_MODE = IngestionMode.STREAMING
"""For a loopback cluster: the local server queues only when given Azure Storage (azurite),
so managed's fallback would fail there."""
INGEST_ENDPOINT_ENV = "LANGGRAPH_KUSTO_INGEST_ENDPOINT"

METRICS_EXPORTER_ENV = "OTEL_METRICS_EXPORTER"
METRICS_EXPORTERS = ("none", "console", "otlp")
OTLP_ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
SERVICE_NAME = "langgraph-kusto-worker"
METRICS_FLUSH_MILLIS = 1000
"""The last export at exit gets this long: the shutdown deadline is already spent."""

SHUTDOWN_GRACE = 2.0
"""Beyond the shutdown deadline, how long the supervisor waits before exiting anyway."""
SUPERVISE_INTERVAL = 0.2


class SettingsError(ValueError):
    """A flag or environment variable with a value the worker cannot use."""


@dataclass(frozen=True, slots=True)
class _Option:
    flag: str
    env: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    minimum: float = 0.0
    """Values must be >= minimum; positive options use a tiny positive minimum."""

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


_POSITIVE = 1e-9

OPTIONS: tuple[_Option, ...] = (
    _Option(
        "--max-batch-events",
        "LANGGRAPH_KUSTO_MAX_BATCH_EVENTS",
        int,
        worker.DEFAULT_MAX_BATCH_EVENTS,
        "events per ingestion operation",
        1,
    ),
    _Option(
        "--max-batch-bytes",
        "LANGGRAPH_KUSTO_MAX_BATCH_BYTES",
        int,
        worker.DEFAULT_MAX_BATCH_BYTES,
        "bytes of rows (JSON, before gzip) per ingestion operation; an event larger than "
        "this goes alone, never split",
        1,
    ),
    _Option(
        "--max-batch-delay",
        "LANGGRAPH_KUSTO_MAX_BATCH_DELAY",
        float,
        worker.DEFAULT_MAX_BATCH_DELAY,
        "seconds a batch may keep filling after its first message (it closes earlier when "
        "the queue goes quiet)",
        _POSITIVE,
    ),
    _Option(
        "--max-batch-messages",
        "LANGGRAPH_KUSTO_MAX_BATCH_MESSAGES",
        int,
        worker.DEFAULT_MAX_BATCH_MESSAGES,
        "messages taken from the queue per receive call",
        1,
    ),
    _Option(
        "--max-wait",
        "LANGGRAPH_KUSTO_MAX_WAIT",
        float,
        worker.DEFAULT_MAX_WAIT,
        "seconds an idle receive waits for a first message; below --shutdown-timeout and "
        "--max-lock-renewal",
    ),
    _Option(
        "--retry-attempts",
        "LANGGRAPH_KUSTO_RETRY_ATTEMPTS",
        int,
        retry.DEFAULT_MAX_ATTEMPTS,
        "ingestion attempts per round of retries; when a round is spent the worker starts "
        "another while Kusto is unavailable, else gives the batch back to the queue",
        1,
    ),
    _Option(
        "--retry-budget",
        "LANGGRAPH_KUSTO_RETRY_BUDGET",
        float,
        retry.DEFAULT_RETRY_BUDGET,
        "seconds per round of retries (see --retry-attempts)",
        _POSITIVE,
    ),
    _Option(
        "--retry-initial-backoff",
        "LANGGRAPH_KUSTO_RETRY_INITIAL_BACKOFF",
        float,
        retry.DEFAULT_INITIAL_BACKOFF,
        "seconds: the first backoff's upper bound; it doubles per retry (full jitter)",
        _POSITIVE,
    ),
    _Option(
        "--retry-max-backoff",
        "LANGGRAPH_KUSTO_RETRY_MAX_BACKOFF",
        float,
        retry.DEFAULT_MAX_BACKOFF,
        "seconds: the longest backoff",
        _POSITIVE,
    ),
    _Option(
        "--ingest-timeout",
        "LANGGRAPH_KUSTO_INGEST_TIMEOUT",
        float,
        retry.DEFAULT_ATTEMPT_TIMEOUT,
        "seconds one ingestion attempt may take before it counts as failed (and is retried)",
        _POSITIVE,
    ),
    _Option(
        "--chunk-group-timeout",
        "LANGGRAPH_KUSTO_CHUNK_GROUP_TIMEOUT",
        float,
        worker.DEFAULT_CHUNK_GROUP_TIMEOUT,
        "seconds to wait for the missing parts of a chunked event before dead-lettering it",
        _POSITIVE,
    ),
    _Option(
        "--shutdown-timeout",
        "LANGGRAPH_KUSTO_SHUTDOWN_TIMEOUT",
        float,
        worker.DEFAULT_SHUTDOWN_TIMEOUT,
        "seconds after SIGTERM/SIGINT to finish or give back the batch in hand; keep it "
        "below the platform's termination grace period",
        _POSITIVE,
    ),
    _Option(
        "--max-lock-renewal",
        "LANGGRAPH_KUSTO_MAX_LOCK_RENEWAL",
        float,
        worker.DEFAULT_MAX_LOCK_RENEWAL,
        "seconds a message's lock is renewed while in hand; a worker without progress for "
        "this long reports unhealthy",
        _POSITIVE,
    ),
    _Option(
        "--lock-duration",
        "LANGGRAPH_KUSTO_LOCK_DURATION",
        float,
        30.0,
        f"peek-lock duration in seconds, at least {worker.MIN_LOCK_DURATION:g} (local SQLite "
        "queue; on Service Bus a queue property)",
        worker.MIN_LOCK_DURATION,
    ),
    _Option(
        "--max-delivery-count",
        "LANGGRAPH_KUSTO_MAX_DELIVERY_COUNT",
        int,
        10,
        "deliveries before a message is dead-lettered (local SQLite queue; on Service Bus "
        "a queue property)",
        1,
    ),
    _Option(
        "--health-port",
        HEALTH_PORT_ENV,
        int,
        DEFAULT_HEALTH_PORT,
        f"port of GET {HEALTH_PATH} for container probes; 0 turns it off",
    ),
)


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    queue: str
    cluster: str
    database: str
    max_batch_events: int
    max_batch_bytes: int
    max_batch_delay: float
    max_batch_messages: int
    max_wait: float
    retry_attempts: int
    retry_budget: float
    retry_initial_backoff: float
    retry_max_backoff: float
    ingest_timeout: float
    chunk_group_timeout: float
    shutdown_timeout: float
    max_lock_renewal: float
    lock_duration: float
    max_delivery_count: int
    health_port: int
    ingestion_mode: IngestionMode
    ingest_endpoint: str | None
    metrics_exporters: tuple[str, ...]

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None
    ) -> WorkerSettings:
        """Flags first, then environment variables, then defaults; values are checked."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for option in OPTIONS:
            values[option.dest] = _option_value(option, getattr(args, option.dest, None), env)
        if values["health_port"] > 65535:
            raise SettingsError(f"--health-port must be 0-65535, got {values['health_port']}")
        _check_max_wait(values)
        connection = resolve(
            args.queue or env.get(QUEUE_ENV),
            args.cluster or env.get(CLUSTER_ENV),
            args.database or env.get(DATABASE_ENV),
        )
        return cls(
            queue=connection.queue,
            cluster=connection.cluster,
            database=connection.database,
            ingestion_mode=_ingestion_mode(args.ingestion_mode, env, connection.cluster),
            ingest_endpoint=args.ingest_endpoint or env.get(INGEST_ENDPOINT_ENV) or None,
            metrics_exporters=_metrics_exporters(args.metrics_exporter, env),
            **values,
        )

    def retry_policy(self) -> retry.RetryPolicy:
        return retry.RetryPolicy(
            max_attempts=self.retry_attempts,
            budget=self.retry_budget,
            initial_backoff=self.retry_initial_backoff,
            max_backoff=self.retry_max_backoff,
            attempt_timeout=self.ingest_timeout,
        )


def _option_value(option: _Option, flag_value: Any, env: Mapping[str, str]) -> Any:
    if flag_value is not None:
        value, source = flag_value, option.flag
    elif env.get(option.env, "").strip():
        source = f"${option.env}"
        try:
            value = option.parse(env[option.env].strip())
        except ValueError:
            raise SettingsError(
                f"{source}={env[option.env]!r} is not a valid {option.parse.__name__}"
            ) from None
    else:
        return option.default
    # float() reads "nan" and "inf"; a NaN passes every comparison below, and an endless
    # wait or budget keeps the worker from ever stopping.
    if not math.isfinite(value):
        raise SettingsError(f"{source} must be a finite number, got {value}")
    if value < option.minimum:
        bound = "positive" if option.minimum == _POSITIVE else f">= {option.minimum:g}"
        raise SettingsError(f"{source} must be {bound}, got {value}")
    return value


def _check_max_wait(values: Mapping[str, Any]) -> None:
    """A receive cannot be interrupted, and the worker marks progress only between
    receives: an idle receive must end within the shutdown deadline and the stall limit."""
    for limit, why in (
        ("shutdown_timeout", "a stop waits for the idle receive to end"),
        ("max_lock_renewal", "an idle worker would report itself stalled"),
    ):
        if values["max_wait"] >= values[limit]:
            flag = "--" + limit.replace("_", "-")
            raise SettingsError(
                f"--max-wait must be below {flag} ({values[limit]:g}), got "
                f"{values['max_wait']:g}: {why}"
            )


def _ingestion_mode(flag_value: str | None, env: Mapping[str, str], cluster: str) -> IngestionMode:
    default = DEFAULT_LOCAL_INGESTION_MODE if is_local_cluster(cluster) else DEFAULT_INGESTION_MODE
    text = flag_value or env.get(INGESTION_MODE_ENV, "").strip() or default
    try:
        return IngestionMode(text.lower())
    except ValueError:
        modes = ", ".join(m.value for m in IngestionMode)
        raise SettingsError(f"ingestion mode {text!r} is not one of {modes}") from None


def _metrics_exporters(flag_value: str | None, env: Mapping[str, str]) -> tuple[str, ...]:
    """OpenTelemetry's own variable names the exporters; with none named, an OTLP endpoint
    in the environment (as Azure Container Apps' managed agent sets) means OTLP."""
    text = flag_value if flag_value is not None else env.get(METRICS_EXPORTER_ENV, "")
    if not text.strip():
        return ("otlp",) if any(env.get(name) for name in OTLP_ENDPOINT_ENVS) else ()
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in METRICS_EXPORTERS]
    if unknown:
        raise SettingsError(
            f"metrics exporter {', '.join(unknown)!r} is not supported; use "
            f"{', '.join(METRICS_EXPORTERS)} (comma-separated)"
        )
    return tuple(n for n in names if n != "none")


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``worker`` command's flags; each also reads the environment variable it names."""
    parser.add_argument("--queue", default=None, help=f"queue URL (${QUEUE_ENV})")
    parser.add_argument("--cluster", default=None, help=f"Kusto cluster URL (${CLUSTER_ENV})")
    parser.add_argument("--database", default=None, help=f"Kusto database (${DATABASE_ENV})")
    for option in OPTIONS:
        parser.add_argument(
            option.flag,
            type=option.parse,
            default=None,
            metavar=option.parse.__name__.upper(),
            help=f"{option.help} (${option.env}; default {option.default})",
        )
    parser.add_argument(
        "--ingestion-mode",
        default=None,
        choices=[m.value for m in IngestionMode],
        help=f"how batches reach Kusto: streaming, managed (streaming, queued when a batch is "
        f"too large or streaming keeps failing) or queued (${INGESTION_MODE_ENV}; default "
        f"{DEFAULT_INGESTION_MODE.value}, or {DEFAULT_LOCAL_INGESTION_MODE.value} for a "
        "loopback cluster, whose local server queues only when given Azure Storage)",
    )
    parser.add_argument(
        "--ingest-endpoint",
        default=None,
        help="the data-management (ingest-) endpoint for managed and queued modes, when it is "
        f"not the one derived from --cluster (${INGEST_ENDPOINT_ENV})",
    )
    parser.add_argument(
        "--metrics-exporter",
        default=None,
        metavar="NAMES",
        help=f"OpenTelemetry metrics exporters: {', '.join(METRICS_EXPORTERS)}, comma-separated "
        f"(${METRICS_EXPORTER_ENV}; default otlp when OTEL_EXPORTER_OTLP_ENDPOINT is set, "
        "else none). OTLP reads the standard OTEL_EXPORTER_OTLP_* variables.",
    )


def configure_metrics(exporters: Sequence[str]) -> MeterProvider | None:
    """An SDK meter provider exporting to ``exporters`` (``None`` when there are none)."""
    if not exporters:
        return None
    readers = [PeriodicExportingMetricReader(_exporter(name)) for name in exporters]
    # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, when set, name the service instead.
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    resource = Resource.create({} if named else {"service.name": SERVICE_NAME})
    return MeterProvider(metric_readers=readers, resource=resource)


def _exporter(name: str) -> MetricExporter:
    if name == "console":
        return ConsoleMetricExporter()
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    except ImportError:
        raise SettingsError(
            "the otlp metrics exporter needs opentelemetry-exporter-otlp-proto-http; install "
            "it, or choose --metrics-exporter console/none"
        ) from None
    return OTLPMetricExporter()


class HealthServer:
    """``GET /healthz``: 200 with the worker's status while healthy, 503 otherwise."""

    def __init__(self, port: int, status: Callable[[], dict[str, Any]]) -> None:
        self._server = ThreadingHTTPServer((HEALTH_HOST, port), _health_handler(status))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


def _health_handler(status: Callable[[], dict[str, Any]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # BaseHTTPRequestHandler's interface
            if self.path.split("?", 1)[0] != HEALTH_PATH:
                self._answer(404, {"error": f"not found; the health endpoint is {HEALTH_PATH}"})
                return
            report = status()
            self._answer(200 if report["healthy"] else 503, report)

        def _answer(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            # Probes hit this every few seconds: keep them out of the logs.
            logger.debug("health request", extra={"request": format % args})

    return Handler


def open_receiver(settings: WorkerSettings) -> Any:
    """The queue the settings name; the local SQLite queue takes the lock settings, which
    on Service Bus are properties of the queue itself."""
    from langgraph.checkpoint.kusto.outbox import open_queue

    if settings.queue.startswith("sqlite:"):
        from langgraph.checkpoint.kusto.outbox.sqlite import SqliteQueue

        return SqliteQueue.from_url(
            settings.queue,
            lock_duration=settings.lock_duration,
            max_delivery_count=settings.max_delivery_count,
        )
    return open_queue(settings.queue)


def build_worker(
    settings: WorkerSettings, receiver: Any, ingestor: Any, meter_provider: MeterProvider | None
) -> worker.Worker:
    return worker.Worker(
        receiver,
        ingestor,
        max_batch_events=settings.max_batch_events,
        max_batch_bytes=settings.max_batch_bytes,
        max_batch_delay=settings.max_batch_delay,
        max_batch_messages=settings.max_batch_messages,
        max_wait=settings.max_wait,
        retry=settings.retry_policy(),
        chunk_group_timeout=settings.chunk_group_timeout,
        shutdown_timeout=settings.shutdown_timeout,
        max_lock_renewal=settings.max_lock_renewal,
        metrics=WorkerMetrics(meter_provider),
    )


def run_worker_command(args: argparse.Namespace) -> int:
    """``langgraph-kusto worker``: run until SIGTERM/SIGINT; 0 after a clean stop, 1 if the
    queue could not be opened, the worker failed or overran its shutdown deadline, 2 for
    unusable settings."""
    from .ingest import KustoIngestor

    try:
        settings = WorkerSettings.from_args(args)
        meter_provider = configure_metrics(settings.metrics_exporters)
    except SettingsError as exc:
        return _usage_error(str(exc))
    try:
        receiver = open_receiver(settings)
    except ValueError as exc:
        return _usage_error(str(exc))
    except OutboxError as exc:
        print(f"langgraph-kusto worker: {exc}", file=sys.stderr)
        return 1
    closers: list[Callable[[], None]] = [receiver.close]
    if meter_provider is not None:
        closers.append(lambda: meter_provider.shutdown(timeout_millis=METRICS_FLUSH_MILLIS))
    try:
        try:
            ingestor = KustoIngestor(
                settings.cluster,
                settings.database,
                mode=settings.ingestion_mode,
                ingest_endpoint=settings.ingest_endpoint,
            )
        except ValueError as exc:
            return _usage_error(str(exc))
        closers.insert(0, ingestor.close)
        the_worker = build_worker(settings, receiver, ingestor, meter_provider)
        if settings.health_port:
            try:
                health = HealthServer(settings.health_port, the_worker.health).start()
            except OSError as exc:
                return _usage_error(
                    f"cannot serve the health endpoint on port {settings.health_port} ({exc}); "
                    f"choose another with --health-port or ${HEALTH_PORT_ENV}, or 0 for none"
                )
            closers.insert(0, health.close)
        logger.info(
            "worker service starting",
            extra={
                "cluster": settings.cluster,
                "database": settings.database,
                "ingestion_mode": settings.ingestion_mode.value,
                "health_port": settings.health_port,
                "metrics_exporters": ",".join(settings.metrics_exporters) or "none",
                "shutdown_timeout": settings.shutdown_timeout,
            },
        )
        return _run_until_stopped(the_worker, settings.shutdown_timeout)
    finally:
        for close in closers:
            try:
                close()
            except Exception as exc:  # closing must not hide the exit code
                logger.warning("error while closing", extra={"error": repr(exc)})


def _usage_error(message: str) -> int:
    print(f"langgraph-kusto worker: {message}", file=sys.stderr)
    return 2


def _run_until_stopped(the_worker: worker.Worker, shutdown_timeout: float) -> int:
    """Run the worker on its own thread and supervise it from this one.

    The main thread only waits, so signals are handled at once, and it can still exit when
    the worker thread is stuck past the shutdown deadline (in a call that cannot be
    interrupted); the queue then redelivers what that worker held, after its locks expire.
    """
    crashed = threading.Event()

    def work() -> None:
        try:
            the_worker.run()
        except BaseException:
            logger.exception("worker failed")
            crashed.set()

    previous = _install_signal_handlers(the_worker)
    thread = threading.Thread(target=work, name="worker", daemon=True)
    thread.start()
    stop_seen: float | None = None
    try:
        while thread.is_alive():
            thread.join(SUPERVISE_INTERVAL)
            if stop_seen is None and the_worker.stop_requested:
                stop_seen = time.monotonic()
                logger.info("stopping", extra={"shutdown_timeout": shutdown_timeout})
            if stop_seen is not None and (
                time.monotonic() - stop_seen > shutdown_timeout + SHUTDOWN_GRACE
            ):
                logger.critical(
                    "worker did not stop within the shutdown deadline; exiting anyway",
                    extra={"shutdown_timeout": shutdown_timeout},
                )
                return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if crashed.is_set():
        return 1
    if not the_worker.stop_requested:
        logger.error("worker stopped without being asked to")
        return 1
    return 0


def _install_signal_handlers(the_worker: worker.Worker) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}  # only the main thread may set handlers; an embedding app owns signals

    def request_stop(signum: int, frame: Any) -> None:
        the_worker.request_stop()

    return {
        signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGINT)
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m langgraph.checkpoint.kusto.ingestor_worker.service``: the worker command
    without the rest of the CLI, with the same JSON logs."""
    from .cli import JsonLogFormatter

    parser = argparse.ArgumentParser(
        prog="langgraph-kusto-worker",
        description="Run the ingestor worker until SIGTERM/SIGINT.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    return run_worker_command(args)


if __name__ == "__main__":
    sys.exit(main())
