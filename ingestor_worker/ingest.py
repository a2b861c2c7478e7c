"""One batch of rows into Kusto in one ingestion operation.

One operation per batch is what makes a checkpoint and its blobs visible together:
Kusto commits one ingestion operation into one table atomically.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from azure.kusto.data.data_format import DataFormat
from azure.kusto.ingest import (
    IngestionProperties,
    KustoStreamingIngestClient,
    StreamDescriptor,
)
from langgraph.checkpoint.kusto.kusto import connection_string
from langgraph.checkpoint.kusto.shared.rows import TABLE

JSON_MAPPING = "CheckpointEventsJson"
"""Created by provision.kql; maps each JSON property to the column of the same name."""


class IngestionMode(StrEnum):
    STREAMING = "streaming"


def encode_rows(rows: Sequence[dict[str, Any]]) -> bytes:
    """Rows as multi-JSON (one object per line)."""
    return "\n".join(json.dumps(row, ensure_ascii=False) for row in rows).encode()


class KustoIngestor:
    """Ingests rows into ``CheckpointEvents`` with azure-kusto-ingest."""

    def __init__(
        self,
        cluster: str,
        database: str,
        *,
        mode: IngestionMode | str = IngestionMode.STREAMING,
        credential: Any | None = None,
    ) -> None:
        self.mode = IngestionMode(mode)
        self.database = database
        self._client = KustoStreamingIngestClient(connection_string(cluster, credential))
        self._properties = IngestionProperties(
            database=database,
            table=TABLE,
            data_format=DataFormat.MULTIJSON,
            ingestion_mapping_reference=JSON_MAPPING,
        )

    def ingest(self, rows: Sequence[dict[str, Any]]) -> None:
        data = encode_rows(rows)
        self._client.ingest_from_stream(
            StreamDescriptor(io.BytesIO(data), size=len(data)), self._properties
        )

    def close(self) -> None:
        self._client.close()
