"""The worker's OpenTelemetry metrics.

Instruments come from the OpenTelemetry API, so they are no-ops until someone installs an
SDK meter provider: the worker service does (``service.configure_metrics``), and so does
``opentelemetry-instrument`` or an application that embeds the worker. Attributes are
low-cardinality labels (a reason, a cause, an outcome), never ids or payloads.
"""

from __future__ import annotations

import time

from opentelemetry import metrics

METER_NAME = "langgraph.checkpoint.kusto.worker"
PREFIX = "langgraph_kusto.worker"

# Seconds: from a fast local ingest (a few ms) to a slow Azure one and long backlogs.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)
_BATCH_EVENT_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


class WorkerMetrics:
    """What the worker reports; one instance per worker."""

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        provider = meter_provider or metrics.get_meter_provider()
        meter = provider.get_meter(METER_NAME)
        self._received = meter.create_counter(
            f"{PREFIX}.events.received",
            unit="{event}",
            description="Events taken from the queue (each redelivery counts again); an "
            "undecodable message counts as one event",
        )
        self._ingested = meter.create_counter(
            f"{PREFIX}.events.ingested", unit="{event}", description="Events ingested into Kusto"
        )
        self._dead_lettered = meter.create_counter(
            f"{PREFIX}.events.dead_lettered",
            unit="{event}",
            description="Events moved to the dead-letter queue, by reason",
        )
        self._abandoned = meter.create_counter(
            f"{PREFIX}.events.abandoned",
            unit="{event}",
            description="Events given back to the queue for redelivery, by cause",
        )
        self._locks_lost = meter.create_counter(
            f"{PREFIX}.locks.lost",
            unit="{message}",
            description="Messages whose peek-lock expired while in hand (they are redelivered)",
        )
        self._retries = meter.create_counter(
            f"{PREFIX}.ingestion.retries",
            unit="{retry}",
            description="Ingestion attempts retried after a transient failure, by cause",
        )
        self._batch_events = meter.create_histogram(
            f"{PREFIX}.batch.size",
            unit="{event}",
            description="Events per ingestion operation",
            explicit_bucket_boundaries_advisory=_BATCH_EVENT_BUCKETS,
        )
        self._batch_bytes = meter.create_histogram(
            f"{PREFIX}.batch.bytes",
            unit="By",
            description="Queue message bytes per ingestion operation",
        )
        self._duration = meter.create_histogram(
            f"{PREFIX}.ingestion.duration",
            unit="s",
            description="Duration of one ingestion attempt, by outcome",
            explicit_bucket_boundaries_advisory=_LATENCY_BUCKETS,
        )
        self._lag = meter.create_histogram(
            f"{PREFIX}.lag",
            unit="s",
            description="From the saver publishing an event to its ingestion into Kusto",
            explicit_bucket_boundaries_advisory=_LAG_BUCKETS,
        )

    def received(self, events: int) -> None:
        self._received.add(events)

    def ingested(self, published_at: list[float], queue_bytes: int) -> None:
        """One successful ingestion operation of events published at these (epoch) times."""
        now = time.time()
        self._ingested.add(len(published_at))
        self._batch_events.record(len(published_at))
        self._batch_bytes.record(queue_bytes)
        for at in published_at:
            # Publisher and worker clocks may disagree by a little; a lag is never negative.
            self._lag.record(max(0.0, now - at))

    def dead_lettered(self, reason: str, events: int = 1) -> None:
        self._dead_lettered.add(events, {"reason": reason})

    def abandoned(self, cause: str, events: int) -> None:
        if events:
            self._abandoned.add(events, {"cause": cause})

    def locks_lost(self, messages: int) -> None:
        self._locks_lost.add(messages)

    def retry(self, cause: str) -> None:
        self._retries.add(1, {"cause": cause})

    def attempt(self, seconds: float, outcome: str) -> None:
        self._duration.record(seconds, {"outcome": outcome})
