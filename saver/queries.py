"""The KQL the saver sends. Every user value travels as a query parameter.

One query serves ``get_tuple`` and ``list``: it selects the checkpoints, then returns
their rows, the blob rows they reference and their pending-write rows in one round
trip. Redelivered copies are dropped by ``RowId``; rows older than a thread's latest
``delete_thread`` event are hidden by sequence, so a late-arriving older write never
resurrects a deleted thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from langgraph.checkpoint.kusto.shared.rows import TABLE, canonical_json, metadata_pairs

SELECT_CHECKPOINTS = """\
let Scope = {table}
    | where all_threads or ThreadId == thread_id;
let Deletes = Scope
    | where RowKind == "delete_thread"
    | summarize DeletedSeq = max(EventSeq) by ThreadId;
let Live = Scope
    | where all_namespaces or CheckpointNs == checkpoint_ns
    | join kind=leftouter Deletes on ThreadId
    | where isnull(DeletedSeq) or EventSeq > DeletedSeq
    | project-away ThreadId1, DeletedSeq;
let Target = Live
    | where RowKind == "checkpoint" and Chunk == 0
    | where isempty(checkpoint_id) or CheckpointId == checkpoint_id
    | where isempty(before_id) or strcmp(CheckpointId, before_id) < 0{metadata_filter}
    | summarize by ThreadId, CheckpointNs, CheckpointId
    | top {limit} by CheckpointId desc;
let TargetRows = Live
    | where RowKind in ("checkpoint", "write")
    | join kind=inner Target on ThreadId, CheckpointNs, CheckpointId
    | project-away ThreadId1, CheckpointNs1, CheckpointId1;
let Keys = TargetRows
    | where RowKind == "checkpoint"
    | mv-expand BlobKey = BlobKeys
    | summarize by ThreadId, CheckpointNs, BlobKey = tostring(BlobKey);
let BlobRows = Live
    | where RowKind == "blob"
    | join kind=inner Keys on ThreadId, CheckpointNs, BlobKey
    | project-away ThreadId1, CheckpointNs1, BlobKey1;
union TargetRows, BlobRows
| summarize arg_max(EventSeq, *) by RowId"""

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
    declarations = [
        "all_threads:bool",
        "thread_id:string",
        "all_namespaces:bool",
        "checkpoint_ns:string",
        "checkpoint_id:string",
        "before_id:string",
        *(f"f{i}:string" for i in range(len(pairs))),
    ]
    parameters: dict[str, Any] = {
        "all_threads": thread_id is None,
        "thread_id": thread_id or "",
        "all_namespaces": checkpoint_ns is None,
        "checkpoint_ns": checkpoint_ns or "",
        "checkpoint_id": checkpoint_id or "",
        "before_id": before_id or "",
        **{f"f{i}": pair for i, pair in enumerate(pairs)},
    }
    metadata_clause = "".join(
        f"\n    | where set_has_element(MetadataPairs, f{i})" for i in range(len(pairs))
    )
    body = SELECT_CHECKPOINTS.format(
        table=TABLE, metadata_filter=metadata_clause, limit=_limit(limit)
    )
    return Query(f"declare query_parameters({', '.join(declarations)});\n{body}", parameters)


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


VISIBLE_EVENTS = """\
declare query_parameters(event_ids:string);
{table}
| where set_has_element(split(event_ids, ","), EventId)
| summarize by EventId"""


def visible_events(event_ids: list[str]) -> Query:
    """Which of ``event_ids`` (hex, so a comma joins them safely) Kusto has ingested."""
    return Query(VISIBLE_EVENTS.format(table=TABLE), {"event_ids": ",".join(event_ids)})
