"""The KQL the saver sends. Every user value travels as a query parameter.

One query serves ``get_tuple`` and ``list``: it selects the checkpoints, then returns
their rows, the blob rows they reference and their pending-write rows in one round
trip. Redelivered copies are dropped by ``RowId``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from langgraph.checkpoint.kusto.shared.rows import TABLE, canonical_json, metadata_pairs

VISIBLE_CHECKPOINTS = """\
let Scope = {table}
    | where all_threads or ThreadId == thread_id;
let Deletes = Scope
    | where RowKind == "delete_thread"
    | summarize DeletedSeq = max(EventSeq) by ThreadId;
let Live = Scope
    | where all_namespaces or CheckpointNs == checkpoint_ns
    | project RowId, EventSeq, RowKind, ThreadId, CheckpointNs, CheckpointId, Chunk, RunId,
        ParentCheckpointId, MetadataPairs, BlobKeys, BlobKey, Channel
    | join kind=leftouter Deletes on ThreadId
    | where isnull(DeletedSeq) or EventSeq > DeletedSeq
    | project-away ThreadId1, DeletedSeq;
let RunDeletes = {table}
    | where RowKind == "delete_run"
    | summarize RunDeletedSeq = max(EventSeq) by RunId;
let Prunes = Scope
    | where RowKind == "prune"
    | summarize PruneSeq = max(EventSeq), Kept = make_set(CheckpointId)
        by ThreadId, CheckpointNs, EventId;
let Heads = Live
    | where RowKind == "checkpoint" and Chunk == 0
    | project ThreadId, CheckpointNs, CheckpointId, EventSeq, RunId, ParentCheckpointId,
        MetadataPairs, BlobKeys;
let Pruned = Heads
    | join kind=inner Prunes on ThreadId, CheckpointNs
    | where EventSeq < PruneSeq and not(set_has_element(Kept, CheckpointId))
    | summarize PrunedAt = max(PruneSeq) by ThreadId, CheckpointNs, CheckpointId;
let Checkpoints = Heads
    | join kind=leftouter RunDeletes on RunId
    | where isnull(RunDeletedSeq) or EventSeq > RunDeletedSeq
    | join kind=leftanti Pruned on ThreadId, CheckpointNs, CheckpointId
    | project ThreadId, CheckpointNs, CheckpointId, ParentCheckpointId, MetadataPairs, BlobKeys;"""
"""Checkpoints a reader may see: not deleted with their thread or run, not pruned.

Deletes hide by sequence, not by arrival: a write published before a delete stays
hidden even when it is ingested after it.

``Live`` (the rows of the scope not hidden by a thread delete) and everything built on it
carry only the key columns the selection needs, never ``Payload``: the queries first pick
the ``RowId`` of every row they return, then fetch the full rows from ``Scope`` once.
Rows sharing a ``RowId`` are copies of one row (``RowId`` is the event id and the row's
index in it), so a copy found in ``Scope`` is the very row selected in ``Live``; the final
``arg_max(EventSeq, *) by RowId`` keeps one of them. Joins that only test membership are
``leftsemi``: each left row once, however many right rows match."""

SELECT_CHECKPOINTS = """\
{visible}
let Target = Checkpoints
    | where isempty(checkpoint_id) or CheckpointId == checkpoint_id
    | where isempty(before_id) or strcmp(CheckpointId, before_id) < 0{metadata_filter}
    | summarize by ThreadId, CheckpointNs, CheckpointId
    | top {limit} by CheckpointId desc;
let TargetRows = Live
    | where RowKind in ("checkpoint", "write")
    | join kind=leftsemi Target on ThreadId, CheckpointNs, CheckpointId;
let Keys = TargetRows
    | where RowKind == "checkpoint"
    | project ThreadId, CheckpointNs, BlobKeys
    | mv-expand BlobKey = BlobKeys to typeof(string);
let BlobRows = Live
    | where RowKind == "blob"
    | join kind=leftsemi Keys on ThreadId, CheckpointNs, BlobKey;
let Wanted = union TargetRows, BlobRows
    | project RowId;
let PrunedParents = Pruned
    | project ThreadId, CheckpointNs, ParentCheckpointId = CheckpointId, ParentPrunedAt = PrunedAt;
Scope
| join kind=leftsemi Wanted on RowId
| summarize arg_max(EventSeq, *) by RowId
| join kind=leftouter PrunedParents on ThreadId, CheckpointNs, ParentCheckpointId
| extend ParentCheckpointId = iff(EventSeq < ParentPrunedAt, "", ParentCheckpointId)
| project-away ThreadId1, CheckpointNs1, ParentCheckpointId1, ParentPrunedAt"""
"""A checkpoint a prune kept while removing its parent has no parent, as in PostgresSaver;
one written from the pruned parent after every such prune (a fork) keeps the id, as
PostgresSaver stores it."""

CHANNEL_HISTORY = """\
{visible}
let Chain = Live
    | where RowKind == "checkpoint" and Chunk == 0
    | join kind=leftsemi Checkpoints on ThreadId, CheckpointNs, CheckpointId;
let ChannelRows = Live
    | where RowKind in ("blob", "write") and Channel in ({channels});
let Wanted = union Chain, ChannelRows
    | project RowId;
Scope
| join kind=leftsemi Wanted on RowId
| extend Payload = iff(RowKind == "checkpoint", "", Payload)
| summarize arg_max(EventSeq, *) by RowId"""
"""One round trip for ``get_delta_channel_history``: the thread's visible checkpoint
skeletons (parents and blob keys, no payload) plus every blob and write of the channels
asked for; the ancestor walk then runs in memory."""

MAX_LIMIT = 1_000_000
"""Beyond Kusto's default result truncation (500k rows) a larger page makes no sense."""


@dataclass(frozen=True, slots=True)
class Query:
    text: str
    parameters: dict[str, Any]


def select_checkpoints(
    *,
    thread_id: str | None,
    checkpoint_ns: str | None,
    checkpoint_id: str | None = None,
    before_id: str | None = None,
    metadata_filter: Mapping[str, Any] | None = None,
    limit: int | None = None,
) -> Query:
    """The query for ``get_tuple`` (limit 1) and ``list``.

    ``thread_id``/``checkpoint_ns`` of ``None`` mean all threads / all namespaces.
    """
    pairs = _filter_pairs(metadata_filter or {})
    parameters = {
        **_scope(thread_id, checkpoint_ns),
        "checkpoint_id": checkpoint_id or "",
        "before_id": before_id or "",
        **{f"f{i}": pair for i, pair in enumerate(pairs)},
    }
    metadata_clause = "".join(
        f"\n    | where set_has_element(MetadataPairs, f{i})" for i in range(len(pairs))
    )
    body = SELECT_CHECKPOINTS.format(
        visible=_visible(), metadata_filter=metadata_clause, limit=_limit(limit)
    )
    return _declared(body, parameters)


def channel_history(thread_id: str, checkpoint_ns: str, channels: Sequence[str]) -> Query:
    """The rows ``get_delta_channel_history`` needs for ``channels`` of one thread."""
    parameters = {
        **_scope(thread_id, checkpoint_ns),
        **{f"c{i}": str(channel) for i, channel in enumerate(channels)},
    }
    names = ", ".join(f"c{i}" for i in range(len(channels)))
    return _declared(CHANNEL_HISTORY.format(visible=_visible(), channels=names), parameters)


def _scope(thread_id: str | None, checkpoint_ns: str | None) -> dict[str, Any]:
    return {
        "all_threads": thread_id is None,
        "thread_id": thread_id or "",
        "all_namespaces": checkpoint_ns is None,
        "checkpoint_ns": checkpoint_ns or "",
    }


def _visible() -> str:
    return VISIBLE_CHECKPOINTS.format(table=TABLE)


_KQL_TYPES = {bool: "bool", int: "long"}


def _declared(body: str, parameters: Mapping[str, Any]) -> Query:
    """Prefix ``declare query_parameters``, typed from the values."""
    declarations = ", ".join(
        f"{name}:{_KQL_TYPES.get(type(value), 'string')}" for name, value in parameters.items()
    )
    return Query(f"declare query_parameters({declarations});\n{body}", dict(parameters))


def _limit(limit: int | None) -> int:
    """The one number rendered into KQL text: an ``int`` we validated, never a string."""
    if limit is None:
        return MAX_LIMIT
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be an int, got {type(limit).__name__}")
    return max(0, min(limit, MAX_LIMIT))


def _filter_pairs(metadata_filter: Mapping[str, Any]) -> list[str]:
    for key, value in metadata_filter.items():
        if not isinstance(key, str):
            raise TypeError(f"metadata filter keys must be strings, got {key!r}")
        try:
            canonical_json(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"metadata filter value for {key!r} must be a JSON value: {exc}"
            ) from exc
    return metadata_pairs(metadata_filter)


NEWEST_SEQ = """\
{table}
| where ThreadId == thread_id
| summarize NewestSeq = max(EventSeq)"""


def newest_seq(thread_id: str) -> Query:
    """The highest ``EventSeq`` Kusto holds of a thread (null if none): a ``strong`` delete
    is stamped above it, so it hides what other processes wrote before it even when their
    clocks run ahead of this one's."""
    return _declared(NEWEST_SEQ.format(table=TABLE), {"thread_id": thread_id})


INGESTED_EVENTS = """\
let Mine = {table}
    | where EventId startswith publisher;
let DeadLetters = Mine
    | where RowKind == "dead_letter"
    | project EventId, DeadLetterReason = tostring(Metadata.reason);
union
    (Mine
    | where RowKind != "dead_letter" and ({ranges})
    | summarize by EventId
    | extend DeadLetterReason = ""),
    ({table}
    | where EventId in ((DeadLetters | project EventId)) and RowKind != "dead_letter"
    | summarize by EventId
    | extend DeadLetterReason = ""),
    DeadLetters"""

MAX_SEQ_RANGES = 8


def ingested_events(publisher: str, seqs: Collection[int]) -> Query:
    """Which of one publisher's (saver instance's) events Kusto holds, and which the
    ingestor dead-lettered: one row per event held (``DeadLetterReason`` empty), for the
    sequences asked and for every dead-lettered event (replayed since, or not), plus one
    row per dead-letter note (its reason).

    The sequences are covered by at most ``MAX_SEQ_RANGES`` ranges, cut at the widest gaps:
    with one range from the oldest, an event Kusto never got made every later answer list
    all the publisher had written since. The dead-lettered ones are found by their notes,
    so a caller leaves their sequences out.
    """
    parameters: dict[str, Any] = {"publisher": publisher}
    ranges = seq_ranges(seqs, MAX_SEQ_RANGES) if seqs else []
    for i, (low, high) in enumerate(ranges):
        parameters[f"low{i}"], parameters[f"high{i}"] = low, high
    covered = " or ".join(f"EventSeq between (low{i} .. high{i})" for i in range(len(ranges)))
    return _declared(INGESTED_EVENTS.format(table=TABLE, ranges=covered or "false"), parameters)


def seq_ranges(seqs: Collection[int], most: int) -> list[tuple[int, int]]:
    """At most ``most`` ranges covering ``seqs``, cut at the widest gaps between them."""
    ordered = sorted(seqs)  # nearly sorted already: a pending dict is in publish order
    if not ordered:
        raise ValueError("no sequences to cover")
    gaps = [high - low for low, high in itertools.pairwise(ordered)]
    widest = heapq.nlargest(most - 1, range(len(gaps)), key=gaps.__getitem__)
    cuts = sorted(i + 1 for i in widest if gaps[i])
    return [
        (ordered[start], ordered[end - 1])
        for start, end in zip([0, *cuts], [*cuts, len(ordered)], strict=True)
    ]
