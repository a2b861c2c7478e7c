"""One batch of rows into Kusto in one ingestion operation.

One operation per batch is what makes a checkpoint and its blobs visible together:
Kusto commits one ingestion operation into one table atomically. Each mode below sends a
batch as one request (streaming) or one blob (queued), never more.

Modes (docs/kusto.md says when to use which):

* ``streaming``: the engine's streaming endpoint; queryable in about a second, at most
  4 MB (gzipped) a request.
* ``managed``: ``ManagedStreamingIngestClient``: streaming, falling back to queued for a
  request over 4 MB or after transient streaming failures.
* ``queued``: ``QueuedIngestClient``: a blob in the data-management endpoint's storage,
  ingested after the table's batching time; any size.

Queued blobs are tagged ``ingest-by:<digest of the batch's RowIds>`` and ingested only if
that tag does not exist yet (``ingestIfNotExists``), so a batch sent twice (a retry
after a lost answer, a redelivery) is stored once. Streaming has no such check: readers
drop the second copy by ``RowId``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from azure.kusto.data.data_format import DataFormat
from azure.kusto.ingest import (
    BaseIngestClient,
    IngestionProperties,
    KustoStreamingIngestClient,
    ManagedStreamingIngestClient,
    QueuedIngestClient,
    ReportLevel,
    StreamDescriptor,
)
from langgraph.checkpoint.kusto.kusto import connection_string, is_local_cluster
from langgraph.checkpoint.kusto.shared.rows import TABLE

JSON_MAPPING = "CheckpointEventsJson"
"""Created by provision.kql; maps each JSON property to the column of the same name."""

GZIP_LEVEL = 1
"""Payloads are base64 of serialized state: level 9 compresses them no better than level 1
(both ~76%) and takes ~1.5x the CPU."""


class IngestionMode(StrEnum):
    STREAMING = "streaming"
    MANAGED = "managed"
    QUEUED = "queued"


def encode_rows(rows: Sequence[dict[str, Any]]) -> bytes:
    """Rows as multi-JSON (one object per line)."""
    return "\n".join(json.dumps(row, ensure_ascii=False) for row in rows).encode()


def batch_tag(rows: Sequence[dict[str, Any]]) -> str:
    """The batch's ``ingest-by`` tag value: a digest of its RowIds, in any order.

    The same events give the same tag however the worker orders them, so a retried or
    redelivered batch is recognised; a batch that differs by one event is a new batch.
    """
    digest = hashlib.sha256("\n".join(sorted(str(row["RowId"]) for row in rows)).encode())
    return digest.hexdigest()[:32]


def ingestion_endpoint(cluster: str) -> str:
    """The data-management endpoint of ``cluster``: ``https://ingest-<cluster host>`` on
    Azure (the SDK's own rule); the local server answers both on one address."""
    return BaseIngestClient.get_ingestion_endpoint(cluster)


class KustoIngestor:
    """Ingests rows into ``CheckpointEvents`` with azure-kusto-ingest, one operation a call.

    ``ingest_endpoint`` overrides the data-management endpoint derived from ``cluster``
    (managed and queued modes), e.g. for a private endpoint. Authentication follows
    ``connection_string``: none on loopback, azure-identity elsewhere, one credential for
    both endpoints.
    """

    def __init__(
        self,
        cluster: str,
        database: str,
        *,
        mode: IngestionMode | str = IngestionMode.STREAMING,
        credential: Any | None = None,
        ingest_endpoint: str | None = None,
    ) -> None:
        self.mode = IngestionMode(mode)
        self.database = database
        if credential is None and not is_local_cluster(cluster):
            # One credential shared by the engine and data-management connections, so a
            # token is acquired once per resource rather than once per connection.
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential()
        engine = connection_string(cluster, credential)
        self.ingest_endpoint = ingest_endpoint or ingestion_endpoint(cluster)
        # Endpoints are derived above, explicitly: the SDK's auto-correction would rewrite
        # an ingest_endpoint that does not follow the ingest-<cluster> naming.
        self._client: BaseIngestClient
        if self.mode is IngestionMode.STREAMING:
            self._client = KustoStreamingIngestClient(engine, auto_correct_endpoint=False)
        else:
            data_management = connection_string(self.ingest_endpoint, credential)
            if self.mode is IngestionMode.MANAGED:
                self._client = ManagedStreamingIngestClient(
                    engine, data_management, auto_correct_endpoint=False
                )
            else:
                self._client = QueuedIngestClient(data_management, auto_correct_endpoint=False)

    def ingest(self, rows: Sequence[dict[str, Any]], encoded: bytes | None = None) -> None:
        """Ingest ``rows`` as one operation.

        ``encoded`` is ``encode_rows(rows)`` when the caller has it already (the worker
        encodes each event once, to size its batches), so it is not encoded twice.

        Returns once Kusto has the batch: committed (streaming), or stored in the
        data-management endpoint's blob storage and queued (queued, and managed's
        fallback), from where Kusto ingests it without us; it reports a blob it gives up
        on in ``.show ingestion failures`` and the failed-ingestions queue.
        """
        tag = batch_tag(rows)
        data = encode_rows(rows) if encoded is None else encoded
        body = gzip.compress(data, compresslevel=GZIP_LEVEL)
        properties = IngestionProperties(
            database=self.database,
            table=TABLE,
            data_format=DataFormat.MULTIJSON,
            ingestion_mapping_reference=JSON_MAPPING,
            ingest_by_tags=[tag],
            ingest_if_not_exists=[tag],
            report_level=ReportLevel.FailuresOnly,
        )
        # A fresh source id (the SDK's default) on every attempt: it names the uploaded
        # blob, and the SDK refuses to overwrite one.
        descriptor = StreamDescriptor(
            io.BytesIO(body),
            is_compressed=True,
            size=len(data),  # raw size: what queued ingestion's batching policy counts
        )
        self._client.ingest_from_stream(descriptor, properties)

    def close(self) -> None:
        self._client.close()
