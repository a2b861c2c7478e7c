"""prune(keep_latest) keeps what PostgresSaver keeps, and what a DeltaChannel still needs,
read back from this process's cache and, after ingestion, from Kusto; list filters mean
the same on both read paths."""

from __future__ import annotations

import operator
import time
import uuid
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.kusto import AsyncKustoSaver
from langgraph.checkpoint.kusto.base import keep_latest
from langgraph.checkpoint.kusto.shared.assembly import StoredCheckpoint
from langgraph.checkpoint.kusto.shared.rows import StoredValue
from langgraph.graph import END, START, StateGraph


class LogState(TypedDict, total=False):
    log: Annotated[list[str], operator.add]


def extend(items: list[str], writes: list[list[str]]) -> list[str]:
    return items + [item for write in writes for item in write]


class DeltaState(TypedDict, total=False):
    items: Annotated[list[str], DeltaChannel(extend, snapshot_frequency=3)]


def two_steps(checkpointer: Any) -> Any:
    graph = StateGraph(LogState)
    graph.add_node("a", lambda s: {"log": ["a"]})
    graph.add_node("b", lambda s: {"log": ["b"]})
    graph.add_edge(START, "a")
    graph.add_edge("a", "b")
    graph.add_edge("b", END)
    return graph.compile(checkpointer=checkpointer)


def with_subgraph(checkpointer: Any) -> Any:
    child = StateGraph(LogState)
    child.add_node("inner", lambda s: {"log": ["inner"]})
    child.add_edge(START, "inner")
    child.add_edge("inner", END)
    graph = StateGraph(LogState)
    graph.add_node("child", child.compile())
    graph.add_edge(START, "child")
    graph.add_edge("child", END)
    return graph.compile(checkpointer=checkpointer)


def delta_steps(checkpointer: Any) -> Any:
    graph = StateGraph(DeltaState)
    names = ["one", "two", "three", "four"]
    for name in names:
        graph.add_node(name, lambda s, name=name: {"items": [name]})
    for first, second in zip([START, *names], [*names, END], strict=True):
        graph.add_edge(first, second)
    return graph.compile(checkpointer=checkpointer)


def _thread() -> dict[str, Any]:
    return {"configurable": {"thread_id": f"prune-{uuid.uuid4().hex[:8]}"}}


async def _checkpoints(saver: AsyncKustoSaver, config: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        (c.config["configurable"]["checkpoint_ns"], c.metadata["step"])
        async for c in saver.alist(
            {"configurable": {"thread_id": config["configurable"]["thread_id"]}}
        )
    ]


async def _parents(saver: AsyncKustoSaver, config: dict[str, Any]) -> list[str | None]:
    """Each checkpoint's parent id, newest first."""
    return [
        c.parent_config and c.parent_config["configurable"]["checkpoint_id"]
        async for c in saver.alist(
            {"configurable": {"thread_id": config["configurable"]["thread_id"]}}
        )
    ]


async def _reader(stack: Any) -> Any:
    return AsyncKustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database, consistency="eventual"
    )


async def test_keep_latest_keeps_one_checkpoint_of_a_graph_without_delta_channels(
    stack: Any,
) -> None:
    config = _thread()
    async with AsyncKustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database
    ) as saver:
        app = two_steps(saver)
        for run in range(3):
            await app.ainvoke({"log": [f"in{run}"]}, config)
        state = await app.aget_state(config)
        before, latest = state.values, [("", state.metadata["step"])]
        await saver.aprune([config["configurable"]["thread_id"]])

        assert await _checkpoints(saver, config) == latest
        assert (await app.aget_state(config)).values == before
        assert await _parents(saver, config) == [None]  # its parent is gone, as in Postgres
        await saver.wait_for_ingestion()
    async with await _reader(stack) as reader:
        assert await _checkpoints(reader, config) == latest
        assert (await two_steps(reader).aget_state(config)).values == before
        assert await _parents(reader, config) == [None]


async def test_keep_latest_drops_subgraph_calls_with_their_root_checkpoint(stack: Any) -> None:
    config = _thread()
    async with AsyncKustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database
    ) as saver:
        app = with_subgraph(saver)
        for run in range(2):
            await app.ainvoke({"log": [f"in{run}"]}, config)
        assert any(ns for ns, _ in await _checkpoints(saver, config))  # subgraph calls saved
        latest = [("", (await app.aget_state(config)).metadata["step"])]
        await saver.aprune([config["configurable"]["thread_id"]])

        assert await _checkpoints(saver, config) == latest
        await saver.wait_for_ingestion()
    async with await _reader(stack) as reader:
        assert await _checkpoints(reader, config) == latest


async def test_keep_latest_keeps_what_a_delta_channel_is_rebuilt_from(stack: Any) -> None:
    config = _thread()
    async with AsyncKustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database
    ) as saver:
        app = delta_steps(saver)
        await app.ainvoke({"items": ["input"]}, config)
        await app.ainvoke({"items": ["again"]}, config)
        before = (await app.aget_state(config)).values
        assert before["items"][-1] == "four" and len(before["items"]) == 10
        await saver.aprune([config["configurable"]["thread_id"]])

        kept = await _checkpoints(saver, config)
        assert 1 < len(kept) < 10  # the walk back to a snapshot, not the whole thread
        assert (await app.aget_state(config)).values == before
        parents = await _parents(saver, config)
        assert parents[-1] is None and None not in parents[:-1]  # the oldest kept lost its
        await saver.wait_for_ingestion()
    async with await _reader(stack) as reader:
        assert await _checkpoints(reader, config) == kept
        assert await _parents(reader, config) == parents
        assert (await delta_steps(reader).aget_state(config)).values == before


async def test_prune_refuses_a_single_thread_id_string(stack: Any) -> None:
    async with AsyncKustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database
    ) as saver:
        with pytest.raises(TypeError, match="not a single string"):
            await saver.aprune("ab")
        with pytest.raises(ValueError, match="strategy must be one of"):
            await saver.aprune(["ab"], strategy="newest")


async def test_list_filters_mean_the_same_in_the_cache_and_in_kusto(stack: Any) -> None:
    config = _thread()
    thread = config["configurable"]["thread_id"]
    filters: list[dict[str, Any]] = [
        {"step": 1.0},  # a whole float equals the integer, as in the reference savers
        {"flag": True},
        {"flag": 1},  # true is not 1
        {"missing": None},  # an absent key is not null
        {"nested": {"b": [1, 2], "a": None}},
    ]
    async with AsyncKustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database
    ) as saver:
        checkpoint_config = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
        await saver.aput(
            checkpoint_config,
            empty_checkpoint(),
            {"step": 1, "flag": True, "nested": {"a": None, "b": [1, 2]}},  # type: ignore[typeddict-item]
            {},
        )

        async def counts(reader: AsyncKustoSaver) -> list[int]:
            return [len([c async for c in reader.alist(config, filter=f)]) for f in filters]

        from_cache = await counts(saver)
        await saver.wait_for_ingestion()
    async with await _reader(stack) as reader:
        from_kusto = await counts(reader)
    assert from_cache == from_kusto == [1, 1, 0, 0, 1]


def _stored(ns: str, checkpoint_id: str, parent: str, metadata: dict[str, Any]) -> Any:
    value = StoredValue(
        "e", 1, "empty" if metadata.get("counters_since_delta_snapshot") else "json", b""
    )
    return StoredCheckpoint(
        thread_id="t",
        checkpoint_ns=ns,
        checkpoint_id=checkpoint_id,
        parent_checkpoint_id=parent,
        checkpoint=StoredValue("e", 1, "json", b"{}"),
        metadata=metadata,
        channel_versions={"items": checkpoint_id},
        blobs={"items": value},
    )


def test_a_subgraph_call_stays_while_its_root_checkpoint_is_kept() -> None:
    """The root's latest checkpoint needs its parent for a DeltaChannel; the call that
    started from that parent stays with it, an older call goes."""
    delta = {"counters_since_delta_snapshot": {"items": [1, 1]}}
    checkpoints = [
        _stored("", "r1", "", {}),  # a snapshot
        _stored("", "r2", "r1", delta),
        _stored("", "r3", "r2", delta),
        _stored("call:a", "a1", "", {"parents": {"": "r1"}}),
        _stored("call:b", "b1", "", {"parents": {"": "r2"}}),
    ]
    checkpoints[0].blobs["items"] = StoredValue("e", 1, "json", b"[]")
    kept = keep_latest(checkpoints)
    assert ("", "r1") in kept and ("", "r2") in kept and ("", "r3") in kept
    assert ("call:b", "b1") in kept and ("call:a", "a1") in kept


async def test_checkpoints_written_after_a_prune_of_a_clock_ahead_writer_stay(
    stack: Any,
) -> None:
    """The prune's sequence comes from the newest checkpoint seen; this process's clock
    moves past it, so what it writes next is not hidden by its own prune."""
    config = _thread()
    start = {"configurable": {**config["configurable"], "checkpoint_ns": ""}}
    async with AsyncKustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database
    ) as ahead:
        ahead._clock.observe(time.time_ns() + 5 * 10**9)
        await ahead.aput(start, empty_checkpoint(), {"step": 0}, {})  # type: ignore[typeddict-item]
        await ahead.wait_for_ingestion()
    async with AsyncKustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database
    ) as saver:
        await saver.aprune([config["configurable"]["thread_id"]])
        after = empty_checkpoint()
        await saver.aput(start, after, {"step": 1}, {})  # type: ignore[typeddict-item]
        await saver.wait_for_ingestion()
        found = await saver.aget_tuple(config)
        assert found is not None and found.checkpoint["id"] == after["id"]
    async with await _reader(stack) as reader:
        found = await reader.aget_tuple(config)
        assert found is not None and found.checkpoint["id"] == after["id"]


async def test_a_fork_written_after_the_prune_keeps_its_pruned_parent_id(stack: Any) -> None:
    """Only checkpoints the prune kept lose a parent it removed. One written later from a
    pruned checkpoint (update_state from an old id) keeps the id, as PostgresSaver stores
    it, read from the cache and from Kusto alike."""
    thread = f"prune-fork-{uuid.uuid4().hex[:8]}"
    root = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
    async with AsyncKustoSaver.from_conn_string(
        stack.queue_url, stack.cluster, stack.database
    ) as saver:
        first = await saver.aput(root, empty_checkpoint(), {"step": 0}, {})
        await saver.aput(first, empty_checkpoint(), {"step": 1}, {})
        await saver.aprune([thread])
        await saver.aput(first, empty_checkpoint(), {"step": 2}, {})  # a fork from step 0
        expected = [first["configurable"]["checkpoint_id"], None]  # step 2, then step 1
        assert await _parents(saver, root) == expected
        await saver.wait_for_ingestion()
        async with await _reader(stack) as reader:
            assert await _parents(reader, root) == expected
        await saver.aprune([thread])  # keeps the fork, whose parent is gone: now it has none
        assert await _parents(saver, root) == [None]
        await saver.wait_for_ingestion()
    async with await _reader(stack) as reader:
        assert await _parents(reader, root) == [None]
