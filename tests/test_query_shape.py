"""The shape of the saver's read queries: payloads are read once, at the end, and the
narrow selection before it still returns every column of every selected row, once."""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any

from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.kusto import KustoSaver
from langgraph.checkpoint.kusto.ingestor_worker.ingest import KustoIngestor
from langgraph.checkpoint.kusto.kusto import KustoQueries
from langgraph.checkpoint.kusto.queries import (
    Query,
    channel_history,
    ingested_events,
    select_checkpoints,
    seq_ranges,
)
from langgraph.checkpoint.kusto.shared.envelope import Blob, Event, EventKind, Write
from langgraph.checkpoint.kusto.shared.ids import EVENT_ID_PREFIX_LENGTH
from langgraph.checkpoint.kusto.shared.rows import (
    COLUMNS,
    ROW_CHUNK_BYTES,
    blob_key,
    event_rows,
)

FETCH = "Scope\n| join kind=leftsemi Wanted on RowId\n"


def _renderings() -> list[Query]:
    return [
        select_checkpoints(thread_id="t", checkpoint_ns="", limit=1),
        select_checkpoints(
            thread_id=None, checkpoint_ns=None, before_id="b", metadata_filter={"a": 1}
        ),
        channel_history("t", "", ["messages", "other"]),
    ]


def test_only_the_final_fetch_reads_whole_rows() -> None:
    for query in _renderings():
        selection, fetch = query.text.split(FETCH)
        assert "Payload" not in selection and "*" not in selection, query.text
        _, dedup, after = fetch.partition("| summarize arg_max(EventSeq, *) by RowId")
        assert dedup, query.text
        # After it, at most a lookup that edits a key column (a pruned parent is dropped).
        assert not any(word in after for word in ("Payload", "*", "summarize")), query.text


def _put(
    thread: str, checkpoint_id: str, versions: dict[str, str], stored: set[str], seq: int
) -> Event:
    """A put referencing ``versions``, storing blobs (two chunks each) for ``stored``."""
    return Event(
        kind=EventKind.PUT,
        event_id=f"shape-{uuid.uuid4().hex}",
        seq=seq,
        published_at=time.time(),
        thread_id=thread,
        checkpoint_id=checkpoint_id,
        checkpoint_type="bytes",
        checkpoint_data=b"checkpoint " + checkpoint_id.encode(),
        channel_versions=versions,
        metadata={"step": seq},
        blobs=tuple(
            Blob(channel, version, "bytes", (channel * (ROW_CHUNK_BYTES + 1)).encode())
            for channel, version in versions.items()
            if channel in stored
        ),
    )


def _run(stack: Any, query: Query) -> list[dict[str, Any]]:
    queries = KustoQueries(stack.cluster, stack.database)
    try:
        return queries.run(query)
    finally:
        queries.close()


def test_selected_rows_come_back_once_with_every_column(stack: Any) -> None:
    """Two checkpoints sharing a two-chunk blob, a pending write, all ingested twice (a
    redelivery): every row of them comes back exactly once, with every column."""
    thread = f"shape-{uuid.uuid4().hex[:8]}"
    base = time.time_ns()
    first = _put(thread, "1ef-a", {"a": "1", "b": "1"}, {"a", "b"}, base)
    second = _put(thread, "1ef-b", {"a": "1", "b": "2"}, {"b"}, base + 1)
    write = Event(
        kind=EventKind.PUT_WRITES,
        event_id=f"shape-{uuid.uuid4().hex}",
        seq=base + 2,
        published_at=time.time(),
        thread_id=thread,
        checkpoint_id="1ef-b",
        writes=(Write("task", "path", 0, "a", "bytes", b"pending"),),
    )
    rows = {event.event_id: event_rows(event) for event in (first, second, write)}
    ingestor = KustoIngestor(stack.cluster, stack.database)
    try:
        for _ in range(2):
            for event_rows_ in rows.values():
                ingestor.ingest(event_rows_)
    finally:
        ingestor.close()
    expected = {row["RowId"]: row for batch in rows.values() for row in batch}
    names = {name for name, _ in COLUMNS}

    found = _run(stack, select_checkpoints(thread_id=thread, checkpoint_ns=None, limit=10))
    ids = [row["RowId"] for row in found]
    assert sorted(ids) == sorted(expected), "each selected row once, nothing else"
    assert all(set(row) == names for row in found)
    assert all(row["Payload"] == expected[row["RowId"]]["Payload"] for row in found)

    latest = _run(stack, select_checkpoints(thread_id=thread, checkpoint_ns="", limit=1))
    assert {row["CheckpointId"] for row in latest if row["RowKind"] == "checkpoint"} == {"1ef-b"}
    # Its own blob b:2 and the first put's a:1, two chunks each; never b:1.
    assert sorted(row["BlobKey"] for row in latest if row["RowKind"] == "blob") == 2 * [
        blob_key("a", "1")
    ] + 2 * [blob_key("b", "2")]
    assert len({row["RowId"] for row in latest}) == len(latest)

    history = _run(stack, channel_history(thread, "", ["a"]))
    assert len({row["RowId"] for row in history}) == len(history)
    checkpoints = [row for row in history if row["RowKind"] == "checkpoint"]
    assert sorted(row["CheckpointId"] for row in checkpoints) == ["1ef-a", "1ef-b"]
    assert all(row["Payload"] == "" and set(row) == names for row in checkpoints)
    values = [row for row in history if row["RowKind"] != "checkpoint"]
    assert sorted(row["RowKind"] for row in values) == ["blob", "blob", "write"]
    assert all(row["Payload"] == expected[row["RowId"]]["Payload"] for row in values)


def test_sequence_ranges_cut_at_the_widest_gaps() -> None:
    recent = [1_000 + 10 * n for n in range(50)]
    assert seq_ranges([*recent, 5], 2) == [(5, 5), (1_000, 1_490)]  # the straggler alone
    assert seq_ranges([*recent, 5], 8)[0] == (5, 5)
    spread = [n * n for n in range(100)]
    ranges = seq_ranges(spread, 8)
    assert len(ranges) == 8 and ranges[0][0] == 0 and ranges[-1][1] == 99 * 99
    assert all(any(low <= n <= high for low, high in ranges) for n in spread)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges))
    assert seq_ranges([7, 7], 8) == [(7, 7)]


def test_confirming_an_old_straggler_does_not_list_everything_since(stack: Any) -> None:
    """A saver asks Kusto which of its pending events it holds. One old event Kusto never
    got (dead-lettered) used to make each answer list every event the saver wrote since."""
    with KustoSaver.from_conn_string(stack.queue_url, stack.cluster, stack.database) as saver:
        for _ in range(40):
            thread = {"configurable": {"thread_id": f"straggler-{uuid.uuid4().hex[:8]}"}}
            saver.put(
                {**thread, "configurable": {**thread["configurable"], "checkpoint_ns": ""}},
                empty_checkpoint(),
                {},
                {},
            )
        assert saver.cache is not None
        published = sorted(saver.cache.pending_events().items(), key=lambda item: item[1])
        saver.wait_for_ingestion()
        asked = [published[0], *published[-3:]]
        prefix = published[0][0][:EVENT_ID_PREFIX_LENGTH]
        rows = saver.queries.run(ingested_events(prefix, [seq for _, seq in asked]))
    assert sorted(str(row["EventId"]) for row in rows) == sorted(event_id for event_id, _ in asked)
