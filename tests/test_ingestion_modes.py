"""The worker's ingestion modes against the local stack, through the real ingest SDK.

Streaming posts to the local Kusto server; managed streaming streams and falls back to
queued for a request over 4 MB; queued uploads a blob to azurite (the Azure Storage
emulator, npm) through the resources the local server's data-management endpoint hands
out, and the server ingests it from azurite's queue. A batch queued twice is stored once
(``ingest-by`` tags with ``ingestIfNotExists``).
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from azure.identity import DefaultAzureCredential
from azure.kusto.data import KustoClient, KustoConnectionStringBuilder
from azure.kusto.data.data_format import DataFormat
from azure.kusto.ingest import (
    IngestionProperties,
    QueuedIngestClient,
    ReportLevel,
    StreamDescriptor,
)
from azure.kusto.ingest.status import KustoIngestStatusQueues
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.kusto import KustoSaver
from langgraph.checkpoint.kusto.ingestor_worker.ingest import (
    JSON_MAPPING,
    IngestionMode,
    KustoIngestor,
    batch_tag,
    ingestion_endpoint,
)
from langgraph.checkpoint.kusto.ingestor_worker.worker import Worker
from langgraph.checkpoint.kusto.local.kusto_server import (
    Azurite,
    LocalKustoServer,
    start_azurite,
)
from langgraph.checkpoint.kusto.outbox import open_queue
from langgraph.checkpoint.kusto.schema import provision_commands
from langgraph.checkpoint.kusto.shared.rows import TABLE

DB = "langgraph"


def azurite_or_fail() -> Azurite:
    """azurite, or a failure that says how to install it (never a skip)."""
    try:
        return start_azurite()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def azurite() -> Iterator[Azurite]:
    emulator = azurite_or_fail()
    yield emulator
    emulator.close()


@pytest.fixture(scope="module")
def server(azurite: Azurite) -> Iterator[LocalKustoServer]:
    """A provisioned local Kusto server whose data-management endpoint uses azurite."""
    with LocalKustoServer(None, storage=azurite.connection_string) as local:
        client = KustoClient(KustoConnectionStringBuilder.with_no_authentication(local.url))
        for command in provision_commands():
            client.execute_mgmt(DB, command)
        client.close()
        yield local


@pytest.fixture(scope="module")
def client(server: LocalKustoServer) -> Iterator[KustoClient]:
    kusto = KustoClient(KustoConnectionStringBuilder.with_no_authentication(server.url))
    yield kusto
    kusto.close()


def rows_for(event_id: str, count: int, payload_bytes: int = 10) -> list[dict[str, Any]]:
    """``count`` blob rows of one event, with random payloads of ``payload_bytes`` each."""
    return [
        {
            "RowId": f"{event_id}/{index}",
            "EventId": event_id,
            "EventSeq": index,
            "PublishedAt": "2024-05-01T10:00:00Z",
            "RowKind": "blob",
            "ThreadId": f"modes-{event_id}",
            "Chunk": index,
            "ChunkCount": count,
            "Payload": base64.b64encode(os.urandom(payload_bytes)).decode(),
        }
        for index in range(count)
    ]


def stored(client: KustoClient, event_id: str) -> int:
    from azure.kusto.data import ClientRequestProperties

    properties = ClientRequestProperties()
    properties.set_parameter("event_id", event_id)
    response = client.execute_query(
        DB,
        f"declare query_parameters(event_id:string); {TABLE} | where EventId == event_id | count",
        properties,
    )
    return int(response.primary_results[0][0]["Count"])


def extent_tags(client: KustoClient) -> list[str]:
    """Tags of every extent of the table, one string per extent ("" for an untagged one)."""
    response = client.execute_mgmt(DB, f".show table {TABLE} extents")
    return [row["Tags"] for row in response.primary_results[0]]


@pytest.fixture
def ingestor_factory(server: LocalKustoServer) -> Iterator[Any]:
    made: list[KustoIngestor] = []

    def make(mode: IngestionMode) -> KustoIngestor:
        made.append(KustoIngestor(server.url, DB, mode=mode))
        return made[-1]

    yield make
    for ingestor in made:
        ingestor.close()


# ---------------------------------------------------------------------------
# The three modes
# ---------------------------------------------------------------------------


def test_streaming_commits_a_batch_at_once_as_one_untagged_extent(
    client: KustoClient, ingestor_factory: Any
) -> None:
    event = uuid.uuid4().hex
    before = extent_tags(client)
    ingestor_factory(IngestionMode.STREAMING).ingest(rows_for(event, 5))
    assert stored(client, event) == 5  # queryable when ingest() returns
    assert extent_tags(client) == [*before, ""]  # one operation; streaming takes no tags


def test_managed_streams_a_small_batch(
    server: LocalKustoServer, client: KustoClient, ingestor_factory: Any
) -> None:
    event = uuid.uuid4().hex
    before = extent_tags(client)
    ingestor_factory(IngestionMode.MANAGED).ingest(rows_for(event, 5))
    assert stored(client, event) == 5
    assert extent_tags(client) == [*before, ""]  # streamed, not queued (that would be tagged)


def test_managed_falls_back_to_queued_for_a_batch_over_4mb(
    server: LocalKustoServer, client: KustoClient, ingestor_factory: Any
) -> None:
    event = uuid.uuid4().hex
    rows = rows_for(event, 12, payload_bytes=512 * 1024)  # ~6 MB gzipped: over the 4 MB cap
    before = extent_tags(client)
    ingestor_factory(IngestionMode.MANAGED).ingest(rows)
    server.wait_for_queued_ingestion()
    assert stored(client, event) == 12
    assert extent_tags(client) == [*before, f"ingest-by:{batch_tag(rows)}"]


def test_queued_ingests_through_azurite_and_stores_a_batch_sent_twice_once(
    server: LocalKustoServer, client: KustoClient, ingestor_factory: Any
) -> None:
    event = uuid.uuid4().hex
    rows = rows_for(event, 4)
    before = extent_tags(client)
    ingestor = ingestor_factory(IngestionMode.QUEUED)
    ingestor.ingest(rows)
    ingestor.ingest(rows)  # a retry after a lost answer
    ingestor.ingest(list(reversed(rows)))  # a redelivery that batched the rows differently
    server.wait_for_queued_ingestion()
    assert stored(client, event) == 4
    assert extent_tags(client) == [*before, f"ingest-by:{batch_tag(rows)}"]

    # A batch with one more event is a different batch and is stored.
    other = uuid.uuid4().hex
    ingestor.ingest([*rows, *rows_for(other, 1)])
    server.wait_for_queued_ingestion()
    assert (stored(client, event), stored(client, other)) == (8, 1)


def test_queued_blob_is_all_or_nothing_and_a_refused_one_is_reported(
    server: LocalKustoServer, client: KustoClient
) -> None:
    """The SDK's own clients: a blob with one malformed record stores nothing, and the
    failure reaches ``.show ingestion failures`` and the failed-ingestions queue."""
    event = uuid.uuid4().hex
    good = [json.dumps(row) for row in rows_for(event, 30)]
    body = "\n".join([*good[:15], '{"RowId": "broken", ', *good[15:]]).encode()
    queued = QueuedIngestClient(KustoConnectionStringBuilder.with_no_authentication(server.url))
    try:
        result = queued.ingest_from_stream(
            StreamDescriptor(io.BytesIO(body)),
            IngestionProperties(
                DB,
                TABLE,
                data_format=DataFormat.MULTIJSON,
                ingestion_mapping_reference=JSON_MAPPING,
                report_level=ReportLevel.FailuresOnly,
            ),
        )
        server.wait_for_queued_ingestion()
        failures = KustoIngestStatusQueues(queued).failure.pop(10)
    finally:
        queued.close()
    assert stored(client, event) == 0
    [failure] = [f for f in failures if f.IngestionSourceId == str(result.source_id)]
    assert failure.ErrorCode == "BadRequest_InvalidBlob" and "malformed JSON" in failure.Details
    listed = client.execute_mgmt(DB, ".show ingestion failures").primary_results[0]
    assert str(result.source_id) in {str(row["IngestionSourceId"]) for row in listed}


# ---------------------------------------------------------------------------
# The worker in every mode: saver -> SQLite queue -> worker -> Kusto -> saver
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(IngestionMode))
def test_the_worker_ingests_in_every_mode(
    server: LocalKustoServer, mode: IngestionMode, private_queue: str
) -> None:
    thread_id = f"worker-{mode}-{uuid.uuid4().hex[:8]}"
    config = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    with KustoSaver.from_conn_string(
        private_queue, server.url, DB, consistency="eventual"
    ) as saver:
        ids = []
        for step in range(3):
            checkpoint = empty_checkpoint()
            checkpoint["id"] = str(uuid6(clock_seq=step))
            checkpoint["channel_values"] = {"step": step}
            checkpoint["channel_versions"] = {"step": saver.get_next_version(None, None)}
            saver.put(config, checkpoint, {"step": step}, checkpoint["channel_versions"])
            ids.append(checkpoint["id"])

        queue = open_queue(private_queue)
        ingestor = KustoIngestor(server.url, DB, mode=mode)
        try:
            worker = Worker(queue, ingestor, max_wait=0.05)
            deadline = time.monotonic() + 30
            while queue.depth() and time.monotonic() < deadline:
                worker.run_once()
            assert queue.depth() == 0
        finally:
            ingestor.close()
            queue.close()
        if mode is IngestionMode.QUEUED:
            server.wait_for_queued_ingestion()
        listed = [t.checkpoint["id"] for t in saver.list(config)]
        latest = saver.get_tuple(config)
    assert listed == ids[::-1]
    assert latest is not None and latest.checkpoint["channel_values"] == {"step": 2}


# ---------------------------------------------------------------------------
# Endpoints and authentication
# ---------------------------------------------------------------------------


class FakeCredential:
    """A token credential that is never asked for a token: nothing here is sent."""

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        raise AssertionError("no request should reach Azure in this test")

    def close(self) -> None:
        """The SDK closes the credential with the client."""


def test_the_data_management_endpoint_is_derived_from_the_cluster() -> None:
    cluster = "https://mycluster.westeurope.kusto.windows.net"
    assert ingestion_endpoint(cluster) == "https://ingest-mycluster.westeurope.kusto.windows.net"
    assert ingestion_endpoint("https://ingest-x.kusto.windows.net") == (
        "https://ingest-x.kusto.windows.net"
    )
    # The local server serves the engine and data management on one address.
    assert ingestion_endpoint("http://127.0.0.1:31450") == "http://127.0.0.1:31450"


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Every (endpoint, credential) the ingestor builds a connection for, through the
    saver's ``connection_string``."""
    from langgraph.checkpoint.kusto.ingestor_worker import ingest

    seen: list[tuple[str, Any]] = []
    real = ingest.connection_string

    def spy(cluster: str, credential: Any = None, **kwargs: Any) -> Any:
        seen.append((cluster, credential))
        return real(cluster, credential, **kwargs)

    monkeypatch.setattr(ingest, "connection_string", spy)
    return seen


def test_the_ingest_side_authenticates_like_the_saver(connections: list[tuple[str, Any]]) -> None:
    cluster = "https://mycluster.westeurope.kusto.windows.net"
    credential = FakeCredential()
    KustoIngestor(cluster, DB, mode="managed", credential=credential).close()
    assert connections == [
        (cluster, credential),
        ("https://ingest-mycluster.westeurope.kusto.windows.net", credential),
    ]

    connections.clear()
    private = "https://private-ingest-endpoint.example.net"
    KustoIngestor(
        cluster, DB, mode="queued", credential=credential, ingest_endpoint=private
    ).close()
    assert connections[-1] == (private, credential)

    # No credential given: one DefaultAzureCredential for both endpoints.
    connections.clear()
    KustoIngestor(cluster, DB, mode="managed").close()
    (_, engine), (_, data_management) = connections
    assert isinstance(engine, DefaultAzureCredential) and data_management is engine

    # Loopback (the local server): no authentication at all.
    connections.clear()
    KustoIngestor("http://127.0.0.1:9", DB, mode="managed").close()
    assert connections == [("http://127.0.0.1:9", None), ("http://127.0.0.1:9", None)]

    with pytest.raises(ValueError, match="https"):
        KustoIngestor("http://kusto.example.net", DB, credential=credential)


def test_queued_ingestion_without_storage_says_what_is_missing() -> None:
    """A local server started without azurite refuses the data-management commands with
    the fix in the message, and the queued client surfaces it."""
    with LocalKustoServer(None) as bare:
        ingestor = KustoIngestor(bare.url, DB, mode=IngestionMode.QUEUED)
        try:
            with pytest.raises(Exception, match=r"30-azurite\.sh"):
                ingestor.ingest(rows_for(uuid.uuid4().hex, 1))
        finally:
            ingestor.close()


def test_the_data_management_loop_survives_a_concurrent_reader(
    server: LocalKustoServer, client: KustoClient, ingestor_factory: Any
) -> None:
    """Readers polling while queued blobs land see each batch whole or not at all."""
    ingestor = ingestor_factory(IngestionMode.QUEUED)
    events = [uuid.uuid4().hex for _ in range(4)]
    partial: list[int] = []
    stop = threading.Event()

    def read() -> None:
        own = KustoClient(KustoConnectionStringBuilder.with_no_authentication(server.url))
        while not stop.is_set():
            for event in events:
                count = stored(own, event)
                if count not in (0, 40):
                    partial.append(count)
        own.close()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        for event in events:
            ingestor.ingest(rows_for(event, 40, payload_bytes=2000))
        server.wait_for_queued_ingestion()
    finally:
        stop.set()
        reader.join(timeout=10)
    assert partial == []
    assert [stored(client, event) for event in events] == [40] * 4
