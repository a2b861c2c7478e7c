"""The local Kusto server answers the real azure-kusto SDKs the way Azure Data Explorer does.

Every test talks to the server through the unmodified ``azure-kusto-data`` /
``azure-kusto-ingest`` clients (or raw HTTP where the point is the wire format), because
the whole value of the local server is that production code runs against it unchanged.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
import requests
from azure.kusto.data import ClientRequestProperties, KustoClient, KustoConnectionStringBuilder
from azure.kusto.data.data_format import DataFormat
from azure.kusto.data.exceptions import KustoApiError
from azure.kusto.ingest import (
    IngestionProperties,
    KustoStreamingIngestClient,
    ManagedStreamingIngestClient,
    QueuedIngestClient,
    StreamDescriptor,
)
from langgraph.checkpoint.kusto.ingestor_worker.ingest import KustoIngestor
from langgraph.checkpoint.kusto.ingestor_worker.retry import classify
from langgraph.checkpoint.kusto.kusto import AsyncKustoQueries, KustoQueries
from langgraph.checkpoint.kusto.local import kusto_server
from langgraph.checkpoint.kusto.local.kusto_server import (
    LocalKustoServer,
    start_azurite,
    start_local_kusto,
)
from langgraph.checkpoint.kusto.queries import (
    MAX_SEQ_RANGES,
    Query,
    channel_history,
    ingested_events,
    select_checkpoints,
    seq_ranges,
)
from langgraph.checkpoint.kusto.schema import provision_commands
from langgraph.checkpoint.kusto.shared.envelope import Blob, Event, EventKind, Write
from langgraph.checkpoint.kusto.shared.ids import EventIds
from langgraph.checkpoint.kusto.shared.rows import TABLE, event_rows

DB = "langgraph"


@pytest.fixture
def server() -> Iterator[LocalKustoServer]:
    srv = start_local_kusto(None)
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def kcsb(server: LocalKustoServer) -> KustoConnectionStringBuilder:
    return KustoConnectionStringBuilder.with_no_authentication(server.url)


@pytest.fixture
def client(kcsb: KustoConnectionStringBuilder) -> Iterator[KustoClient]:
    kusto = KustoClient(kcsb)
    try:
        yield kusto
    finally:
        kusto.close()


def mgmt(client: KustoClient, command: str) -> list[dict[str, Any]]:
    return [row.to_dict() for row in client.execute_mgmt(DB, command).primary_results[0]]


def query(client: KustoClient, text: str, **parameters: str) -> list[dict[str, Any]]:
    properties = ClientRequestProperties()
    for name, value in parameters.items():
        properties.set_parameter(name, value)
    return [row.to_dict() for row in client.execute_query(DB, text, properties).primary_results[0]]


def api_error(exc: pytest.ExceptionInfo[KustoApiError]) -> Any:
    return exc.value.get_api_error()


def http_status(exc: pytest.ExceptionInfo[KustoApiError]) -> int:
    return int(exc.value.get_raw_http_response().status_code)


EVENTS = (
    ".create-merge table Events (ThreadId:string, Kind:string, Seq:long, EventId:string, "
    "Chunk:int, Payload:dynamic, At:datetime)"
)


def multijson(*records: dict[str, Any]) -> io.BytesIO:
    return io.BytesIO("\n".join(json.dumps(r) for r in records).encode())


def ingest(kcsb: KustoConnectionStringBuilder, table: str, data: io.BytesIO, **kw: Any) -> None:
    ingest_client = KustoStreamingIngestClient(kcsb)
    try:
        props = IngestionProperties(DB, table, data_format=DataFormat.MULTIJSON, **kw)
        ingest_client.ingest_from_stream(data, props)
    finally:
        ingest_client.close()


# ---------------------------------------------------------------------------
# Schema commands
# ---------------------------------------------------------------------------


def test_create_merge_is_idempotent_and_adds_missing_columns(client: KustoClient) -> None:
    mgmt(client, EVENTS)
    mgmt(client, EVENTS)
    mgmt(client, ".create-merge table Events (ThreadId:string, Extra:long)")

    schema = mgmt(client, ".show table Events cslschema")[0]["Schema"]
    assert schema == (
        "ThreadId:string,Kind:string,Seq:long,EventId:string,Chunk:int,Payload:dynamic,"
        "At:datetime,Extra:long"
    )
    assert [t["TableName"] for t in mgmt(client, ".show tables")] == ["Events"]

    with pytest.raises(KustoApiError) as retyped:
        mgmt(client, ".create-merge table Events (Seq:string)")
    assert "Seq" in api_error(retyped).description
    with pytest.raises(KustoApiError):
        mgmt(client, ".create table Events (ThreadId:string)")  # exists, different schema

    mgmt(client, ".create tables A (x:string), B (y:long)")
    mgmt(client, ".drop table A")
    mgmt(client, ".drop table A ifexists")
    assert [t["TableName"] for t in mgmt(client, ".show tables")] == ["B", "Events"]


def test_unknown_commands_keep_failing_with_the_kusto_error_envelope(
    client: KustoClient,
) -> None:
    with pytest.raises(KustoApiError) as unknown:
        mgmt(client, ".frobnicate table Events")
    error = api_error(unknown)
    assert error.permanent is True
    assert "frobnicate" in error.description


def test_policies_are_accepted_and_recorded(client: KustoClient) -> None:
    mgmt(client, EVENTS)
    batching = '{"MaximumBatchingTimeSpan": "00:00:10", "MaximumNumberOfItems": 500}'
    for command in (
        ".alter table Events policy streamingingestion enable",
        f".alter table Events policy ingestionbatching '{batching}'",
        ".alter-merge table Events policy retention softdelete = 30d recoverability = disabled",
        ".alter database langgraph policy caching hot = 7d",
        ".alter-merge database langgraph policy streamingingestion '{\"IsEnabled\": true}'",
        ".alter column Events.Payload policy encoding type = 'BigObject'",
    ):
        assert mgmt(client, command)[0]["PolicyName"] in command
    recorded = mgmt(client, ".show table Events policy ingestionbatching")[0]
    assert json.loads(recorded["Policy"])["MaximumNumberOfItems"] == 500

    mgmt(client, ".delete table Events policy ingestionbatching")
    assert mgmt(client, ".show table Events policy ingestionbatching")[0]["Policy"] == "null"


def test_read_only_requests_cannot_run_our_write_commands(client: KustoClient) -> None:
    properties = ClientRequestProperties()
    properties.set_option("request_readonly", True)
    with pytest.raises(KustoApiError) as refused:
        client.execute_mgmt(DB, EVENTS, properties)
    assert "read-only" in api_error(refused).description
    assert mgmt(client, ".show tables") == []


def test_execute_database_script_runs_each_command(client: KustoClient) -> None:
    script = textwrap.dedent(
        f"""\
        .execute database script <|
        // the same shape as provision.kql
        {EVENTS}

        .alter table Events policy streamingingestion enable
        .create-or-alter function Recent() {{
            Events | where Seq > 0
        }}
        """
    )
    results = mgmt(client, script)
    assert [r["Result"] for r in results] == ["Completed"] * 3
    assert query(client, "Recent() | count") == [{"Count": 0}]


# ---------------------------------------------------------------------------
# Query parameters and request options
# ---------------------------------------------------------------------------


def seed(client: KustoClient) -> None:
    mgmt(client, EVENTS)
    mgmt(
        client,
        ".ingest inline into table Events with (format='multijson') <|\n"
        + "\n".join(
            json.dumps(r)
            for r in (
                {
                    "ThreadId": "t1",
                    "Kind": "x",
                    "Seq": 1,
                    "EventId": "a",
                    "Chunk": 0,
                    "Payload": {"v": 1},
                    "At": "2024-01-01T00:00:00Z",
                },
                {
                    "ThreadId": "t1",
                    "Kind": "x",
                    "Seq": 2,
                    "EventId": "a",
                    "Chunk": 0,
                    "Payload": {"v": 2},
                    "At": "2024-01-02T00:00:00Z",
                },
                {
                    "ThreadId": "t1",
                    "Kind": "y",
                    "Seq": 3,
                    "EventId": "b",
                    "Chunk": 1,
                    "Payload": ["p", "q"],
                    "At": "2024-01-03T00:00:00Z",
                },
                {
                    "ThreadId": "t2",
                    "Kind": "x",
                    "Seq": 4,
                    "EventId": "c",
                    "Chunk": 0,
                    "Payload": {"v": 4},
                    "At": "2024-01-04T00:00:00Z",
                },
            )
        ),
    )


def test_query_parameters_reach_the_query_through_the_sync_client(client: KustoClient) -> None:
    seed(client)
    declared = (
        "declare query_parameters(tid:string, since:long, all:bool, after:datetime, "
        "ids:dynamic);\n"
        "Events | where all or ThreadId == tid | where Seq > since and At > after "
        "| where EventId in (ids) | order by Seq asc | project Seq"
    )
    rows = query(
        client,
        declared,
        tid="t1",
        since="long(0)",
        all="false",
        after="datetime(2024-01-01T12:00:00Z)",
        ids='["a", "b", "c"]',
        unused="Kusto ignores parameters a query does not declare",
    )
    assert rows == [{"Seq": 2}, {"Seq": 3}]
    rows = query(
        client, declared, tid="t1", since="0", all="true", after="2023-12-31", ids='dynamic(["c"])'
    )
    assert rows == [{"Seq": 4}]
    # A value is data, never KQL text.
    assert (
        query(
            client,
            declared,
            tid="t1' or 1==1 //",
            since="0",
            all="false",
            after="2023-12-31",
            ids="[]",
        )
        == []
    )


def test_query_parameters_through_the_async_client(server: LocalKustoServer) -> None:
    pytest.importorskip("aiohttp")
    import asyncio

    from azure.kusto.data.aio import KustoClient as AsyncKustoClient

    async def scenario() -> list[Any]:
        kcsb = KustoConnectionStringBuilder.with_no_authentication(server.url)
        async with AsyncKustoClient(kcsb) as aio:
            await aio.execute_mgmt(DB, ".create table T (a:string, b:long)")
            await aio.execute_mgmt(DB, ".ingest inline into table T <|\nx,1\ny,2\nz,3")
            properties = ClientRequestProperties()
            properties.set_parameter("n", "1")
            response = await aio.execute_query(
                DB, "declare query_parameters(n:long); T | where b > n | order by b asc", properties
            )
            return [row["a"] for row in response.primary_results[0]]

    assert asyncio.run(scenario()) == ["y", "z"]


def test_request_options_a_client_commonly_sends_are_not_refused(client: KustoClient) -> None:
    seed(client)
    properties = ClientRequestProperties()
    properties.set_option(ClientRequestProperties.request_timeout_option_name, timedelta(minutes=2))
    properties.set_option("notruncation", True)
    properties.set_option("queryconsistency", "weakconsistency")
    properties.set_option(
        ClientRequestProperties.results_defer_partial_query_failures_option_name, False
    )
    properties.set_parameter("tid", "t2")
    response = client.execute_query(
        DB,
        "declare query_parameters(tid:string); Events | where ThreadId == tid | count",
        properties,
    )
    assert response.primary_results[0][0]["Count"] == 1


def test_a_wrong_database_name_is_refused_with_a_clear_error(client: KustoClient) -> None:
    with pytest.raises(KustoApiError) as wrong:
        client.execute_query("otherdb", "print 1")
    assert "langgraph" in api_error(wrong).description


# ---------------------------------------------------------------------------
# Streaming ingestion
# ---------------------------------------------------------------------------


def test_streaming_ingest_multijson_then_query(
    client: KustoClient, kcsb: KustoConnectionStringBuilder
) -> None:
    mgmt(client, EVENTS)
    ingest(
        kcsb,
        "Events",
        multijson(
            {
                "ThreadId": "t1",
                "Kind": "x",
                "Seq": 1,
                "EventId": "e1",
                "Chunk": 0,
                "Payload": {"nested": [1, 2]},
                "At": "2024-05-01T10:00:00.1234567Z",
            },
            {"ThreadId": "t1", "Seq": 2, "EventId": "e2", "Extra": "ignored"},
        ),
    )
    rows = query(client, "Events | order by Seq asc")
    assert rows[0]["Payload"] == {"nested": [1, 2]}
    assert rows[0]["At"] == dt.datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=dt.UTC)
    # Absent fields: null, except that a Kusto string is never null.
    assert rows[1]["Kind"] == "" and rows[1]["Chunk"] is None and rows[1]["Payload"] is None

    # The managed client streams first and succeeds without falling back to queued.
    managed = ManagedStreamingIngestClient(kcsb)
    try:
        props = IngestionProperties(DB, "Events", data_format=DataFormat.MULTIJSON)
        result = managed.ingest_from_stream(multijson({"ThreadId": "t9", "Seq": 9}), props)
    finally:
        managed.close()
    assert result.status.name == "SUCCESS"
    assert query(client, "Events | where ThreadId == 't9' | project Seq") == [{"Seq": 9}]


def test_an_ingestion_with_one_bad_row_stores_nothing(
    client: KustoClient, kcsb: KustoConnectionStringBuilder
) -> None:
    mgmt(client, EVENTS)
    good = [json.dumps({"ThreadId": "t1", "Seq": i, "EventId": f"e{i}"}) for i in range(50)]
    body = "\n".join([*good[:25], '{"ThreadId": "t1", "Seq": 99, "EventId": ', *good[25:]])

    with pytest.raises(KustoApiError) as rejected:
        ingest(kcsb, "Events", io.BytesIO(body.encode()))
    assert api_error(rejected).permanent is True
    assert query(client, "Events | count") == [{"Count": 0}]

    # Permanent, so the managed client must not fall back to queued ingestion.
    managed = ManagedStreamingIngestClient(kcsb)
    try:
        with pytest.raises(KustoApiError):
            managed.ingest_from_stream(
                io.BytesIO(body.encode()),
                IngestionProperties(DB, "Events", data_format=DataFormat.MULTIJSON),
            )
    finally:
        managed.close()
    assert query(client, "Events | count") == [{"Count": 0}]

    ingest(kcsb, "Events", io.BytesIO("\n".join(good).encode()))
    assert query(client, "Events | count") == [{"Count": 50}]


def test_ingest_into_a_missing_table_is_a_permanent_error(
    kcsb: KustoConnectionStringBuilder,
) -> None:
    with pytest.raises(KustoApiError) as missing:
        ingest(kcsb, "Nope", multijson({"a": 1}))
    assert api_error(missing).permanent is True
    assert "Nope" in api_error(missing).description


def test_csv_ingest_over_raw_http_gzip_and_chunked(
    server: LocalKustoServer, client: KustoClient
) -> None:
    mgmt(client, ".create table T (a:string, b:long, d:dynamic)")

    def chunks() -> Iterator[bytes]:  # requests sends a generator chunked
        yield gzip.compress(b'x,1,"{""k"": 1}"\ny,,\n')

    response = requests.post(
        f"{server.url}/v1/rest/ingest/{DB}/T?streamFormat=csv",
        data=chunks(),
        headers={"Content-Encoding": "gzip"},
        timeout=10,
    )
    assert response.status_code == 200
    assert response.json()["Tables"][0]["Rows"][0][0] == 2
    assert query(client, "T | order by a asc | project a, b, d") == [
        {"a": "x", "b": 1, "d": {"k": 1}},
        {"a": "y", "b": None, "d": None},
    ]
    ragged = requests.post(
        f"{server.url}/v1/rest/ingest/{DB}/T?streamFormat=csv", data=b"z,1\nw,2,3,4\n", timeout=10
    )
    assert ragged.status_code == 400
    assert ragged.json()["error"]["code"] == "Stream_WrongNumberOfFields"
    assert query(client, "T | count") == [{"Count": 2}]


def test_ingestion_mapping_by_name(client: KustoClient, kcsb: KustoConnectionStringBuilder) -> None:
    mgmt(client, ".create table T (Id:string, Value:long, Whole:dynamic)")
    mapping = json.dumps(
        [
            {"column": "Id", "Properties": {"Path": "$.meta.id"}},
            {"column": "Value", "Properties": {"Path": "$['v']"}},
            {"column": "Whole", "Properties": {"Path": "$"}},
        ]
    )
    escaped = mapping.replace("'", "\\'")  # a Kusto '...' literal escapes its quotes
    mgmt(client, f".create-or-alter table T ingestion json mapping 'M' '{escaped}'")
    ingest(kcsb, "T", multijson({"meta": {"id": "i1"}, "v": 7}), ingestion_mapping_reference="M")
    assert query(client, "T") == [{"Id": "i1", "Value": 7, "Whole": {"meta": {"id": "i1"}, "v": 7}}]
    with pytest.raises(KustoApiError) as unknown:
        ingest(kcsb, "T", multijson({"v": 1}), ingestion_mapping_reference="Missing")
    assert api_error(unknown).permanent is True


def test_kusto_value_limits_and_type_mismatches(
    client: KustoClient, kcsb: KustoConnectionStringBuilder
) -> None:
    mgmt(client, ".create table T (s:string, d:dynamic, big:dynamic, n:long)")
    mgmt(client, ".alter column T.big policy encoding type = 'BigObject'")
    over = "é" * 600_000  # 1.2 MB of UTF-8
    ingest(kcsb, "T", multijson({"s": over, "d": over, "big": over, "n": 2.5}))
    row = query(client, "T | project s = strlen(s), d, big = strlen(tostring(big)), n")[0]
    # ingest-invalid-data: strings are cut at 1 MB, larger dynamics become null, a float
    # into a long becomes null; the BigObject encoding policy raises the limit to 2 MB.
    assert row == {"s": 512 * 1024, "d": None, "big": 600_000, "n": None}


def test_streaming_requests_over_4mb_are_refused(
    server: LocalKustoServer, client: KustoClient
) -> None:
    mgmt(client, ".create table T (s:string)")
    response = requests.post(
        f"{server.url}/v1/rest/ingest/{DB}/T?streamFormat=multijson",
        data=b" " * (4 * 1024 * 1024 + 1),
        timeout=10,
    )
    assert response.status_code == 413
    assert response.json()["error"]["@permanent"] is True


DISK_FULL = 'IO Error: Could not write file "langgraph.duckdb.wal": No space left on device'


def fail_the_next_insert(monkeypatch: pytest.MonkeyPatch, error: duckdb.Error) -> None:
    """The engine raises *error* on the next ingestion's INSERT, inside its transaction."""
    real_insert = kusto_server._insert_rows
    pending = [error]

    def insert(*args: Any) -> None:
        if pending:
            raise pending.pop()
        real_insert(*args)

    monkeypatch.setattr(kusto_server, "_insert_rows", insert)


def test_an_engine_failure_during_ingestion_is_transient_and_bad_data_stays_permanent(
    client: KustoClient, kcsb: KustoConnectionStringBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk is the service's failure, not the data's: Kusto answers 5xx with
    "@permanent": false and the ingestor retries. Answered as a permanent 400, the
    ingestor bisected the batch and dead-lettered every good event at once."""
    mgmt(client, ".create table T (Id:string, Amount:decimal)")
    fail_the_next_insert(monkeypatch, duckdb.IOException(DISK_FULL))
    with pytest.raises(KustoApiError) as disk_full:
        ingest(kcsb, "T", multijson({"Id": "a", "Amount": "1.5"}))
    assert http_status(disk_full) == 500
    assert api_error(disk_full).permanent is False
    assert "No space left on device" in api_error(disk_full).description
    assert classify(disk_full.value).transient
    assert query(client, "T | count") == [{"Count": 0}]

    ingest(kcsb, "T", multijson({"Id": "a", "Amount": "1.5"}))  # the retry
    assert query(client, "T | count") == [{"Count": 1}]

    # A value DuckDB cannot convert (decimal out of range) is the data's fault: permanent.
    with pytest.raises(KustoApiError) as out_of_range:
        ingest(kcsb, "T", multijson({"Id": "b", "Amount": "1e30"}))
    assert http_status(out_of_range) == 400
    assert api_error(out_of_range).permanent is True
    assert "Conversion Error" in api_error(out_of_range).description
    assert not classify(out_of_range.value).transient


def test_an_engine_failure_in_a_query_or_command_is_transient_and_bad_kql_stays_permanent(
    server: LocalKustoServer, client: KustoClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same rule for queries and management commands: the engine failing is worth a
    retry, a query that names a column the table does not have is not."""
    mgmt(client, ".create table T (Id:string, Amount:long)")

    def failing_read(*args: Any) -> Any:
        raise duckdb.IOException("IO Error: Could not read from file: Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(server.rest_server, "_query", failing_read)
        with pytest.raises(KustoApiError) as failed_read:
            query(client, "T | count")
    assert http_status(failed_read) == 500
    assert api_error(failed_read).permanent is False

    fail_the_next_insert(monkeypatch, duckdb.IOException(DISK_FULL))
    with pytest.raises(KustoApiError) as failed_command:
        mgmt(client, ".ingest inline into table T <| a,1")
    assert http_status(failed_command) == 500
    assert api_error(failed_command).permanent is False
    mgmt(client, ".ingest inline into table T <| a,1")  # the retry
    assert query(client, "T | count") == [{"Count": 1}]

    with pytest.raises(KustoApiError) as bad_kql:
        query(client, "T | where NoSuchColumn == 1")
    assert http_status(bad_kql) == 400
    assert api_error(bad_kql).permanent is True
    assert "NoSuchColumn" in api_error(bad_kql).description


def test_an_engine_failure_inside_a_script_fails_only_its_command(
    client: KustoClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within `.execute database script` an engine failure is that command's "Failed"
    row. It failed the whole script as retryable, after the commands before it had been
    applied, so the client's retry applied them twice."""
    mgmt(client, ".create table Letters (s:string)")
    real_insert = kusto_server._insert_rows
    inserts = 0

    def second_insert_fails(*args: Any) -> None:
        nonlocal inserts
        inserts += 1
        if inserts == 2:
            raise duckdb.IOException(DISK_FULL)
        real_insert(*args)

    monkeypatch.setattr(kusto_server, "_insert_rows", second_insert_fails)
    results = mgmt(
        client,
        ".execute database script with (ContinueOnErrors=true) <|\n"
        ".ingest inline into table Letters <| a\n"
        ".ingest inline into table Letters <| b\n"
        ".ingest inline into table Letters <| c",
    )
    assert [r["Result"] for r in results] == ["Completed", "Failed", "Completed"]
    assert [r["s"] for r in query(client, "Letters | order by s asc")] == ["a", "c"]


def test_a_queued_blob_the_engine_fails_on_is_retried_not_reported_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kusto's data-management service retries its own failures; it reports a blob
    failed only for what the blob holds."""
    try:
        azurite = start_azurite()
    except FileNotFoundError as exc:  # a failure that says how to install it, never a skip
        pytest.fail(str(exc), pytrace=False)
    with azurite, LocalKustoServer(None, storage=azurite.connection_string) as local:
        kcsb = KustoConnectionStringBuilder.with_no_authentication(local.url)
        with KustoClient(kcsb) as client, QueuedIngestClient(kcsb) as queued:
            mgmt(client, ".create table T (Id:string)")
            fail_the_next_insert(monkeypatch, duckdb.IOException(DISK_FULL))
            queued.ingest_from_stream(
                StreamDescriptor(multijson({"Id": "a"})),
                IngestionProperties(DB, "T", data_format=DataFormat.MULTIJSON),
            )
            local.wait_for_queued_ingestion()
            assert query(client, "T") == [{"Id": "a"}]
            assert mgmt(client, ".show ingestion failures") == []


# ---------------------------------------------------------------------------
# Functions and strcmp
# ---------------------------------------------------------------------------


def test_function_create_or_alter_then_call_and_survives_restart(tmp_path: Path) -> None:
    with LocalKustoServer(tmp_path, database="mydb") as srv:
        kusto = KustoClient(KustoConnectionStringBuilder.with_no_authentication(srv.url))
        kusto.execute_mgmt("mydb", ".create table T (a:string, b:long)")
        kusto.execute_mgmt("mydb", ".ingest inline into table T <|\nx,1\ny,2\nz,3")
        kusto.execute_mgmt(
            "mydb",
            ".create-or-alter function with (docstring='rows above n', folder='views') "
            "Above(n:long) { T | where b > n }",
        )
        first = kusto.execute_query("mydb", "Above(1) | count").primary_results[0][0]["Count"]
        kusto.close()
    assert first == 2
    assert (tmp_path / "mydb.duckdb").exists()

    with LocalKustoServer(tmp_path, database="mydb") as srv:
        kusto = KustoClient(KustoConnectionStringBuilder.with_no_authentication(srv.url))
        again = kusto.execute_query("mydb", "Above(2) | project a").primary_results[0]
        shown = kusto.execute_mgmt("mydb", ".show functions").primary_results[0]
        kusto.execute_mgmt("mydb", ".drop function Above")
        with pytest.raises(KustoApiError):
            kusto.execute_query("mydb", "Above(2)")
        kusto.close()
    assert [row["a"] for row in again] == ["z"]
    assert [(r["Name"], r["DocString"], r["Folder"]) for r in shown] == [
        ("Above", "rows above n", "views")
    ]


def test_strcmp_orders_strings_like_kusto(client: KustoClient) -> None:
    rows = query(
        client,
        "print lt = strcmp('abc', 'abd'), gt = strcmp('b', 'abc'), eq = strcmp('x', 'x'), "
        "case = strcmp('B', 'a')",
    )
    assert rows == [{"lt": -1, "gt": 1, "eq": 0, "case": -1}]


def test_materialized_view_is_an_always_fresh_view(client: KustoClient) -> None:
    mgmt(client, ".create table T (k:string, s:long, v:string)")
    mgmt(
        client,
        ".create-or-alter materialized-view with (backfill=true) Latest on table T "
        "{ T | summarize arg_max(s, *) by k }",
    )
    mgmt(client, ".ingest inline into table T <|\na,1,x\na,2,y\nb,1,z")
    assert query(client, "Latest | order by k asc") == [
        {"k": "a", "s": 2, "v": "y"},
        {"k": "b", "s": 1, "v": "z"},
    ]
    assert [t["TableName"] for t in mgmt(client, ".show tables")] == ["T"]


# ---------------------------------------------------------------------------
# The KQL the saver runs (regression guard for duckdb-kql's translator)
# ---------------------------------------------------------------------------

SUPPORTED_KQL = {
    "let + arg_max(*)": (
        "declare query_parameters(tid:string); let Live = Events | where ThreadId == tid; "
        "Live | where Kind == 'x' | summarize arg_max(Seq, *) by EventId, Chunk | project Seq",
        [{"Seq": 2}],
    ),
    "in (dynamic param)": (
        "declare query_parameters(ids:dynamic); Events | where EventId in (ids) "
        "| order by Seq asc | project Seq",
        [{"Seq": 1}, {"Seq": 2}, {"Seq": 4}],
    ),
    "set_has_element": (
        "datatable(Tags:dynamic, Seq:long)[dynamic(['p', 'q']), 1, dynamic(['r']), 2] "
        "| where set_has_element(Tags, 'q') | project Seq",
        [{"Seq": 1}],
    ),
    "toscalar": (
        "let m = toscalar(Events | summarize max(Seq)); Events | where Seq == m | project Seq",
        [{"Seq": 4}],
    ),
    "join inner + project-away": (
        "Events | where Seq == 1 | join kind=inner (Events | where Seq == 2) on EventId "
        "| project-away ThreadId1 | project Seq, Seq1",
        [{"Seq": 1, "Seq1": 2}],
    ),
    "mv-expand": (
        "Events | where Seq == 3 | mv-expand Item = Payload | project Item = tostring(Item)",
        [{"Item": "p"}, {"Item": "q"}],
    ),
    "lookup": (
        "Events | where Seq == 4 | lookup (Events | where Seq == 4 | project EventId, X = 1) "
        "on EventId | project X",
        [{"X": 1}],
    ),
    "top N by": ("Events | top 2 by Seq desc | project Seq", [{"Seq": 4}, {"Seq": 3}]),
    "take N": ("Events | take 2 | count", [{"Count": 2}]),
    "union": ("union (Events | project Seq), (Events | project Seq) | count", [{"Count": 8}]),
    "strcmp in where": (
        "Events | where strcmp(EventId, 'b') >= 0 | order by Seq asc | project Seq",
        [{"Seq": 3}, {"Seq": 4}],
    ),
}

#: Known duckdb-kql translation gaps; strict, so the day one starts working we hear of it.
UNSUPPORTED_KQL = {
    "take_any(*)": "Events | summarize take_any(*) by EventId",
    "mv-apply": "Events | mv-apply Item = Payload to typeof(string) on (where Item == 'p')",
    "bag_unpack": "print d = dynamic({'a': 1}) | evaluate bag_unpack(d)",
    "multi-statement batch": "Events | count; Events | count",
    "set_has_element on a non-array": "Events | where set_has_element(Payload, 'q')",
    "in (split(param))": (
        "declare query_parameters(ids:string); Events | where EventId in (split(ids, ','))"
    ),
}


@pytest.mark.parametrize("name", sorted(SUPPORTED_KQL))
def test_kql_the_saver_relies_on(client: KustoClient, name: str) -> None:
    seed(client)
    text, expected = SUPPORTED_KQL[name]
    assert query(client, text, tid="t1", ids='["a","c"]') == expected


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_KQL))
@pytest.mark.xfail(raises=KustoApiError, strict=True, reason="duckdb-kql translation gap")
def test_known_kql_gaps(client: KustoClient, name: str) -> None:
    seed(client)
    query(client, UNSUPPORTED_KQL[name], ids="a,c")


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------

CLIENT_PROCESS = textwrap.dedent(
    """
    import io, json, sys
    from azure.kusto.data import ClientRequestProperties, KustoClient, KustoConnectionStringBuilder
    from azure.kusto.data.data_format import DataFormat
    from azure.kusto.ingest import IngestionProperties, KustoStreamingIngestClient

    url, name, batches, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    kcsb = KustoConnectionStringBuilder.with_no_authentication(url)
    kusto, ingest = KustoClient(kcsb), KustoStreamingIngestClient(kcsb)
    props = IngestionProperties("langgraph", "Events", data_format=DataFormat.MULTIJSON)
    crp = ClientRequestProperties()
    crp.set_parameter("tid", name)
    count = "declare query_parameters(tid:string); Events | where ThreadId == tid | count"
    for b in range(batches):
        rows = [{"ThreadId": name, "Seq": b * size + i, "EventId": f"{name}-{b}"}
                for i in range(size)]
        ingest.ingest_from_stream(io.BytesIO("\\n".join(map(json.dumps, rows)).encode()), props)
        seen = kusto.execute_query("langgraph", count, crp).primary_results[0][0]["Count"]
        assert seen == (b + 1) * size, (name, b, seen)  # own writes, whole batches only
    print("done", name)
    """
)


def test_two_client_processes_ingest_and_query_concurrently(
    server: LocalKustoServer, client: KustoClient
) -> None:
    mgmt(client, EVENTS)
    batches, size = 15, 40
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT_PROCESS, server.url, name, str(batches), str(size)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("p1", "p2")
    ]
    # Meanwhile, this process keeps reading: every batch must appear whole or not at all.
    while any(w.poll() is None for w in workers):
        partial = query(
            client, f"Events | summarize n = count() by EventId | where n != {size} | count"
        )
        assert partial == [{"Count": 0}]
    outputs = [w.communicate(timeout=60) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    assert query(client, "Events | summarize dcount(Seq) by ThreadId | order by ThreadId asc") == [
        {"ThreadId": "p1", "dcount_Seq": batches * size},
        {"ThreadId": "p2", "dcount_Seq": batches * size},
    ]


def test_serve_local_kusto_prints_its_url_and_stops_on_sigterm(tmp_path: Path) -> None:
    code = (
        "import sys; from langgraph.checkpoint.kusto.local.kusto_server import "
        "serve_local_kusto; serve_local_kusto(sys.argv[1], 0, 'langgraph')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        kusto = KustoClient(KustoConnectionStringBuilder.with_no_authentication(url))
        kusto.execute_mgmt(DB, ".create table T (a:string)")
        assert kusto.execute_query(DB, "T | count").primary_results[0][0]["Count"] == 0
        kusto.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.stdout.read() == ""  # one line on stdout, nothing else
    assert (tmp_path / "langgraph.duckdb").exists()


# ---------------------------------------------------------------------------
# Extents: ingest-by tags and ingestIfNotExists
# ---------------------------------------------------------------------------


def test_ingest_if_not_exists_skips_a_tagged_batch_in_the_same_transaction(
    client: KustoClient,
) -> None:
    mgmt(client, ".create table T (a:string, b:long)")
    tagged = (
        ".ingest inline into table T with (tags='[\"ingest-by:batch-1\"]', "
        "ingestIfNotExists='[\"batch-1\"]') <|\n"
    )
    [first] = mgmt(client, tagged + "x,1\ny,2")
    assert first["RowCount"] == 2
    assert mgmt(client, tagged + "x,1\ny,2") == []  # skipped: the tag exists
    mgmt(client, ".ingest inline into table T <|\nz,3")  # untagged: always ingested
    extents = mgmt(client, ".show table T extents")
    assert [(e["RowCount"], e["Tags"]) for e in extents] == [(2, "ingest-by:batch-1"), (1, "")]
    assert extents[0]["ExtentId"] == first["ExtentId"]
    assert query(client, "T | count") == [{"Count": 3}]

    # Tags go with the data: after a clear, the same batch is new again.
    mgmt(client, ".clear table T data")
    assert mgmt(client, ".show table T extents") == []
    assert mgmt(client, tagged + "x,1")[0]["RowCount"] == 1


def test_data_management_commands_need_storage(client: KustoClient) -> None:
    """Without azurite the data-management endpoint refuses, naming the fix; the SDK sends
    these to the database "NetDefaultDB", which must reach this refusal, not a 404."""
    for command in (".get ingestion resources", ".get kusto identity token"):
        with pytest.raises(KustoApiError) as refused:
            client.execute_mgmt("NetDefaultDB", command)
        assert "scripts/setup.d/30-azurite.sh" in api_error(refused).description


# ---------------------------------------------------------------------------
# provision.kql on the local server: accepted whole, idempotent
# ---------------------------------------------------------------------------

_POLICY_TARGET = re.compile(
    r"^\.alter(?:-merge)?\s+(table|column|materialized-view)\s+(\S+)\s+policy\s+(\w+)"
)


def schema_snapshot(client: KustoClient) -> dict[str, Any]:
    """Everything provision.kql declares, as the server reports it."""
    policies = {}
    for command in provision_commands():
        target = _POLICY_TARGET.match(command)
        if target:
            kind, entity, policy = target.groups()
            shown = mgmt(client, f".show {kind} {entity} policy {policy}")
            policies[(kind, entity, policy)] = shown[0]["Policy"]
    return {
        "tables": mgmt(client, ".show tables"),
        "schema": mgmt(client, f".show table {TABLE} cslschema"),
        "functions": mgmt(client, ".show functions"),
        "views": mgmt(client, ".show materialized-views"),
        "mappings": [
            {k: v for k, v in m.items() if k != "LastUpdatedOn"}
            for m in mgmt(client, f".show table {TABLE} ingestion json mappings")
        ],
        "policies": policies,
    }


def test_provision_kql_applies_twice_without_changing_anything(client: KustoClient) -> None:
    for command in provision_commands():
        mgmt(client, command)
    first = schema_snapshot(client)
    assert [f["Name"] for f in first["functions"]] == sorted(
        ["Checkpoints", "PendingWrites", "ChannelValues", "LatestCheckpoints"]
    )
    assert [v["Name"] for v in first["views"]] == ["LatestCheckpoint"]
    assert all(policy != "null" for policy in first["policies"].values()), first["policies"]
    mgmt(
        client,
        f".ingest inline into table {TABLE} with (format='multijson') <|\n"
        + json.dumps({"RowId": "r", "RowKind": "delete_thread", "ThreadId": "t"}),
    )

    for command in provision_commands():
        mgmt(client, command)
    assert schema_snapshot(client) == first
    assert query(client, f"{TABLE} | count") == [{"Count": 1}]  # data untouched

    # The way infra/ applies it: one database script, every command completed.
    script = ".execute database script <|\n" + "\n\n".join(provision_commands())
    assert {r["Result"] for r in mgmt(client, script)} == {"Completed"}
    assert schema_snapshot(client) == first


# ---------------------------------------------------------------------------
# Every query the saver sends, through the real clients (sync and aio), on known rows
# ---------------------------------------------------------------------------

_SEQ = itertools.count(1_000)
PUBLISHER, OTHER_PUBLISHER = EventIds(), EventIds()
_BIG = os.urandom(600 * 1024)  # two chunks of ROW_CHUNK_BYTES
HOSTILE = {"q": "x'\"|;// \n ünï"}


def _put(
    thread: str,
    checkpoint: str,
    parent: str = "",
    *,
    ns: str = "",
    versions: dict[str, str] | None = None,
    blobs: tuple[tuple[str, str, bytes], ...] = (),
    metadata: dict[str, Any] | None = None,
    publisher: EventIds = PUBLISHER,
) -> Event:
    return Event(
        kind=EventKind.PUT,
        event_id=publisher.next(),
        seq=next(_SEQ),
        published_at=1_700_000_000.0,
        thread_id=thread,
        checkpoint_ns=ns,
        checkpoint_id=checkpoint,
        parent_checkpoint_id=parent,
        checkpoint_type="msgpack",
        checkpoint_data=f"checkpoint {checkpoint}".encode(),
        channel_versions=versions or {},
        metadata=metadata or {},
        blobs=tuple(Blob(channel, version, "bytes", data) for channel, version, data in blobs),
    )


def _event(kind: EventKind, thread: str, **fields: Any) -> Event:
    return Event(
        kind=kind,
        event_id=PUBLISHER.next(),
        seq=next(_SEQ),
        published_at=1_700_000_000.0,
        thread_id=thread,
        **fields,
    )


class Known:
    """Events whose rows the saver's queries must find, or must not."""

    def __init__(self) -> None:
        self.c1 = _put(
            "t1",
            "cp-1",
            versions={"a": "1"},
            blobs=(("a", "1", b"A1"),),
            metadata={"source": "input", "step": -1},
        )
        self.c2 = _put(
            "t1",
            "cp-2",
            "cp-1",
            versions={"a": "2", "b": "1"},
            blobs=(("a", "2", _BIG), ("b", "1", b"B1")),
            metadata={"source": "loop", "step": 0},
        )
        self.w2 = _event(
            EventKind.PUT_WRITES,
            "t1",
            checkpoint_id="cp-2",
            writes=(
                Write("task-1", "", 0, "a", "bytes", b"W0"),
                Write("task-1", "", 1, "b", "bytes", b"W1"),
            ),
        )
        self.c3 = _put(
            "t1",
            "cp-3",
            "cp-2",
            versions={"a": "3", "b": "1"},
            blobs=(("a", "3", b"A3"),),
            metadata={"source": "loop", "step": 1, "nested": HOSTILE},
        )
        self.e1 = _put("t1", "cp-9", ns="child")
        # t2: deleted, then written again: only the later put is visible.
        self.d1 = _put("t2", "cp-1")
        self.d_delete = _event(EventKind.DELETE_THREAD, "t2")
        self.d2 = _put("t2", "cp-2")
        # t3: one run deleted.
        self.r1 = _put("t3", "cp-1", metadata={"run_id": "run-x"})
        self.r2 = _put("t3", "cp-2", "cp-1", metadata={"run_id": "run-y"})
        self.r_delete = _event(EventKind.DELETE_RUNS, "t3", run_ids=("run-x",))
        # t4: pruned to its latest checkpoint.
        self.p1, self.p2, self.p3 = (_put("t4", f"cp-{i}") for i in (1, 2, 3))
        self.p_prune = _event(EventKind.PRUNE, "t4", kept=(("", "cp-3"),))
        # t5: deleted for good.
        self.f1 = _put("t5", "cp-1")
        self.f_delete = _event(EventKind.DELETE_THREAD, "t5")
        # Another saver process's write.
        self.o1 = _put("t6", "cp-1", publisher=OTHER_PUBLISHER)

    def events(self) -> list[Event]:
        return [value for value in vars(self).values() if isinstance(value, Event)]

    @staticmethod
    def rows(event: Event, **match: Any) -> dict[str, str]:
        """RowId -> Payload of the event's rows whose columns equal ``match``."""
        return {
            row["RowId"]: row.get("Payload", "")
            for row in event_rows(event)
            if all(row.get(k) == v for k, v in match.items())
        }

    def checkpoint(self, event: Event) -> dict[str, str]:
        return self.rows(event, RowKind="checkpoint")

    def blob(self, event: Event, channel: str, version: str) -> dict[str, str]:
        return self.rows(event, RowKind="blob", Channel=channel, Version=version)


@pytest.fixture(scope="module")
def known() -> Iterator[tuple[LocalKustoServer, Known]]:
    """A provisioned server holding the known events, each ingested as the worker does
    (one streaming operation per event), ``c2`` twice (a redelivery)."""
    data = Known()
    with start_local_kusto(None) as srv:
        kusto = KustoClient(KustoConnectionStringBuilder.with_no_authentication(srv.url))
        for command in provision_commands():
            kusto.execute_mgmt(DB, command)
        kusto.close()
        ingestor = KustoIngestor(srv.url, DB)
        for event in [*data.events(), data.c2]:
            ingestor.ingest(event_rows(event))
        ingestor.close()
        yield srv, data


def saver_queries(known: Known) -> dict[str, tuple[Query, dict[str, str]]]:
    """Each builder's query, with the rows (RowId -> Payload) it must return."""
    k = known
    latest = {**k.checkpoint(k.c3), **k.blob(k.c3, "a", "3"), **k.blob(k.c2, "b", "1")}
    second = {
        **k.checkpoint(k.c2),
        **k.blob(k.c2, "a", "2"),
        **k.blob(k.c2, "b", "1"),
        **k.rows(k.w2),
    }
    first = {**k.checkpoint(k.c1), **k.blob(k.c1, "a", "1")}
    skeleton = {row_id: "" for e in (k.c1, k.c2, k.c3) for row_id in k.checkpoint(e)}
    channel_a = {
        **k.blob(k.c1, "a", "1"),
        **k.blob(k.c2, "a", "2"),
        **k.blob(k.c3, "a", "3"),
        **k.rows(k.w2, Channel="a"),
    }
    return {
        "get_tuple latest": (select_checkpoints(thread_id="t1", checkpoint_ns="", limit=1), latest),
        "get_tuple by id": (
            select_checkpoints(thread_id="t1", checkpoint_ns="", checkpoint_id="cp-2", limit=1),
            second,
        ),
        "list before": (
            select_checkpoints(thread_id="t1", checkpoint_ns="", before_id="cp-3"),
            {**second, **first},
        ),
        "list before, limit": (
            select_checkpoints(thread_id="t1", checkpoint_ns="", before_id="cp-3", limit=1),
            second,
        ),
        "list filter": (
            select_checkpoints(
                thread_id="t1", checkpoint_ns="", metadata_filter={"source": "loop"}
            ),
            {**latest, **second},
        ),
        "list hostile filter": (
            select_checkpoints(
                thread_id="t1", checkpoint_ns="", metadata_filter={"step": 1, "nested": HOSTILE}
            ),
            latest,
        ),
        "list no match": (
            select_checkpoints(thread_id="t1", checkpoint_ns="", metadata_filter={"nested": {}}),
            {},
        ),
        "thread deleted then written": (
            select_checkpoints(thread_id="t2", checkpoint_ns=""),
            k.checkpoint(k.d2),
        ),
        "run deleted": (select_checkpoints(thread_id="t3", checkpoint_ns=""), k.checkpoint(k.r2)),
        "pruned": (select_checkpoints(thread_id="t4", checkpoint_ns=""), k.checkpoint(k.p3)),
        "deleted thread": (select_checkpoints(thread_id="t5", checkpoint_ns=""), {}),
        "all namespaces": (
            select_checkpoints(thread_id="t1", checkpoint_ns=None, limit=2),
            {**latest, **k.checkpoint(k.e1)},
        ),
        "all threads": (
            select_checkpoints(thread_id=None, checkpoint_ns=None),
            {
                **latest,
                **second,
                **first,
                **{
                    row_id: payload
                    for event in (k.e1, k.d2, k.r2, k.p3, k.o1)
                    for row_id, payload in k.checkpoint(event).items()
                },
            },
        ),
        "all threads, before": (
            select_checkpoints(thread_id=None, checkpoint_ns=None, before_id="cp-2"),
            {**first, **k.checkpoint(k.o1)},
        ),
        "channel history": (channel_history("t1", "", ["a"]), {**skeleton, **channel_a}),
    }


SAVER_QUERY_NAMES = sorted(saver_queries(Known()))


def payloads(rows: list[dict[str, Any]]) -> dict[str, str]:
    """RowId -> Payload, refusing duplicates (the queries must drop redelivered copies)."""
    ids = [row["RowId"] for row in rows]
    assert len(ids) == len(set(ids)), f"duplicate rows: {sorted(ids)}"
    return {row["RowId"]: row["Payload"] for row in rows}


@pytest.mark.parametrize("name", SAVER_QUERY_NAMES)
def test_saver_queries_return_the_right_rows_through_the_sync_and_aio_clients(
    known: tuple[LocalKustoServer, Known], name: str
) -> None:
    srv, data = known
    query_, expected = saver_queries(data)[name]
    sync = KustoQueries(srv.url, DB)
    try:
        assert payloads(sync.run(query_)) == expected
    finally:
        sync.close()

    async def run_aio() -> list[dict[str, Any]]:
        aio = AsyncKustoQueries(srv.url, DB)
        try:
            return await aio.run(query_)
        finally:
            await aio.close()

    assert payloads(asyncio.run(run_aio())) == expected


def test_ingested_events_query_through_the_sync_and_aio_clients(
    known: tuple[LocalKustoServer, Known],
) -> None:
    """The strong-consistency / cache-confirmation query: this publisher's events of the
    sequences asked for (covered by ranges), nobody else's."""
    srv, k = known
    mine = sorted((e for e in k.events() if e is not k.o1), key=lambda e: e.seq)
    asked = [e.seq for e in mine[::2]]
    query_ = ingested_events(PUBLISHER.prefix, asked)
    ranges = seq_ranges(asked, MAX_SEQ_RANGES)
    expected = sorted(e.event_id for e in mine if any(a <= e.seq <= b for a, b in ranges))
    assert set(expected) >= {e.event_id for e in mine[::2]}
    sync = KustoQueries(srv.url, DB)
    try:
        assert sorted(row["EventId"] for row in sync.run(query_)) == expected
    finally:
        sync.close()

    async def run_aio() -> list[dict[str, Any]]:
        aio = AsyncKustoQueries(srv.url, DB)
        try:
            return await aio.run(query_)
        finally:
            await aio.close()

    assert sorted(row["EventId"] for row in asyncio.run(run_aio())) == expected


def test_provisioned_functions_are_typed_views_of_the_same_rules(
    known: tuple[LocalKustoServer, Known],
) -> None:
    """The stored functions agree with the saver's queries on visibility and duplicates."""
    srv, k = known
    kusto = KustoClient(KustoConnectionStringBuilder.with_no_authentication(srv.url))
    try:

        def rows(text: str) -> list[dict[str, Any]]:
            return [r.to_dict() for r in kusto.execute_query(DB, text).primary_results[0]]

        checkpoints = rows("Checkpoints() | project ThreadId, CheckpointNs, CheckpointId")
        assert sorted(tuple(r.values()) for r in checkpoints) == [
            ("t1", "", "cp-1"),
            ("t1", "", "cp-2"),
            ("t1", "", "cp-3"),
            ("t1", "child", "cp-9"),
            ("t2", "", "cp-2"),
            ("t3", "", "cp-2"),
            ("t4", "", "cp-3"),
            ("t6", "", "cp-1"),
        ]
        [hostile] = rows("Checkpoints() | where CheckpointId == 'cp-3' and ThreadId == 't1'")
        assert hostile["Metadata"]["nested"] == HOSTILE and hostile["EventId"] == k.c3.event_id

        writes = rows("PendingWrites() | project CheckpointId, TaskId, WriteIdx, Channel")
        assert sorted(tuple(r.values()) for r in writes) == [
            ("cp-2", "task-1", 0, "a"),
            ("cp-2", "task-1", 1, "b"),
        ]

        values = rows("ChannelValues() | project Channel, Version, Chunks, StoredChars")
        stored = {(r["Channel"], r["Version"]): (r["Chunks"], r["StoredChars"]) for r in values}
        big = k.blob(k.c2, "a", "2")
        assert stored == {
            ("a", "1"): (1, 4),
            ("a", "2"): (2, sum(len(p) for p in big.values())),
            ("a", "3"): (1, 4),
            ("b", "1"): (1, 4),
        }

        latest = rows("LatestCheckpoints() | project ThreadId, CheckpointNs, CheckpointId")
        assert sorted(tuple(r.values()) for r in latest) == [
            ("t1", "", "cp-3"),
            ("t1", "child", "cp-9"),
            ("t2", "", "cp-2"),
            ("t3", "", "cp-2"),
            ("t4", "", "cp-3"),
            ("t6", "", "cp-1"),
        ]
        # The materialized view itself still has t5's last put; the function hides it.
        assert rows("LatestCheckpoint | where ThreadId == 't5' | project CheckpointId") == [
            {"CheckpointId": "cp-1"}
        ]
    finally:
        kusto.close()


# ---------------------------------------------------------------------------
# Pinned clock
# ---------------------------------------------------------------------------


def test_query_now_pins_the_clock(server: LocalKustoServer) -> None:
    """Kusto's ``query_now`` request option (and ``set query_now``) fixes ``now()``;
    the translation carried the pinned value but the server did not bind it."""
    rest = server.rest_server
    options = {"query_now": "2024-01-01T00:00:00Z"}
    assert rest.run("print now()", None, DB, options).rows == [(dt.datetime(2024, 1, 1),)]
    options = {"query_now": "2024-01-02T00:00:00Z"}
    assert rest.run("print now()", None, DB, options).rows == [(dt.datetime(2024, 1, 2),)]
    pinned = "set query_now = datetime(2024-03-01);\nprint now()"
    assert rest.run(pinned, None, DB, {}).rows == [(dt.datetime(2024, 3, 1),)]
