"""The local Kusto server answers the real azure-kusto SDKs the way Azure Data Explorer does.

Every test talks to the server through the unmodified ``azure-kusto-data`` /
``azure-kusto-ingest`` clients (or raw HTTP where the point is the wire format), because
the whole value of the local server is that production code runs against it unchanged.
"""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from azure.kusto.data import ClientRequestProperties, KustoClient, KustoConnectionStringBuilder
from azure.kusto.data.data_format import DataFormat
from azure.kusto.data.exceptions import KustoApiError
from azure.kusto.ingest import (
    IngestionProperties,
    KustoStreamingIngestClient,
    ManagedStreamingIngestClient,
)
from langgraph.checkpoint.kusto.local.kusto_server import (
    LocalKustoServer,
    start_local_kusto,
)

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
